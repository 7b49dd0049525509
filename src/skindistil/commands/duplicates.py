"""`skindistil duplicates`: which images of one prepared dataset duplicate images of another.

Examples:
    skindistil duplicates --data prepared/external-test --against prepared/isic2019-train
    skindistil duplicates --data prepared/uda --against prepared/ham --out uda_in_ham.csv
"""

from __future__ import annotations

import argparse

_SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from skindistil.data.duplicates import DEFAULT_THRESHOLD

    parser.add_argument("--data", required=True, metavar="DATA_DIR", help="prepared dataset whose images are checked")
    parser.add_argument("--against", required=True, metavar="DATA_DIR", help="prepared dataset they are compared with")
    parser.add_argument(
        "--threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        metavar="BITS",
        help=f"perceptual-hash distance up to which two images are near duplicates (default {DEFAULT_THRESHOLD} of 256)",
    )
    parser.add_argument("--out", metavar="CSV", help="write every duplicate pair to this CSV")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from skindistil.data.prepare import duplicates_between

    pairs = duplicates_between(args.data, args.against, args.threshold)
    console = Console()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        pairs.to_csv(tmp, index=False)
        os.replace(tmp, out)
    if pairs.empty:
        console.print(f"no image of {args.data} duplicates an image of {args.against}", soft_wrap=True)
        return 0
    images = pairs.drop_duplicates("image_id")
    by_split = ", ".join(f"{split} {count}" for split, count in images["split"].value_counts().sort_index().items())
    console.print(
        f"[yellow]{len(images)} image(s) of {args.data} ({by_split}) duplicate "
        f"{pairs['against_image_id'].nunique()} image(s) of {args.against}[/] ({len(pairs)} pair(s))",
        soft_wrap=True,
    )
    table = Table()
    for column in ("image_id", "split", "class_name", "against_image_id", "against_split", "against_class_name", "kind", "distance"):
        table.add_column(column, justify="right" if column == "distance" else "left")
    for row in pairs.head(_SHOWN).itertuples():
        table.add_row(
            row.image_id, row.split, row.class_name, row.against_image_id, row.against_split,
            row.against_class_name, row.kind, str(row.distance),
        )  # fmt: skip
    console.print(table)
    if len(pairs) > _SHOWN:
        where = f"all in {args.out}" if args.out else "--out FILE.csv writes them all"
        console.print(f"... and {len(pairs) - _SHOWN} more pair(s) ({where})")
    return 0
