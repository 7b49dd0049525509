"""Size, FLOPs, memory, latency and throughput of models and inference backends; teacher/student ratios.

Definitions
- parameters: elements of `model.parameters()`.
- file size: bytes of an artifact's model.safetensors; for an architecture spec, the bytes its tensors
  would take on disk (sum of numel * element size over the state dict; safetensors adds only a small
  JSON header).
- GFLOPs per image: FLOPs of one forward pass at batch 1 / 1e9, counted by
  `torch.utils.flop_counter.FlopCounterMode`: a multiply-add is 2 FLOPs; matmuls, convolutions and
  attention are counted (also the CPU attention kernel, which FlopCounterMode does not list itself);
  norms, activations, softmax and additions are not (a few % of a ViT).
- latency: seconds per call (one batch), median and 90th percentile over the timed calls.
- throughput: batch size / median seconds per call (images/s).
- peak memory: what running the model at that batch size takes, in MB (10^6 bytes, as file MB):
  weights + input batch + call, where weights are the bytes the backend holds (PyTorch backends: the
  parameters and buffers of the module they run, e.g. a bf16 copy for `fast`; onnxruntime: the ONNX
  file's bytes, the initialisers its session loads), input is the batch's tensor bytes, and call is
  the most memory one call adds on top of them (activations, workspace, outputs), measured by
  `skindistil.measure.PeakMemory`: on CUDA with torch's allocator statistics, on the CPU as the growth
  of the process's peak resident size after freed memory is handed back (malloc_trim). The three parts
  are reported too (weights_memory_mb, input_memory_mb, call_memory_mb). onnxruntime's own GPU
  memory is not seen by PyTorch, so peak memory is not reported for it on CUDA.
- the paper's ratios for a teacher/student pair, per device, backend and batch size:
  X% smaller = 1 - params_student / params_teacher; Y% faster = t_teacher / t_student - 1, with t the
  median seconds per image.

Timing protocol per cell (model x backend x batch size): `warmup` untimed calls (the last one measures
peak memory), then timed calls until `repeats` are done, or until `seconds` have been spent timing and at
least `min_repeats` are done. The models of a run are timed round-robin (one call of each per round),
so a teacher and its student share the same machine load. Every call runs under
torch.inference_mode; on CUDA each timed call ends with torch.cuda.synchronize. The thread count
(torch.get_num_threads, also given to onnxruntime) is recorded.

Models are artifact directories or timm architecture specs (random weights, 8 classes):

    ARCH[@DEPTH][:KEY=VALUE[,KEY=VALUE...]]

ARCH is a timm model name; @DEPTH sets the number of blocks (timm's `depth`); KEY=VALUE pairs are more
`timm.create_model` arguments, values being integers, floats, true/false or words. Examples:
`vit_base_patch16_224` (the teacher), `vit_base_patch16_224@6` (the 6-block student at full size),
`vit_base_patch16_224@2:embed_dim=32,num_heads=2,img_size=32,patch_size=8` (a tiny ViT for tests).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skindistil.devices import parse_device
from skindistil.errors import ConfigError
from skindistil.files import save_figure, write_json, write_text
from skindistil.inference.backends import (
    BACKENDS,
    BackendUnavailable,
    build_backend,
    check_backends,
    model_input_size,
)
from skindistil.markdown import markdown_table
from skindistil.measure import PeakMemory, summarize_times, time_interleaved
from skindistil.metric_keys import BALANCED_ACCURACY, with_current_keys
from skindistil.models.artifact import (
    METRICS_FILE,
    count_parameters,
    load_model,
    resolve_model_dir,
    weight_files,
)
from skindistil.models.teacher import create_teacher

RESULT_FORMAT = 1
DEFAULT_NUM_CLASSES = 8
MEMORY_PARTS = (
    "peak memory = weights held by the backend (parameters + buffers of the module run, or the ONNX file) "
    "+ input batch + the most memory one call adds"
)

# ------------------------------------------------------------------------------------- model specs

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:@(?P<depth>\d+))?(?::(?P<kwargs>.*))?$")
_KWARG = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^=]+)$")
SPEC_SYNTAX = "ARCH[@DEPTH][:KEY=VALUE,...] (e.g. vit_base_patch16_224@6 or vit_base_patch16_224@2:embed_dim=32,num_heads=2,img_size=32,patch_size=8)"


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture with an optional depth and extra constructor arguments (see module doc)."""

    name: str
    depth: int | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def timm_kwargs(self) -> dict:
        kwargs = {"num_classes": DEFAULT_NUM_CLASSES, **self.kwargs}
        if self.depth is not None:
            kwargs["depth"] = self.depth
        return kwargs


def parse_arch_spec(text: str) -> ArchSpec:
    """Parse `ARCH[@DEPTH][:KEY=VALUE,...]`; ConfigError naming the fault for anything else."""
    match = _SPEC.match(text.strip())
    if not match:
        raise ConfigError(f"model {text!r}: not an architecture spec; expected {SPEC_SYNTAX}")
    depth = match["depth"]
    if depth is not None and int(depth) < 1:
        raise ConfigError(f"model {text!r}: depth must be at least 1")
    kwargs = {}
    if match["kwargs"] is not None:
        for item in match["kwargs"].split(","):
            pair = _KWARG.match(item.strip())
            if not pair:
                raise ConfigError(f"model {text!r}: {item!r} is not KEY=VALUE; expected {SPEC_SYNTAX}")
            if pair["key"] == "depth":
                raise ConfigError(f"model {text!r}: give the depth as @DEPTH, not depth=")
            kwargs[pair["key"]] = _parse_value(pair["value"].strip())
    return ArchSpec(match["name"], int(depth) if depth is not None else None, kwargs)


def _parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line: an artifact directory or an architecture spec."""

    ref: str
    label: str
    path: Path | None = None
    spec: ArchSpec | None = None


def parse_model_ref(ref: str) -> ModelRef:
    """Check a model reference without building it: an existing path (or anything that looks like a
    path) is an artifact; anything else must be a spec naming a timm architecture."""
    import timm

    ref = str(ref)
    if Path(ref).expanduser().exists() or any(c in ref for c in "/\\") or ref.startswith((".", "~")):
        model_dir = resolve_model_dir(Path(ref).expanduser())
        label = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        return ModelRef(ref, label, path=model_dir)
    spec = parse_arch_spec(ref)
    if not timm.is_model(spec.name):
        raise ConfigError(
            f"model {ref!r}: no such directory and {spec.name!r} is not a timm architecture "
            "(give an artifact directory or a spec " + SPEC_SYNTAX + ")"
        )
    label = spec.name if spec.depth is None else f"{spec.name}@{spec.depth}"
    return ModelRef(ref, label, spec=spec)


@dataclass
class BenchModel:
    """A model ready to measure, with what is known about it before any timing."""

    ref: ModelRef
    model: nn.Module
    architecture: str
    image_size: tuple[int, int]
    file_bytes: int
    file_bytes_kind: str
    metrics: dict


def load_bench_model(ref: ModelRef) -> BenchModel:
    """Load the artifact, or build the spec with random weights, in eval mode on the CPU."""
    if ref.path is not None:
        loaded = load_model(ref.path)
        size = loaded.preprocess.image_size
        return BenchModel(
            ref,
            loaded.model,
            loaded.architecture["name"],
            (size, size),
            sum(path.stat().st_size for path in weight_files(ref.path)),
            " + ".join(path.name for path in weight_files(ref.path)),
            loaded.metrics,
        )
    kwargs = ref.spec.timm_kwargs()
    try:
        model = create_teacher(ref.spec.name, kwargs.pop("num_classes"), pretrained=None, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:  # timm's checks on inconsistent arguments
        raise ConfigError(f"model {ref.ref!r}: timm cannot build it ({type(exc).__name__}: {exc})") from None
    model.eval()
    return BenchModel(ref, model, ref.spec.name, model_input_size(model), tensor_bytes(model), "tensor bytes", {})


# ------------------------------------------------------------------------------------ measurements


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors (what a safetensors file of the model holds, minus its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weight_bytes(runner) -> int | None:
    """Bytes of the weights a backend holds: the parameters and buffers of the module a PyTorch backend
    runs (in its dtype), or an onnxruntime backend's ONNX file size; None for anything else."""
    module = getattr(runner, "module", None)
    if isinstance(module, nn.Module):
        tensors = [*module.parameters(), *module.buffers()]  # each yields a shared tensor once
        return sum(t.numel() * t.element_size() for t in tensors)
    file_bytes = getattr(runner, "file_bytes", None)
    return int(file_bytes) if file_bytes is not None else None


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    # FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash kernel that
    # scaled_dot_product_attention dispatches to on the CPU; without this, attention counts as zero there
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def count_flops(model: nn.Module, image_size: tuple[int, int]) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2), on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, *image_size, device=device))
    return int(counter.get_total_flops())


def vit_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(depth, width) of a timm ViT or DepthViT; (None, None) for other models."""
    vit = getattr(model, "vit", model)
    blocks, width = getattr(vit, "blocks", None), getattr(vit, "embed_dim", None)
    if isinstance(blocks, nn.Sequential) and isinstance(width, int):
        return len(blocks), width
    return None, None


def find_bma(metrics: dict, where: str = "metrics.json") -> tuple[float | None, str | None]:
    """(BMA, split) from an artifact's metrics.json (`where`: its path, for errors): the test split
    preferred, else val; (None, None) when neither records a finite balanced accuracy.

    Layouts per split: {"balanced_accuracy": x} or {"headline": {"balanced_accuracy": x}}; files of
    earlier versions ({"bma": x}) are read through `metric_keys.with_current_keys`.
    """
    metrics = with_current_keys(metrics, where)
    for split in ("test", "val"):
        section = metrics.get(split)
        if not isinstance(section, dict):
            continue
        for source in (section, section.get("headline")):
            if not isinstance(source, dict):
                continue
            value = source.get(BALANCED_ACCURACY)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value), split
    return None, None


# ------------------------------------------------------------------------------------------ runner


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how long to spend on each cell (see module doc for the protocol)."""

    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    backends: tuple[str, ...] = ("eager",)
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 3
    seconds: float = 10.0
    threads: int | None = None

    def validate(self) -> None:
        check_backends(self.backends)
        parse_device(self.device)
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes {list(self.batch_sizes)}: need one or more positive integers")
        if self.warmup < 1 or self.min_repeats < 1 or self.repeats < self.min_repeats or self.seconds <= 0:
            raise ConfigError("timing: need warmup >= 1, 1 <= min_repeats <= repeats and seconds > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads {self.threads}: must be at least 1")


def machine_info(device: torch.device, threads: int) -> dict:
    import timm

    info = {
        "device": str(device),
        "device_name": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_benchmark(
    models: Sequence[str],
    settings: BenchSettings,
    *,
    pair: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure every model with every backend at every batch size; returns the JSON-ready result.

    All models are loaded together and, per backend and batch size, timed round-robin
    (`time_interleaved`), so a teacher and its student see the same machine load.
    Keys: format, created, machine, settings, models (one summary each), results (one per cell),
    skipped (backends unavailable here, with the reason), pairs ([teacher, student] labels) and
    ratios (the paper's "X% smaller, Y% faster" per pair, backend and batch size). Pairs: `pair`
    (teacher, student) if given; else, among ViTs of equal width, the deepest against each shallower
    one; else the first two models.
    """
    settings.validate()
    refs = _unique_labels([parse_model_ref(m) for m in models])  # all checked before any long run
    pairs = _choose_pairs_by_name(refs, pair) if pair else None
    device = torch.device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    threads = torch.get_num_threads()
    log = progress or (lambda message: None)
    bench_models = []
    summaries = []
    for ref in refs:
        bench_models.append(load_bench_model(ref))
        summaries.append(_summarize_model(bench_models[-1]))
        log(f"{ref.label}: {summaries[-1]['params']:,} parameters, {summaries[-1]['gflops']:.3f} GFLOPs/image")
    results, skipped = [], []
    for backend in settings.backends:
        runners = {}
        for bench_model in bench_models:
            label = bench_model.ref.label
            try:
                runners[label] = build_backend(
                    backend,
                    bench_model.model,
                    device,
                    image_size=bench_model.image_size,
                    threads=threads,
                    pad_batches=False,  # a timed batch is the batch asked for
                )
            except BackendUnavailable as exc:
                skipped.append({"model": label, "backend": backend, "reason": str(exc)})
                log(f"{label}: {backend} skipped: {exc}")
        sizes = {m.ref.label: m.image_size for m in bench_models}
        for batch_size in settings.batch_sizes:
            cells = _measure_cells(runners, sizes, BACKENDS[backend], int(batch_size), device, settings)
            for label, cell in cells.items():
                results.append({"model": label, "backend": backend, "device": str(device), **cell})
                log(
                    f"{label}: {backend} batch {batch_size}: {cell['median_s'] * 1e3:.2f} ms/call, "
                    f"{cell['images_per_s']:.1f} images/s ({cell['repeats']} calls)"
                )
            _release(device)
        del runners
        _release(device)
    if pairs is None:
        pairs = choose_pairs(summaries)
    return {
        "format": RESULT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, threads),
        "settings": {**dataclasses.asdict(settings), "threads": threads},
        "models": summaries,
        "results": results,
        "skipped": skipped,
        "pairs": [list(p) for p in pairs],
        "ratios": paper_ratios(summaries, results, pairs),
    }


def _unique_labels(refs: list[ModelRef]) -> list[ModelRef]:
    seen: dict[str, int] = {}
    out = []
    for ref in refs:
        seen[ref.label] = seen.get(ref.label, 0) + 1
        out.append(ref if seen[ref.label] == 1 else dataclasses.replace(ref, label=f"{ref.label}#{seen[ref.label]}"))
    return out


def _choose_pairs_by_name(refs: list[ModelRef], pair: Sequence[str]) -> list[tuple[str, str]]:
    if len(pair) != 2:
        raise ConfigError(f"--pair needs two models (teacher student), got {len(pair)}")
    labels = []
    for name in pair:
        match = [r.label for r in refs if name in (r.ref, r.label)]
        if not match:
            raise ConfigError(f"--pair {name!r}: not one of the benchmarked models ({', '.join(r.label for r in refs)})")
        labels.append(match[0])
    return [(labels[0], labels[1])]


def _summarize_model(bench_model: BenchModel) -> dict:
    depth, width = vit_shape(bench_model.model)
    where = str(bench_model.ref.path / METRICS_FILE) if bench_model.ref.path is not None else bench_model.ref.ref
    bma, bma_split = find_bma(bench_model.metrics, where)
    ref = bench_model.ref
    return {
        "label": ref.label,
        "ref": ref.ref,
        "source": "artifact" if ref.path is not None else "arch",
        "architecture": bench_model.architecture,
        "depth": depth,
        "width": width,
        "image_size": list(bench_model.image_size),
        "params": count_parameters(bench_model.model),
        "file_bytes": bench_model.file_bytes,
        "file_bytes_kind": bench_model.file_bytes_kind,
        "gflops": count_flops(bench_model.model, bench_model.image_size) / 1e9,
        "balanced_accuracy": bma,
        "balanced_accuracy_split": bma_split,
    }


def _measure_cells(
    runners: dict, image_sizes: dict, backend, batch_size: int, device: torch.device, settings: BenchSettings
) -> dict[str, dict]:
    """One cell per model at this backend and batch size: warm-up (the last warm-up call measures peak
    memory), then round-robin timing of all models."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    inputs, memory = {}, {}
    # dynamo's per-function recompile limit (8) would otherwise send the ninth model to eager unannounced
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(runners))):
        for label, fn in runners.items():
            generator = torch.Generator().manual_seed(batch_size)
            inputs[label] = torch.randn(batch_size, 3, *image_sizes[label], generator=generator).to(device)
            for _ in range(settings.warmup - 1):
                fn(inputs[label])
            with PeakMemory(device) as memory[label]:
                fn(inputs[label])
        times = time_interleaved(
            list(runners.values()),
            list(inputs.values()),
            repeats=settings.repeats,
            min_repeats=settings.min_repeats,
            max_seconds=settings.seconds,
            sync=sync,
        )
    cells = {}
    for (label, mem), spent in zip(memory.items(), times, strict=True):
        weights = weight_bytes(runners[label])
        held = inputs[label].numel() * inputs[label].element_size()
        # PyTorch's CUDA allocator does not see onnxruntime's GPU memory
        seen = mem.peak_bytes is not None and weights is not None and not (device.type == "cuda" and backend.runtime != "torch")
        cells[label] = {
            "batch_size": batch_size,
            **summarize_times(spent, batch_size),
            "peak_memory_mb": (weights + held + mem.peak_bytes) / 1e6 if seen else None,
            "weights_memory_mb": weights / 1e6 if weights is not None else None,
            "input_memory_mb": held / 1e6,
            "call_memory_mb": mem.peak_bytes / 1e6 if seen else None,
            "memory_kind": f"{MEMORY_PARTS}; call = {mem.kind}" if seen else "unavailable",
        }
    return cells


def _release(device: torch.device) -> None:
    # compiled code is dropped between cells: each batch size compiles afresh anyway (static shapes)
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
