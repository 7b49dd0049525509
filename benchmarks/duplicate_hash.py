"""How well the near-duplicate hash separates copies of an image from other lesions, on real images.

    .venv/bin/python benchmarks/duplicate_hash.py                          # ../shared/data/ham10000
    .venv/bin/python benchmarks/duplicate_hash.py --root DIR --sample 300 --out runs/duplicate_hash

Hashes every image of a HAM10000 folder (skindistil.data.duplicates.perceptual_hash), then for a
seeded sample re-encodes, resizes and crops each image and measures the distance of the copy to
its original (the distance prepare compares with the threshold). Counts the pairs of images of
*different* lesions within each distance (false matches), and lists those within the threshold.
Writes OUT/duplicate_hash.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np


def _jpeg(image, quality=70):
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image, left, top, right, bottom):
    width, height = image.size
    return image.crop((round(left * width), round(top * height), width - round(right * width), height - round(bottom * height)))


def _resize(image, scale):
    from PIL import Image

    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


def _random_crop(rng, fraction):
    """Up to `fraction` of each side's length removed, split at random between its two ends."""
    cut_x, cut_y = rng.uniform(0, fraction, 2)
    share_x, share_y = rng.uniform(0, 1, 2)
    return lambda im: _crop(im, cut_x * share_x, cut_y * share_y, cut_x * (1 - share_x), cut_y * (1 - share_y))


TRANSFORMS = {
    "JPEG quality 70": lambda im, rng: _jpeg(im),
    "resize x0.5": lambda im, rng: _resize(im, 0.5),
    "resize x3": lambda im, rng: _resize(im, 3),
    "crop 5% at a corner": lambda im, rng: _crop(im, 0, 0, 0.05, 0.05),
    "crop 5% around the centre": lambda im, rng: _crop(im, 0.025, 0.025, 0.025, 0.025),
    "crop 5% of the left side": lambda im, rng: _crop(im, 0.05, 0, 0, 0),
    "crop <=3% at random": lambda im, rng: _random_crop(rng, 0.03)(im),
    "crop <=5% at random": lambda im, rng: _random_crop(rng, 0.05)(im),
    "crop <=5% + x0.5 + JPEG 70": lambda im, rng: _jpeg(_resize(_random_crop(rng, 0.05)(im), 0.5)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/ham10000", help="HAM10000 folder (metadata CSV + images/)")
    parser.add_argument("--sample", type=int, default=300, help="images transformed (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upto", type=int, default=40, help="count false matches up to this distance (default 40)")
    parser.add_argument("--out", default="runs/duplicate_hash")
    args = parser.parse_args(argv)

    import pandas as pd
    from PIL import Image

    from skindistil.data.duplicates import (
        DEFAULT_THRESHOLD,
        find_links,
        hash_bits,
        image_distance,
        perceptual_hash,
    )

    root = Path(args.root)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    images = [Image.open(root / "images" / f"{i}.jpg").convert("RGB") for i in meta["image_id"]]
    started = time.perf_counter()
    hashes = [perceptual_hash(image) for image in images]
    hash_seconds = time.perf_counter() - started
    bits = hash_bits(hashes)

    rng = np.random.default_rng(args.seed)
    sample = rng.choice(len(images), min(args.sample, len(images)), replace=False)
    copies = {}
    for name, transform in TRANSFORMS.items():
        copy_bits = hash_bits([perceptual_hash(transform(images[i], rng)) for i in sample])
        distances = np.array([image_distance(c, bits[i]) for c, i in zip(copy_bits, sample, strict=True)])
        copies[name] = {
            "median": float(np.median(distances)),
            "p95": float(np.percentile(distances, 95)),
            "max": int(distances.max()),
            "matched_at_threshold": float((distances <= DEFAULT_THRESHOLD).mean()),
        }

    started = time.perf_counter()
    links = find_links([str(i) for i in range(len(hashes))], hashes, args.upto)  # perceptual links only
    search_seconds = time.perf_counter() - started
    lesion = meta["lesion_id"].to_numpy()
    image_id = meta["image_id"].to_numpy()
    different = [link for link in links if lesion[link.a] != lesion[link.b]]
    same = [link for link in links if lesion[link.a] == lesion[link.b]]
    n = len(images)
    distinct_pairs = n * (n - 1) // 2 - int(sum(c * (c - 1) // 2 for c in meta["lesion_id"].value_counts()))
    cumulative = {t: sum(link.distance <= t for link in different) for t in range(0, args.upto + 1, 4)}
    result = {
        "images": n,
        "hash_ms_per_image": round(1000 * hash_seconds / n, 2),
        "search_seconds": round(search_seconds, 1),
        "threshold": DEFAULT_THRESHOLD,
        "copies": copies,
        "different_lesion_pairs": distinct_pairs,
        "different_lesion_pairs_within": cumulative,
        "false_matches_at_threshold": [
            {"a": image_id[link.a], "b": image_id[link.b], "distance": link.distance}
            for link in different
            if link.distance <= DEFAULT_THRESHOLD
        ],
        "same_lesion_pairs_within_threshold": sum(link.distance <= DEFAULT_THRESHOLD for link in same),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "duplicate_hash.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{n} images, hashing {result['hash_ms_per_image']} ms/image, all-pairs search {result['search_seconds']} s")
    print(f"| copy of a real image | median | p95 | max | matched at <= {DEFAULT_THRESHOLD} |\n| --- | --- | --- | --- | --- |")
    for name, c in copies.items():
        print(f"| {name} | {c['median']:g} | {c['p95']:g} | {c['max']} | {100 * c['matched_at_threshold']:.1f}% |")
    print(f"pairs of different lesions ({distinct_pairs:,}) within distance t: {cumulative}")
    print(f"false matches at {DEFAULT_THRESHOLD}: {result['false_matches_at_threshold']}")
    print(f"same-lesion pairs within {DEFAULT_THRESHOLD}: {result['same_lesion_pairs_within_threshold']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
