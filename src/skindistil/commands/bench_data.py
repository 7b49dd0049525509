"""`skindistil bench-data`: prepare throughput and training-loader throughput, as a table.

Examples:
    skindistil bench-data --data-root /work/shared/data/ham10000 --images 500
    skindistil bench-data --source synthetic --images 200 --seconds 1 --json bench.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from skindistil.data.sources import available_sources, build_source
from skindistil.errors import ConfigError
from skindistil.files import write_json

if TYPE_CHECKING:
    from skindistil.bench.data import BenchResult
# the loader benchmark itself (torch, Lightning) is imported in run(): `skindistil --help` stays fast


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset folder (or file) of --source; 'builtin' for synthetic")
    parser.add_argument("--source", default="ham10000", choices=available_sources(), help="dataset layout (default ham10000)")
    parser.add_argument("--images", type=int, default=500, help="images to prepare and load (default 500)")
    parser.add_argument("--workers", type=int, help="loader/prepare processes for the all-cores rows (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="loader batch size (default 64)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each loader measurement (default 3)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--target-cores", type=int,
                        help="cores of the training machine for the extrapolated rows (default 16)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from skindistil.bench.data import TARGET_CORES, TARGET_IMAGES_PER_SECOND, bench_data
    from skindistil.config import PreprocessConfig

    args.target_cores = args.target_cores or TARGET_CORES

    if args.images < 2 or args.batch_size < 1 or args.seconds <= 0:
        raise ConfigError("--images must be >= 2, --batch-size >= 1 and --seconds > 0")
    root = args.data_root
    if root is None:
        if args.source != "synthetic":
            raise ConfigError(f"--data-root is required for --source {args.source}")
        root = "builtin"
    source = build_source(args.source, root)
    console = Console()
    with console.status("measuring (prepare, then each loader path)..."):
        result = bench_data(source, num_images=args.images, workers=args.workers, batch_size=args.batch_size,
                            seconds=args.seconds, preprocess=PreprocessConfig(image_size=args.image_size),
                            target_cores=args.target_cores)
    console.print(result_table(result))
    for line in LEGEND:
        console.print(line.format(cores=args.target_cores), highlight=False)
    console.print(f"target: {TARGET_IMAGES_PER_SECOND:,} augmented {args.image_size} px samples/s on "
                  f"{args.target_cores} cores + 1 GPU (the student trains at about 4,800 img/s on one H100)")
    if args.json is not None:
        write_json(args.json, result.to_dict())
        console.print(f"wrote {args.json}")
    return 0


LEGEND = (
    'loader rows: "cpu" = DataLoader workers running the per-sample torchvision v2 train transform (float32, '
    'fully augmented); "device" = workers only loading uint8 squares from the cache, which BatchAugment then '
    "augments batch-wise on the GPU. workers=0: in the main process on one core, per-core rate from CPU time "
    "(robust to other load on the machine). augment rows: workers = torch threads.",
    "EXTRAPOLATED: per-core rate x {cores} cores (the reference training machine), not measured.",
    "LOWER BOUND: without a GPU, BatchAugment's best CPU rate stands in for the GPU's (far higher).",
)


def result_table(result: BenchResult) -> Table:
    settings = result.settings
    table = Table(title=f"{settings['source']}: {settings['num_images']} images, batch {settings['batch_size']}, "
                        f"{settings['image_size']} px")
    for name, justify in (("stage", "left"), ("path", "left"), ("workers", "right"), ("img/s", "right"),
                          ("per core", "right"), ("kind", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "path")
    for row in result.rows:
        style = None if row.note.startswith("measured") else "italic yellow"
        per_core = f"{row.per_core:,.0f}" if row.per_core is not None else "-"
        table.add_row(row.stage, row.path, str(row.workers), f"{row.images_per_second:,.0f}", per_core, row.note,
                      style=style)
    return table
