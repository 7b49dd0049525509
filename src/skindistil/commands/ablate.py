"""`skindistil ablate`: train the SkinDistilViT student with each loss term removed in turn."""

from __future__ import annotations

import argparse

from skindistil.commands.distill import FLAG_KEYS as DISTILL_FLAG_KEYS
from skindistil.commands.distill import add_student_arguments

FLAG_KEYS = {flag: key for flag, key in DISTILL_FLAG_KEYS.items() if flag not in ("method", "min_depth")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_student_arguments(p)
    p.add_argument("--cos-weight", type=float, default=0.1,
                   help="cosine weight of the full variant when --a-cos is 0, so its removal is ablated too "
                        "(default 0.1; 0 leaves the cosine term out)")
    p.add_argument("--device", help="where to score the variants (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.commands.common import resolve_config
    from skindistil.config import DistillConfig
    from skindistil.experiments.ablation import run_ablation

    if args.name is None and not args.config:
        args.name = "ablation"
    cfg = resolve_config(args, DistillConfig, FLAG_KEYS)
    result = run_ablation(cfg, cos_weight=args.cos_weight, resume=args.resume, device=args.device)
    if result:
        console = Console()
        console.print(f"teacher test BMA {result['teacher']['test_balanced_accuracy']:.4f}")
        for row in result["variants"]:
            console.print(f"{row['variant']:>8}  val BMA {row['val_balanced_accuracy']:.4f}  "
                          f"test BMA {row['test_balanced_accuracy']:.4f}  retention {row['retention_pct']:.2f}%")
        console.print(f"wrote {result['files']['md']}")
    return 0
