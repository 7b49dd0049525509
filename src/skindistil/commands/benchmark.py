"""`skindistil benchmark`: size, FLOPs, memory, latency and throughput of models and backends, with the
paper's teacher/student ratios ("X% smaller, Y% faster").

    skindistil benchmark --models runs/teacher runs/student --device cpu --batch-sizes 1,32 \\
        --backends eager,onnx --out runs/benchmark
    skindistil benchmark --models vit_base_patch16_224 vit_base_patch16_224@6 --batch-sizes 1,32

A model is an artifact directory (model/ or run directory) or a timm architecture spec
ARCH[@DEPTH][:KEY=VALUE,...] built with random weights (see skindistil.bench.specs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,32,256") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,32,256")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="DIR_OR_ARCH",
        help="artifact directories and/or timm specs ARCH[@DEPTH][:KEY=VALUE,...], e.g. vit_base_patch16_224@6",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--batch-sizes", type=_int_list, default=[1, 32, 256], metavar="N,N,...", help="default 1,32,256"
    )
    parser.add_argument(
        "--backends",
        type=_name_list,
        default=["eager"],
        metavar="NAME,...",
        help="eager, bf16, compile, bf16-compile, fast, onnx, onnx-int8 (default eager)",
    )
    parser.add_argument(
        "--pair", nargs=2, metavar=("TEACHER", "STUDENT"), help="the pair for the ratios (default: automatic)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="most timed calls per cell (default 20)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed calls per cell (default 3)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="timing budget per cell; stops after it once --min-repeats are done"
    )
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch and onnxruntime (default: PyTorch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), metavar="DIR", help="default runs/benchmark")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.bench.models import BenchSettings, run_benchmark
    from skindistil.bench.report import write_report

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # piped or logged: lines need not fit a terminal
    progress = Console(stderr=True)
    settings = BenchSettings(
        device=args.device,
        batch_sizes=tuple(args.batch_sizes),
        backends=tuple(args.backends),
        warmup=args.warmup,
        repeats=args.repeats,
        min_repeats=args.min_repeats,
        seconds=args.seconds,
        threads=args.threads,
    )
    result = run_benchmark(args.models, settings, pair=args.pair, progress=lambda message: progress.print(message, style="dim", soft_wrap=True))
    files = write_report(result, args.out)
    _print_result(console, result)
    console.print(f"wrote {files['markdown']}, {files['json'].name}, {files['plot'].name}")
    return 0


def _print_result(console, result: dict) -> None:
    from rich.table import Table

    from skindistil.bench.report import ratio_sentence

    machine = result["machine"]
    models = Table(title="Models")
    label_width = min(30, max((len(s["label"]) for s in result["models"]), default=5))
    _add_columns(models, ("model", "depth", "parameters", "file MB", "GFLOPs/image", "BMA"), label_width)
    for s in result["models"]:
        bma = (f"{s['balanced_accuracy']:.4f} ({s['balanced_accuracy_split']})"
               if s["balanced_accuracy"] is not None else "-")
        models.add_row(
            s["label"], str(s["depth"] or "-"), f"{s['params']:,}", f"{s['file_bytes'] / 1e6:.2f}", f"{s['gflops']:.4f}", bma
        )
    console.print(models)
    threads = f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}"
    speed = Table(title=f"Speed on {machine['device']} ({machine['device_name']}, {threads})")
    _add_columns(speed, ("model", "backend", "batch", "median ms", "p90 ms", "ms/image", "img/s", "peak MB"), label_width)
    for r in result["results"]:
        memory = f"{r['peak_memory_mb']:.1f}" if r["peak_memory_mb"] is not None else "-"
        speed.add_row(
            r["model"],
            r["backend"],
            str(r["batch_size"]),
            f"{r['median_s'] * 1e3:.2f}",
            f"{r['p90_s'] * 1e3:.2f}",
            f"{r['ms_per_image']:.3f}",
            f"{r['images_per_s']:.1f}",
            memory,
        )
    console.print(speed)
    kinds = sorted({r["memory_kind"] for r in result["results"]} - {"unavailable"})
    if kinds:
        console.print("peak MB (10^6 bytes): " + "; ".join(kinds), soft_wrap=True)
    for ratio in result["ratios"]:
        console.print(ratio_sentence(ratio), soft_wrap=True)
    for skipped in result["skipped"]:
        console.print(f"skipped {skipped['model']} / {skipped['backend']}: {skipped['reason']}")


def _add_columns(table, names, label_width: int) -> None:
    # the model column keeps room for its labels; headers of the number columns wrap instead
    for name in names:
        if name == "model":
            table.add_column(name, overflow="fold", min_width=label_width)
        else:
            table.add_column(name, justify="left" if name == "backend" else "right")
