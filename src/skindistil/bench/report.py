"""The model benchmark's report: the paper's teacher/student ratios, bench.md, bench.png, bench.json.

The paper's ratios for a teacher/student pair, per device, backend and batch size:
X% smaller = 1 - params_student / params_teacher; Y% faster = t_teacher / t_student - 1, with t the
median seconds per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from skindistil.files import save_figure, write_json, write_text
from skindistil.markdown import markdown_table

# ------------------------------------------------------------------------------------------ ratios


def choose_pairs(summaries: Sequence[dict]) -> list[tuple[str, str]]:
    """(teacher, student) labels: for each width, the deepest ViT against every shallower one of that
    width; if that gives none, the first model against the second."""
    pairs = []
    widths = {s["width"] for s in summaries if s["width"] is not None}
    for width in sorted(widths):
        group = [s for s in summaries if s["width"] == width]
        teacher = max(group, key=lambda s: s["depth"])  # the first of equally deep ones
        pairs += [(teacher["label"], s["label"]) for s in group if s["depth"] < teacher["depth"]]
    if not pairs and len(summaries) >= 2:
        pairs = [(summaries[0]["label"], summaries[1]["label"])]
    return pairs


def paper_ratios(summaries: Sequence[dict], results: Sequence[dict], pairs) -> list[dict]:
    """The paper's ratios for each pair at every (device, backend, batch size) both were timed at.

    smaller = 1 - params_s / params_t; faster = t_t / t_s - 1 (t: median seconds per image);
    speedup = t_t / t_s.
    """
    params = {s["label"]: s["params"] for s in summaries}
    cells = {(r["model"], r["device"], r["backend"], r["batch_size"]): r for r in results}
    ratios = []
    for teacher, student in pairs:
        for (model, device, backend, batch_size), cell in cells.items():
            other = cells.get((student, device, backend, batch_size))
            if model != teacher or other is None:
                continue
            speedup = cell["ms_per_image"] / other["ms_per_image"]
            ratios.append(
                {
                    "teacher": teacher,
                    "student": student,
                    "device": device,
                    "backend": backend,
                    "batch_size": batch_size,
                    "smaller": 1 - params[student] / params[teacher],
                    "faster": speedup - 1,
                    "speedup": speedup,
                }
            )
    return ratios


def ratio_sentence(ratio: dict) -> str:
    """'S vs T (backend, device, batch B): X% smaller, Y% faster (speed-up Zx)'."""
    smaller, faster = ratio["smaller"], ratio["faster"]
    return (
        f"{ratio['student']} vs {ratio['teacher']} ({ratio['backend']}, {ratio['device']}, batch {ratio['batch_size']}): "
        f"{abs(smaller):.2%} {'smaller' if smaller >= 0 else 'larger'}, "
        f"{abs(faster):.2%} {'faster' if faster >= 0 else 'slower'} (speed-up {ratio['speedup']:.2f}x)"
    )


# ----------------------------------------------------------------------------------------- reports


def markdown_report(result: dict) -> str:
    """bench.md: machine and protocol, a model table, a speed table, the ratios and skipped backends."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        "# skindistil benchmark",
        "",
        f"Device {machine['device']} ({machine['device_name']}; {machine['cpu_count']} CPU cores), "
        f"{_threads(machine['threads'])} (torch.get_num_threads, also given to onnxruntime); torch {machine['torch']}, "
        f"timm {machine['timm']}, onnxruntime {machine['onnxruntime']}; {result['created']}.",
        f"Per cell: {settings['warmup']} warm-up calls, then up to {settings['repeats']} timed calls "
        f"(at least {settings['min_repeats']}, stopping after {settings['seconds']:g} s); random normal inputs; "
        "torch.inference_mode; CUDA synchronised after each call.",
        "",
        "## Models",
        "",
        markdown_table(
            ["model", "given as", "depth", "width", "input", "parameters", "file MB", "GFLOPs/image", "BMA"],
            [[s["label"], f"{s['source']} `{s['ref']}`", str(s["depth"] or "-"), str(s["width"] or "-"),
              "x".join(map(str, s["image_size"])), f"{s['params']:,}", f"{s['file_bytes'] / 1e6:.2f}",
              f"{s['gflops']:.4f}",
              f"{s['balanced_accuracy']:.4f} ({s['balanced_accuracy_split']})" if s["balanced_accuracy"] is not None
              else "-"]
             for s in result["models"]]),
        "",
        "File MB: model.safetensors for artifacts, tensor bytes for architecture specs (1 MB = 10^6 bytes). "
        "GFLOPs: FlopCounterMode, multiply-add = 2 FLOPs.",
        "",
        "## Speed",
        "",
        markdown_table(
            ["model", "backend", "batch", "median ms/call", "p90 ms/call", "ms/image", "images/s", "calls",
             "peak memory MB"],
            [[r["model"], r["backend"], str(r["batch_size"]), f"{r['median_s'] * 1e3:.2f}", f"{r['p90_s'] * 1e3:.2f}",
              f"{r['ms_per_image']:.3f}", f"{r['images_per_s']:.1f}", str(r["repeats"]),
              f"{r['peak_memory_mb']:.1f}" if r["peak_memory_mb"] is not None else "-"] for r in result["results"]]),
    ]
    kinds = sorted({r["memory_kind"] for r in result["results"]})
    if kinds:
        lines += ["", "Peak memory MB (10^6 bytes): " + "; ".join(kinds) + "."]
    lines += ["", "## Teacher vs student", ""]
    lines += [f"- {ratio_sentence(r)}" for r in result["ratios"]] or ["No teacher/student pair."]
    lines.append("")
    lines.append("X% smaller = 1 - params_student / params_teacher; Y% faster = t_teacher / t_student - 1 (t per image).")
    if result["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['model']} / {s['backend']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot_throughput(result: dict, path: str | Path) -> Path:
    """Throughput at the largest batch size against BMA (when every model has one) or parameters,
    one series per backend."""
    from matplotlib.figure import Figure

    summaries = {s["label"]: s for s in result["models"]}
    use_bma = bool(summaries) and all(s["balanced_accuracy"] is not None for s in summaries.values())
    batch = max((r["batch_size"] for r in result["results"]), default=None)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for backend in dict.fromkeys(r["backend"] for r in result["results"]):
        rows = [r for r in result["results"] if r["backend"] == backend and r["batch_size"] == batch]
        xs = [summaries[r["model"]]["balanced_accuracy"] if use_bma else summaries[r["model"]]["params"] / 1e6
              for r in rows]
        ys = [r["images_per_s"] for r in rows]
        ax.plot(xs, ys, "o", label=backend)
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(_short(r["model"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    split = "/".join(sorted({s["balanced_accuracy_split"] for s in summaries.values() if s["balanced_accuracy_split"]}))
    ax.set(
        xlabel=f"BMA ({split})" if use_bma else "parameters (millions)",
        ylabel=f"images/s at batch {batch}",
        title=f"Throughput on {result['machine']['device']} ({_threads(result['machine']['threads'])})",
    )
    ax.margins(x=0.15, y=0.1)  # room for the point labels
    ax.grid(alpha=0.3)
    if result["results"]:
        ax.legend(title="backend")
    return save_figure(fig, path, dpi=120)


def _threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out_dir`; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    write_json(files["json"], result)
    write_text(files["markdown"], markdown_report(result))
    plot_throughput(result, files["plot"])
    return files
