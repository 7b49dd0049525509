"""Full-size speed of the paper's pair: ViT-B/16 (12 blocks) against its 6-block student, random weights.

    .venv/bin/python benchmarks/bench_models.py                       # CPU, batch sizes 1,32,64, eager
    .venv/bin/python benchmarks/bench_models.py --device cuda --backends eager,bf16,bf16-compile
    .venv/bin/python benchmarks/bench_models.py --batch-sizes 1,256 --backends eager,onnx --seconds 60

A thin wrapper around `skindistil benchmark` (same runner, same reports): any other benchmark option
(--threads, --warmup, --repeats, --min-repeats, --out, ...) is passed through. Defaults: batch sizes
1,32,64 on the CPU (256 takes minutes per call on a few cores) and 1,256 on CUDA; reports go to
runs/benchmark/vit_b16_vs_6 unless --out is given.

With --timm-reference (the default on CUDA) the same process then times the yardstick of the issue:
plain timm models (`timm.create_model`, nothing of skindistil) under torch.compile and bf16 autocast,
teacher and student round-robin, and writes reference.md/json beside the benchmark: for each model and
batch size, the fastest skindistil backend's images/s as a fraction of the plain-timm figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from skindistil.cli import main as skindistil_main
from skindistil.markdown import markdown_table

TEACHER = "vit_base_patch16_224"
STUDENT = "vit_base_patch16_224@6"
NUM_CLASSES = 8  # what `skindistil benchmark` gives architecture specs


def plain_timm_throughput(batch_sizes, device: str, *, warmup: int = 3, repeats: int = 30) -> dict:
    """images/s of plain timm ViT-B/16 and its 6-block version, torch.compile + bf16 autocast.

    Written without skindistil's runner on purpose: it is the yardstick the runner is judged by.
    Per batch size: compile and warm both models, then time `repeats` rounds, one call of each model
    per round (CUDA synchronised after each call), and take the median seconds per call.
    """
    import timm
    import torch

    dev = torch.device(device)
    models = {
        TEACHER: timm.create_model(TEACHER, num_classes=NUM_CLASSES),
        STUDENT: timm.create_model(TEACHER, num_classes=NUM_CLASSES, depth=6),
    }
    out: dict[str, dict[int, float]] = {label: {} for label in models}
    for batch_size in batch_sizes:
        torch._dynamo.reset()
        compiled = {label: torch.compile(m.eval().to(dev)) for label, m in models.items()}
        x = torch.randn(batch_size, 3, 224, 224, device=dev)
        spent: dict[str, list[float]] = {label: [] for label in models}
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            for fn in compiled.values():
                for _ in range(warmup):
                    fn(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            for _ in range(repeats):
                for label, fn in compiled.items():
                    t0 = time.perf_counter()
                    fn(x)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    spent[label].append(time.perf_counter() - t0)
        for label, times in spent.items():
            times.sort()
            out[label][batch_size] = batch_size / times[len(times) // 2]
    return out


def compare_with_reference(bench: dict, reference: dict) -> list[dict]:
    """Per model and batch size: the fastest skindistil backend against the plain-timm figure."""
    rows = []
    for label, by_batch in reference.items():
        for batch_size, ref_ips in by_batch.items():
            cells = [r for r in bench["results"] if r["model"] == label and r["batch_size"] == batch_size]
            if not cells:
                continue
            best = max(cells, key=lambda r: r["images_per_s"])
            rows.append(
                {
                    "model": label,
                    "batch_size": batch_size,
                    "best_backend": best["backend"],
                    "best_images_per_s": best["images_per_s"],
                    "timm_bf16_compile_images_per_s": ref_ips,
                    "fraction": best["images_per_s"] / ref_ips,
                }
            )
    return rows


def reference_markdown(rows: list[dict], device_name: str) -> str:
    table = markdown_table(
        ["model", "batch", "fastest backend", "its images/s", "plain timm images/s", "fraction"],
        [[r["model"], str(r["batch_size"]), r["best_backend"], f"{r['best_images_per_s']:.1f}",
          f"{r['timm_bf16_compile_images_per_s']:.1f}", f"{r['fraction']:.3f}"] for r in rows],
    )
    return f"# Fastest skindistil backend vs plain timm + bf16 autocast + torch.compile ({device_name})\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", help="default 1,32,64 on cpu, 1,256 on cuda")
    parser.add_argument("--backends", default="eager")
    parser.add_argument("--out", default="runs/benchmark/vit_b16_vs_6")
    parser.add_argument(
        "--timm-reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time plain timm + bf16 autocast + torch.compile (default: on for cuda)",
    )
    args, passthrough = parser.parse_known_args(argv)
    batch_sizes = args.batch_sizes or ("1,32,64" if args.device == "cpu" else "1,256")
    status = skindistil_main(
        [
            "benchmark",
            "--models",
            TEACHER,
            STUDENT,
            "--pair",
            TEACHER,
            STUDENT,
            "--device",
            args.device,
            "--batch-sizes",
            batch_sizes,
            "--backends",
            args.backends,
            "--out",
            args.out,
            *passthrough,
        ]
    )
    reference = args.timm_reference if args.timm_reference is not None else args.device.startswith("cuda")
    if status != 0 or not reference:
        return status
    out = Path(args.out)
    bench = json.loads((out / "bench.json").read_text())
    sizes = [int(b) for b in batch_sizes.split(",")]
    rows = compare_with_reference(bench, plain_timm_throughput(sizes, args.device))
    text = reference_markdown(rows, bench["machine"]["device_name"])
    (out / "reference.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "reference.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
