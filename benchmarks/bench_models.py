"""Full-size speed of the paper's pair: ViT-B/16 (12 blocks) against its 6-block student, random weights.

    .venv/bin/python benchmarks/bench_models.py                       # CPU, batch sizes 1,32,64, eager
    .venv/bin/python benchmarks/bench_models.py --device cuda --backends eager,bf16,bf16-compile
    .venv/bin/python benchmarks/bench_models.py --batch-sizes 1,256 --backends eager,onnx --seconds 60

A thin wrapper around `skindistil benchmark` (same runner, same reports): any other benchmark option
(--threads, --warmup, --repeats, --min-repeats, --out, ...) is passed through. Defaults: batch sizes
1,32,64 on the CPU (256 takes minutes per call on a few cores) and 1,256 on CUDA; reports go to
runs/benchmark/vit_b16_vs_6 unless --out is given.
"""

from __future__ import annotations

import argparse
import sys

from skindistil.cli import main as skindistil_main

TEACHER = "vit_base_patch16_224"
STUDENT = "vit_base_patch16_224@6"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", help="default 1,32,64 on cpu, 1,256 on cuda")
    parser.add_argument("--backends", default="eager")
    parser.add_argument("--out", default="runs/benchmark/vit_b16_vs_6")
    args, passthrough = parser.parse_known_args(argv)
    batch_sizes = args.batch_sizes or ("1,32,64" if args.device == "cpu" else "1,256")
    return skindistil_main(
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


if __name__ == "__main__":
    sys.exit(main())
