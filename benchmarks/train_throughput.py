"""Training throughput of skindistil (train and distill) against the raw train step, in one run.

    .venv/bin/python benchmarks/train_throughput.py                  # CPU, tiny ViT, 600 synthetic images
    .venv/bin/python benchmarks/train_throughput.py --device cuda    # ViT-B/16 (-> 6 blocks), bf16, batch 256
    .venv/bin/python benchmarks/train_throughput.py --data DATA_DIR --modes teacher --epochs 2

For each mode (teacher: `skindistil train`'s loop; distill: SkinDistilViT's) it times the bare train
step on synthetic tensors already on the device, runs the real training on a prepared dataset
(default: the synthetic source, prepared once under OUT/data) and reads the training img/s the run
wrote (RUN/logs/throughput.json: data loading included, validation excluded). Prints the table and
writes OUT/train_throughput.{json,md}. Definitions: skindistil.bench.training.

Defaults by device: cuda: vit_base_patch16_224, batch 256, 4000 images (2,800 for training: 11
batches an epoch), 5 epochs, all cores as loader workers; cpu: a 4-block 64 px ViT (width 64),
batch 64, 600 images, 3 epochs. Augmentation runs on the device (BatchAugment) unless --augment-on
cpu. Models are ARCH[@DEPTH][:KEY=VALUE,...] specs (random weights); distill keeps the first half of
the blocks unless --keep-blocks K.
"""

from __future__ import annotations

import argparse
import sys

CPU_MODEL = "vit_base_patch16_224@4:embed_dim=64,num_heads=2,img_size=64,patch_size=8"
GPU_MODEL = "vit_base_patch16_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", help=f"architecture spec (default {GPU_MODEL} on cuda, {CPU_MODEL} on cpu)")
    parser.add_argument("--modes", default="teacher,distill", help="comma-separated: teacher, distill")
    parser.add_argument("--keep-blocks", "--keep", type=int,
                        help="student blocks for distill (first K; default half the model's)")
    parser.add_argument("--batch-size", type=int, help="default 256 on cuda, 64 on cpu")
    parser.add_argument("--epochs", type=int, help="epochs of each real run (default 5 on cuda, 3 on cpu)")
    parser.add_argument("--data", help="a prepared DATA_DIR (default: synthetic images prepared under OUT/data)")
    parser.add_argument("--images", type=int, help="synthetic images (default 4000 on cuda, 600 on cpu)")
    parser.add_argument("--short-side", type=int, help="synthetic cache shorter side (default 8/7 of the input)")
    parser.add_argument("--augment-on", choices=["device", "cpu"], default="device")
    parser.add_argument("--workers", type=int, help="loader workers (default: all cores on cuda, cores - 1 on cpu)")
    parser.add_argument("--precision", default="auto", help="auto (bf16-mixed on cuda, 32-true on cpu), bf16-mixed, 32-true")
    parser.add_argument("--raw-steps", type=int, default=20, help="timed raw steps (5 windows)")
    parser.add_argument("--raw-warmup", type=int, default=5, help="untimed raw steps first")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bar (as `skindistil train` does)")
    parser.add_argument("--out", default="runs/train_throughput", help="output folder (runs, data, results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    from skindistil.bench.specs import parse_arch_spec
    from skindistil.bench.training import (
        ComparisonSettings,
        markdown_table,
        rich_table,
        run_comparison,
        write_results,
    )
    from skindistil.errors import SkinDistilError

    console = Console()
    on_gpu = args.device.startswith("cuda")
    try:
        spec = parse_arch_spec(args.model or (GPU_MODEL if on_gpu else CPU_MODEL))
        kwargs = dict(spec.kwargs)
        if spec.depth is not None:
            kwargs["depth"] = spec.depth
        settings = ComparisonSettings(
            model_name=spec.name,
            model_kwargs=kwargs,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size or (256 if on_gpu else 64),
            epochs=args.epochs or (5 if on_gpu else 3),
            data_dir=args.data,
            images=args.images or (4000 if on_gpu else 600),
            short_side=args.short_side,
            augment_on=args.augment_on,
            workers=args.workers,
            keep_blocks=args.keep_blocks,
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
            raw_steps=args.raw_steps,
            raw_warmup=args.raw_warmup,
            progress=args.progress,
            out_dir=args.out,
        )
        rows = run_comparison(settings, log=lambda message: console.print(f"[dim]{message}[/dim]"))
    except SkinDistilError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if console.is_terminal:
        console.print(rich_table(rows))
    else:  # a log file gets the markdown table, which never wraps
        print(markdown_table(rows), end="")
    for row in rows:
        console.print(f"{row.mode}: raw {row.raw_before:.1f} before / {row.raw_after:.1f} after the run (img/s)")
    files = write_results(rows, settings, args.out)
    console.print(f"results: {files['json']}, {files['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
