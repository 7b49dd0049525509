"""`skindistil demo`: prepare the built-in synthetic dataset and show what it holds.

Examples:
    skindistil demo
    skindistil demo --out /tmp/demo-data --images 400
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from skindistil.commands.prepare import _print_summary
from skindistil.data.prepare import prepare_dataset
from skindistil.data.sources import build_source
from skindistil.data.synthetic import DEFAULT_NUM_IMAGES

DEFAULT_OUT = "runs/demo-data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"prepared dataset folder (default {DEFAULT_OUT})")
    parser.add_argument("--images", type=int, default=DEFAULT_NUM_IMAGES,
                        help=f"number of synthetic images (default {DEFAULT_NUM_IMAGES})")
    parser.add_argument("--seed", type=int, default=42, help="seed of the images and the splits (default 42)")
    parser.add_argument("--workers", type=int, help="rendering processes (default: all cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    console = Console()
    started = time.perf_counter()
    source = build_source("synthetic", "builtin", num_images=args.images, seed=args.seed)
    result = prepare_dataset(source, args.out, seed=args.seed, workers=args.workers, progress=args.progress)
    _print_summary(result, console)
    console.print(f"demo data ready in {args.out} ({time.perf_counter() - started:.1f} s)")
    return 0
