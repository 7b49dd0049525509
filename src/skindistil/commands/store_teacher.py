"""`skindistil store-teacher`: run a teacher once over the planned epochs and store its outputs."""

from __future__ import annotations

import argparse

FLAG_KEYS = {
    "teacher": "teacher",
    "data": "data.dir",
    "epochs": "trainer.max_epochs",
    "batch_size": "data.eval_batch_size",
    "seed": "trainer.seed",
    "a_cos": "loss.a_cos",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "workers": "data.num_workers",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher model/ or run directory")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--out", required=True, help="store directory (an interrupted store continues)")
    p.add_argument("--config", help="the distillation YAML recipe the store is for; flags and overrides apply on top")
    p.add_argument("--epochs", type=int, help="epochs to store (at least the students' trainer.max_epochs)")
    p.add_argument("--hidden", choices=["none", "cls", "all"],
                   help="teacher hidden tokens to store for the cosine term (default: what loss.a_cos and "
                        "loss.cos_tokens need)")
    p.add_argument("--a-cos", type=float, help="loss.a_cos of the students (with --hidden unset, > 0 stores hidden states)")
    p.add_argument("--seed", type=int, help="trainer.seed: the students' seed (augmentation replays it)")
    p.add_argument("--batch-size", type=int, help="teacher batch size (any: outputs do not depend on it)")
    p.add_argument("--device", help="where the teacher runs (default: cuda when available, else cpu)")
    p.add_argument("--accelerator")
    p.add_argument("--precision", help="trainer.precision (auto: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--workers", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.fold=0")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.commands.common import resolve_config
    from skindistil.config import DistillConfig
    from skindistil.training.teacher_store import (
        bytes_per_thousand_images_epoch,
        read_header,
        write_teacher_store,
    )

    cfg = resolve_config(args, DistillConfig, FLAG_KEYS)
    out = write_teacher_store(cfg, args.out, hidden=args.hidden, device=args.device, progress=not args.no_progress)
    header = read_header(out)
    Console().print(
        f"[bold]teacher store[/bold] {out}: {header['epochs_written']} epoch(s) x {header['dataset']['rows']} images, "
        f"hidden {header['hidden']}, {header['bytes'] / 1e6:.2f} MB "
        f"({bytes_per_thousand_images_epoch(header) / 1e6:.3f} MB per 1,000 images per epoch)"
    )
    return 0
