"""`skindistil predict`: class probabilities for image files, folders or a CSV of paths.

    skindistil predict --model runs/student/model photos/ more.jpg --out predictions.csv --tta
    skindistil predict --model runs/student lesions.csv --out predictions.json --top-k 3

Inputs are found by `skindistil.data.discovery.discover_images`: folders recursively, hidden and OS
metadata files (._*, __MACOSX, .DS_Store, Thumbs.db, desktop.ini) left out, every other file not
taken listed with the reason. Output: ISIC challenge CSV (image = file stem, one probability column
per class in the model's order) with a sidecar FILE.errors.csv when an input failed or was not taken,
or JSON with the top-k classes and `errors` / `skipped` sections; without --out a table of the top-k
classes is printed. Unreadable inputs and files not taken are listed with the reason on stderr and the
rest are predicted. Exit code 0 if any image was predicted, 1 if none.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="artifact: model/ or run directory"
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (searched recursively for jpg/jpeg/png/bmp/tif/webp/heic/heif/avif) or "
        "CSVs with a 'path' or 'image' column (paths relative to the CSV's folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="FILE.csv (ISIC format) or FILE.json (default: print a top-k table)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average probabilities over identity, horizontal, vertical and both flips",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N (default auto: cuda for PyTorch backends when available)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        help="torch (PyTorch fp32), onnx, onnx-int8, bf16, compile, bf16-compile or fast (default torch)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=3,
        help="classes listed per image in JSON output and the table (default 3)",
    )
    parser.add_argument(
        "--operating-point",
        metavar="NAME",
        help="report the binary decision at a stored operating point (e.g. cancer@sens95, melanoma@spec90; "
        "`all` or `none`); default: the point the artifact names as default, when it stores any "
        "(`skindistil evaluate --operating-point`)",
    )
    parser.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from skindistil.data.discovery import discover_images
    from skindistil.errors import ConfigError
    from skindistil.inference.backends import BACKENDS
    from skindistil.inference.predictor import (
        BACKEND_ALIASES,
        Predictor,
        select_operating_points,
        write_predictions,
    )

    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out {args.out}: the output file must end in .csv or .json")
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be at least 1")
    err = Console(stderr=True, soft_wrap=True)
    device = args.device
    if device == "auto":
        backend = BACKEND_ALIASES.get(args.backend, args.backend)
        on_torch = backend in BACKENDS and BACKENDS[backend].runtime == "torch"
        device = "cuda" if on_torch and torch.cuda.is_available() else "cpu"

    found = discover_images(args.inputs, read_lists=True)
    paths = found.files
    predictor = Predictor(
        args.model,
        device=device,
        backend=args.backend,
        batch_size=args.batch_size,
        tta=args.tta,
        workers=args.workers,
    )
    points, warning = select_operating_points(predictor.loaded, args.operating_point, tta=args.tta)
    if warning:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    columns = [TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=args.no_progress) as progress:
        task = progress.add_task("predict", total=len(paths))
        result = predictor.predict_files(
            paths, on_progress=lambda done, total: progress.update(task, completed=done)
        )
    result.skipped = found.not_taken
    result.operating_points = points

    for problem in result.skipped:
        err.print(f"not taken {problem.where}: {problem.reason}", markup=False, highlight=False)
    for problem in result.errors:
        err.print(f"failed {problem.where}: {problem.reason}", markup=False, highlight=False)
    duplicates = sorted(i for i, n in Counter(result.ids).items() if n > 1)
    if duplicates:
        err.print(
            f"warning: {len(duplicates)} image id(s) occur more than once (one stem in several folders, or with several extensions): "
            f"{', '.join(duplicates[:5])}",
            markup=False,
        )
    meta = {"model": str(predictor.loaded.path), "backend": predictor.backend, "tta": predictor.tta}
    if args.out is None:
        _print_top_k(Console(), result, args.top_k)
    else:
        written = write_predictions(result, args.out, top_k=args.top_k, meta=meta)
        err.print(f"wrote {', '.join(map(str, written))}", markup=False, highlight=False)
    summary = f"predicted {len(result.ids)} image(s), {len(result.errors)} failed, {len(result.skipped)} not taken"
    if found.ignored:
        summary += f" ({found.ignored} hidden or OS metadata file(s) ignored)"
    err.print(summary, highlight=False)
    return 0 if len(result.ids) else 1


def _print_top_k(console, result, k: int) -> None:
    from rich.table import Table

    top = result.top_k(k)
    decisions = result.decisions()
    table = Table(title=f"top-{len(top[0]) if top else k} classes")
    table.add_column("image")
    for rank in range(len(top[0]) if top else 0):
        table.add_column(f"#{rank + 1}", justify="right")
    for name, point in result.operating_points.items():
        table.add_column(f"{name} (score >= {point['threshold']:.4g})", justify="right")
    for i, (image_id, row) in enumerate(zip(result.ids, top, strict=True)):
        cells = [f"{'positive' if positive[i] else 'negative'} ({scores[i]:.3f})" for scores, positive in decisions.values()]
        table.add_row(image_id, *(f"{name} {prob:.1%}" for name, prob in row), *cells)
    console.print(table)
