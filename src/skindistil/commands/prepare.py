"""`skindistil prepare`: decode, border-crop, resize and cache a dataset; write manifest and splits.

Examples:
    skindistil prepare --source ham10000 --root data/ham10000 --out prepared/ham
    skindistil prepare --source ham10000 --labels isic2019 --root data/ham10000 --out prepared/ham8 --folds 5
    skindistil prepare --source isic2019 --root data/ISIC2019 --out prepared/isic --on-error skip
    skindistil prepare --source dermamnist --root dermamnist_224.npz --out prepared/derma
    skindistil prepare --source csv --root my_images/labels.csv --out prepared/mine --limit 200
    skindistil prepare --source isic2018 --root data/ISIC2018 --out prepared/isic2018
    skindistil prepare --source isic2020 --labels diagnosis --root data/siim-isic-2020 --out prepared/isic2020
    skindistil prepare --source isic2024 --root data/isic-2024-challenge --out prepared/isic2024
    skindistil prepare --source isic2019 --root data/ISIC2019 --out prepared/isic --duplicates drop
    skindistil prepare --source ham10000 --root data/ham10000 --out prepared/ham --masks data/ham10000/masks
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from skindistil.data.duplicates import DEFAULT_THRESHOLD, MODES
from skindistil.data.imageio import DEFAULT_MAX_PIXELS
from skindistil.data.sources import ON_ERROR_CHOICES, available_sources
from skindistil.data.splits import DEFAULT_FRACTIONS, SPLIT_NAMES
from skindistil.errors import ConfigError

# CLI flag -> source constructor option, for options only some sources take.
_SOURCE_FLAGS = {
    "labels": "--labels",
    "ground_truth": "--ground-truth",
    "metadata": "--metadata",
    "image_dirs": "--image-dir",
    "class_names": "--class-names",
}
_SHOWN_PROBLEMS = 10


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {len(SPLIT_NAMES)} comma-separated numbers, got {text!r}") from None
    if len(values) != len(SPLIT_NAMES):
        raise argparse.ArgumentTypeError(
            f"expected {len(SPLIT_NAMES)} fractions ({'/'.join(SPLIT_NAMES)}), got {text!r}"
        )
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=available_sources(), help="dataset layout")
    parser.add_argument(
        "--root",
        help="dataset folder (isic2016-isic2024, ham10000, folder), .npz file (dermamnist) or CSV file (csv)",
    )
    parser.add_argument("--out", required=True, metavar="DATA_DIR", help="prepared dataset folder to write")
    parser.add_argument("--short-side", type=int, default=256, help="cached shorter side in pixels (default 256)")
    parser.add_argument(
        "--border-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="crop the black dermoscope vignette before resizing (default on)",
    )
    parser.add_argument(
        "--split",
        type=_fractions,
        default=DEFAULT_FRACTIONS,
        metavar="TRAIN,VAL,TEST",
        help="split fractions (default 0.7,0.15,0.15); ignored when the source has official splits",
    )
    parser.add_argument("--folds", type=int, help="also assign K cross-validation folds over train+val")
    parser.add_argument("--seed", type=int, default=42, help="seed of the splits and of --limit (default 42)")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="fail",
        help="fail at the first bad row/image (default) or skip it and list it in prepare_report.json",
    )
    parser.add_argument("--workers", type=int, help="decoding processes (default: all cores; 0 or 1: inline)")
    parser.add_argument("--limit", type=int, help="prepare a class-stratified subset of N images")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject images above this many pixels (decompression bombs; default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--duplicates",
        choices=MODES,
        default="group",
        help="exact and near-duplicate images: group (default) puts each cluster in one split group, "
        "drop keeps one image per cluster, keep only reports them",
    )
    parser.add_argument(
        "--duplicate-threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        metavar="BITS",
        help=f"perceptual-hash distance up to which two images are near duplicates (default {DEFAULT_THRESHOLD} of 256)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--masks",
        metavar="DIR_OR_PATTERN",
        help="lesion masks to keep beside the images, cropped and resized like them (for `evaluate "
             "--localization`): a folder holding <stem>_segmentation.png (HAM10000, ISIC 2018), "
             "<stem>_Segmentation.png (ISIC 2016/2017), <stem>_mask.png or <stem>.png, or a pattern "
             "such as masks/{stem}_seg.png",
    )
    group = parser.add_argument_group("source options (only where they apply)")
    group.add_argument("--labels", help="ham10000: dx (7 classes, default) or isic2019 (8 classes); "
                                        "isic2020: target (benign/malignant, default) or diagnosis")
    group.add_argument("--ground-truth", help="isic20XX/ham10000: ground-truth CSV (default: the challenge's "
                                              "training file in --root; give a validation or test file to prepare those)")
    group.add_argument("--metadata", help="isic2017/2018/2019, ham10000: metadata or lesion-groupings CSV "
                                          "(default: in --root)")
    group.add_argument("--image-dir", dest="image_dirs", action="append",
                       help="isic20XX/ham10000: image folder (repeatable; isic2024: instead of train-image.hdf5)")
    group.add_argument("--class-names", help="csv/folder: comma-separated class order (default: sorted names)")


def run(args: argparse.Namespace) -> int:
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source, source_options

    options = {key: getattr(args, key) for key in _SOURCE_FLAGS if getattr(args, key) is not None}
    if "class_names" in options:
        options["class_names"] = [name.strip() for name in options["class_names"].split(",") if name.strip()]
    accepted = source_options(args.source)
    misplaced = [_SOURCE_FLAGS[key] for key in options if accepted is not None and key not in accepted]
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)} do(es) not apply to --source {args.source}")
    source = build_source(args.source, args.root, **options)
    result = prepare_dataset(
        source,
        args.out,
        short_side=args.short_side,
        border_crop=args.border_crop,
        fractions=args.split,
        folds=args.folds,
        seed=args.seed,
        on_error=args.on_error,
        workers=args.workers,
        limit=args.limit,
        max_pixels=args.max_pixels,
        progress=args.progress,
        duplicates=args.duplicates,
        duplicate_threshold=args.duplicate_threshold,
        masks=args.masks,
    )
    _print_summary(result, Console())
    return 0


def _print_summary(result, console: Console) -> None:
    table = Table(title=f"prepared {result.num_images} images in {result.data_dir}")
    table.add_column("class")
    for split in result.counts:
        table.add_column(split, justify="right")
    classes = next(iter(result.counts.values()))
    for name in classes:
        table.add_row(name, *(str(result.counts[split][name]) for split in result.counts))
    table.add_row("all", *(str(sum(c.values())) for c in result.counts.values()), style="bold")
    console.print(table)
    console.print(
        f"decoded {result.num_decoded}, reused from cache {result.num_reused}, "
        f"{result.images_per_second:.1f} img/s, total {result.timings['total']:.1f} s"
    )
    if result.num_masks:
        console.print(f"kept {result.num_masks} lesion mask(s) beside their images")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    _print_duplicates(result.duplicates, console)
    if result.problems:
        console.print(f"[yellow]skipped {len(result.problems)} item(s)[/] (all listed in prepare_report.json):")
        for problem in result.problems[:_SHOWN_PROBLEMS]:
            console.print(f"  {problem.where}: {problem.reason}", markup=False, highlight=False)
        if len(result.problems) > _SHOWN_PROBLEMS:
            console.print(f"  ... and {len(result.problems) - _SHOWN_PROBLEMS} more")


def _print_duplicates(report: dict, console: Console) -> None:
    from skindistil.data.duplicates import describe_cluster

    clusters = report["clusters"]
    if not clusters:
        console.print("duplicates: none found")
        return
    effect = {
        "group": "each cluster is one split group",
        "drop": f"one image kept per cluster, {report['num_dropped']} dropped",
        "keep": f"kept as they are, {report['straddling_splits']} cluster(s) on two sides of a split",
    }[report["mode"]]
    console.print(
        f"[yellow]duplicates: {len(clusters)} cluster(s) of {report['num_images_in_clusters']} images, "
        f"{report['num_joining_lesions']} across lesions or without lesion ids[/] "
        f"({effect}; all listed in prepare_report.json):",
        soft_wrap=True,
    )
    # the clusters that join lesions first: within one lesion a duplicate changes no split
    shown = sorted(clusters, key=lambda c: not c["joins_lesions"])[:_SHOWN_PROBLEMS]
    for cluster in shown:
        console.print(f"  {describe_cluster(cluster)}", markup=False, highlight=False, soft_wrap=True)
    if len(clusters) > _SHOWN_PROBLEMS:
        console.print(f"  ... and {len(clusters) - _SHOWN_PROBLEMS} more")
    conflicts = [c for c in clusters if c["label_conflict"]]
    if conflicts:
        console.print(f"[yellow]label conflicts: {len(conflicts)} cluster(s) whose images have different classes:[/]", soft_wrap=True)
        for cluster in conflicts[:_SHOWN_PROBLEMS]:
            console.print(f"  {describe_cluster(cluster)}", markup=False, highlight=False, soft_wrap=True)

