"""Exact and near-duplicate images: perceptual hashes, duplicate clusters, the check between datasets.

Two images are duplicates when their files are byte-identical (equal sha256; for file-less sources,
equal decoded pixels) or when their perceptual hashes are within `threshold` bits (a near
duplicate: the same photograph re-encoded, resized or slightly cropped).

The perceptual hash (`perceptual_hash`) is imagehash's pHash with a 16x16 DCT block (256 bits) of the
grey image, computed for the whole image and for 15 crops of it (`WINDOWS`: per axis the whole
length, or 95% of it starting at 0, 2.5% or 5%), so 16 hashes per image. The distance of two images
is the smallest Hamming distance between the whole-image hash of one and any window hash of the other,
in either direction: a copy cropped by up to 5% on any side is compared with the matching crop of the
original. Measured on the 7,005 HAM10000 images (benchmarks/duplicate_hash.py, 300 copies each):
re-encoding at JPEG quality 70, halving or tripling the size, cropping 5% at a corner, around the
centre or off one side all stay within 16 bits; crops of up to 5% a side at random offsets reach 38
(95th percentile 30; 93% within the threshold). Of the 24.5 million pairs of images filed under
different lesions, DEFAULT_THRESHOLD (28 bits) joins one, ISIC_0027027 / ISIC_0029036 at 18 bits: one
lesion of one patient photographed twice and filed under two lesion ids; other pairs begin above
the threshold (3 within 32 bits, 12 within 36). Smooth, low-detail images (the synthetic source) do
match other images at 20-28 bits.

Duplicate images are joined into clusters (connected components of the duplicate links) and each
cluster into one split group with every lesion group it touches, so that no duplicate sits on two
sides of a split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from skindistil.errors import DataError

if TYPE_CHECKING:  # pandas is imported where it is used: `skindistil --help` imports this module
    import pandas as pd

MODES = ("keep", "group", "drop")
# Identifies the hash (algorithm, size, windows): hashes of different methods are never compared.
METHOD = "imagehash-phash16-w16"
HASH_SIZE = 16
DEFAULT_THRESHOLD = 28
_AXIS = ((0.0, 1.0), (0.0, 0.95), (0.025, 0.95), (0.05, 0.95))  # (start, length) as fractions of a side
WINDOWS = tuple((x0, y0, width, height) for (y0, height) in _AXIS for (x0, width) in _AXIS)
HASH_BITS = HASH_SIZE * HASH_SIZE
HASH_CHARS = len(WINDOWS) * HASH_BITS // 4
_BASE = 128  # the grey image is first reduced to _BASE x _BASE; windows are cut from it
_GEMM_CELLS = 1 << 24  # distance-matrix cells per block (64 MiB of float32)


def perceptual_hash(image: Image.Image) -> str:
    """The 16 window pHashes of a decoded image as one hex string of HASH_CHARS (1,024) characters.

    Each window of the grey image is resampled (Lanczos) to the 64x64 pixels pHash reads, then
    `imagehash.phash(window, 16)` gives 256 bits (64 hex characters); windows in `WINDOWS` order.
    """
    import imagehash

    grey = image.convert("L").resize((_BASE, _BASE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    side = 4 * HASH_SIZE  # imagehash.phash's default highfreq_factor 4
    parts = []
    for x0, y0, width, height in WINDOWS:
        box = (x0 * _BASE, y0 * _BASE, (x0 + width) * _BASE, (y0 + height) * _BASE)
        window = grey.resize((side, side), Image.Resampling.LANCZOS, box=box)
        parts.append(str(imagehash.phash(window, HASH_SIZE)))
    return "".join(parts)


def hash_bits(hashes: Sequence[str], where: str = "phash") -> np.ndarray:
    """Hex hashes -> bits, shape (n, len(WINDOWS), HASH_BITS), uint8 0/1. DataError naming `where`."""
    bad = next((i for i, h in enumerate(hashes) if not isinstance(h, str) or len(h) != HASH_CHARS), None)
    if bad is not None:
        raise DataError(where, f"row {bad + 2}: perceptual hash is not {HASH_CHARS} hex characters")
    try:
        raw = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8)
    except ValueError:
        raise DataError(where, "perceptual hashes hold characters that are not hexadecimal") from None
    return np.unpackbits(raw).reshape(len(hashes), len(WINDOWS), HASH_BITS)


def _window_hits(query: np.ndarray, ref: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) where min over windows w of d(whole image query_i, window w of ref_j) <= threshold.

    Hamming distances come from one matrix product of +-1 vectors: d = (bits - a.b) / 2 (exact in
    float32 for 256 bits), in row blocks so memory stays bounded.
    """
    whole = query[:, 0].astype(np.float32) * 2 - 1
    # window-major, so the minimum over windows is an element-wise maximum of contiguous slabs
    windows = ref.transpose(1, 0, 2).reshape(-1, HASH_BITS).astype(np.float32) * 2 - 1
    num_ref, num_windows = ref.shape[0], ref.shape[1]
    rows = max(1, _GEMM_CELLS // max(1, len(windows)))
    found = []
    for start in range(0, len(whole), rows):
        dots = whole[start : start + rows] @ windows.T
        best = dots.reshape(-1, num_windows, num_ref).max(axis=1)
        i, j = np.nonzero(best >= HASH_BITS - 2 * threshold)
        found.append((i + start, j, np.rint((HASH_BITS - best[i, j]) / 2).astype(np.int64)))
    if not found:
        return (np.zeros(0, np.int64),) * 3
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


@dataclass(frozen=True)
class Link:
    """Two duplicate images (indices), `kind` "identical" (same content hash) or "near" (perceptual)."""

    a: int
    b: int
    kind: str
    distance: int


def find_links(
    sha256: Sequence[str],
    hashes: Sequence[str],
    threshold: int = DEFAULT_THRESHOLD,
    *,
    against_sha256: Sequence[str] | None = None,
    against_hashes: Sequence[str] | None = None,
    where: tuple[str, str] = ("phash", "phash (against)"),
) -> list[Link]:
    """Duplicate pairs within one set of images, or (with `against_*`) between two sets.

    Within one set: links (a, b) with a < b. Between two sets: a indexes the first set, b the second.
    Identical content wins over a perceptual match (its distance is the perceptual one, often 0).
    Sorted by (a, b). `where` names the two sets in errors (a malformed hash: DataError).
    """
    if threshold < 0:
        raise DataError("threshold", f"must be >= 0 bits, got {threshold}")
    within = against_hashes is None
    bits = hash_bits(list(hashes), where[0])
    other = bits if within else hash_bits(list(against_hashes), where[1])
    other_sha = sha256 if within else against_sha256
    # whole image of one side vs windows of the other, both ways (within one set, one product has both)
    hits = [_window_hits(bits, other, threshold)]
    if not within:
        j, i, d = _window_hits(other, bits, threshold)
        hits.append((i, j, d))
    pairs: dict[tuple[int, int], int] = {}
    for i, j, d in (hit for found in hits for hit in zip(*found, strict=True)):
        if within and i == j:
            continue
        key = (int(min(i, j)), int(max(i, j))) if within else (int(i), int(j))
        pairs[key] = min(int(d), pairs.get(key, int(d)))
    identical = set()
    index: dict[str, list[int]] = {}
    for j, digest in enumerate(other_sha):
        index.setdefault(digest, []).append(j)
    for i, digest in enumerate(sha256):
        for j in index.get(digest, ()):
            if within and j <= i:
                continue
            identical.add((i, j))
    links = []
    for key in sorted(set(pairs) | identical):
        distance = pairs.get(key)
        if distance is None:  # same bytes, so same pixels; the hashes say otherwise only if one is stale
            distance = image_distance(bits[key[0]], other[key[1]])
        links.append(Link(int(key[0]), int(key[1]), "identical" if key in identical else "near", distance))
    return links


def image_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Distance in bits of two images as prepare compares them: the smallest Hamming distance between
    the whole-image hash of one and any window hash of the other, either way. `a`, `b`: one image's
    rows of `hash_bits`, shape (len(WINDOWS), HASH_BITS)."""
    return int(min((a[0] != b).sum(axis=1).min(), (a != b[0]).sum(axis=1).min()))


def clusters_of(num_images: int, links: Sequence[Link]) -> list[list[int]]:
    """Connected components of the links with two or more images: sorted member lists, sorted by first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not links:
        return []
    rows = [link.a for link in links]
    cols = [link.b for link in links]
    graph = coo_matrix((np.ones(len(links)), (rows, cols)), shape=(num_images, num_images))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for i in sorted(set(rows) | set(cols)):
        members.setdefault(int(component[i]), []).append(i)
    return sorted(members.values())


def merged_groups(groups: Sequence[str | None], image_ids: Sequence[str], clusters: Sequence[Sequence[int]]) -> list[str | None]:
    """Split group per image: each duplicate cluster joined with every lesion group it touches.

    A merged group is named after the first (sorted) lesion group in it, so groups that touch no
    cluster, and clusters within one lesion, keep their names (and their splits); a cluster of
    images without lesion ids is named ``duplicates:<first image id>``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(groups)
    names = sorted({g for g in groups if g})
    node_of = {g: n + k for k, g in enumerate(names)}
    rows, cols = [], []
    for i, g in enumerate(groups):
        if g:
            rows.append(i)
            cols.append(node_of[g])
    for members in clusters:
        rows.extend(members[:1] * (len(members) - 1))
        cols.extend(members[1:])
    size = n + len(names)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    touched = {int(component[m]) for members in clusters for m in members}
    name_of: dict[int, str] = {}
    for g in names:  # sorted, so the first lesion group of a component names it
        name_of.setdefault(int(component[node_of[g]]), g)
    for members in clusters:
        comp = int(component[members[0]])
        name_of.setdefault(comp, f"duplicates:{min(image_ids[m] for m in members)}")
    return [name_of[int(component[i])] if int(component[i]) in touched else groups[i] for i in range(n)]


def kept_member(members: Sequence[int], pixels: Sequence[int], image_ids: Sequence[str], rank: Sequence[int] | None = None) -> int:
    """The member of a cluster that `--duplicates drop` keeps.

    The lowest `rank` first (with predefined splits: test 0, val 1, train 2, so official evaluation
    sets stay whole and the copies leave the training data), then the most pixels (the original
    rather than a downscaled copy), then the smallest image id.
    """
    return min(members, key=lambda m: (rank[m] if rank is not None else 0, -int(pixels[m]), image_ids[m]))


@dataclass
class ClusterInfo:
    """One duplicate cluster as reported in prepare_report.json.

    `splits[k]` is where images[k] went: a split name, or "dropped" (`--duplicates drop`) or
    "skipped" (a label conflict under `--on-error skip`).
    """

    images: list[str]
    classes: list[str]
    lesions: list[str | None]
    links: list[dict]
    splits: list[str] = field(default_factory=list)

    @property
    def joins_lesions(self) -> bool:
        """Not all one known lesion: the cluster merges split groups (or images without lesion ids)."""
        return len(set(self.lesions)) > 1 or None in self.lesions

    @property
    def label_conflict(self) -> bool:
        return len(set(self.classes)) > 1

    @property
    def straddles(self) -> bool:
        return len({s for s in self.splits if s not in ("dropped", "skipped")}) > 1

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "classes": self.classes,
            "lesions": self.lesions,
            "splits": self.splits,
            "joins_lesions": self.joins_lesions,
            "label_conflict": self.label_conflict,
            "links": self.links,
        }

    def describe(self) -> str:
        return describe_cluster(self.to_dict())


def describe_cluster(cluster: dict) -> str:
    """One line for a cluster of prepare_report.json: each image with its class and split, then the links."""
    members = ", ".join(
        f"{image} ({cls}, {split})"
        for image, cls, split in zip(cluster["images"], cluster["classes"], cluster["splits"], strict=True)
    )
    kinds = ", ".join(sorted({f"{link['kind']} d={link['distance']}" for link in cluster["links"]}))
    return f"{members}: {kinds}"


@dataclass
class Resolution:
    """What `resolve_duplicates` decided. Indices refer to the images it was given."""

    kept: list[int]
    split_groups: list[str | None]  # per kept image
    clusters: list[ClusterInfo]
    cluster_members: list[list[int]]
    removed: dict[int, str]  # index -> "dropped" or "skipped"
    skipped: list[tuple[int, str]]  # (index, reason) for the problem list


def resolve_duplicates(
    *,
    image_ids: Sequence[str],
    sources: Sequence[str],
    classes: Sequence[str],
    groups: Sequence[str | None],
    sha256: Sequence[str],
    hashes: Sequence[str],
    pixels: Sequence[int],
    predefined: Sequence[str | None] | None = None,
    mode: str = "group",
    threshold: int = DEFAULT_THRESHOLD,
    on_error: str = "fail",
) -> Resolution:
    """Find duplicate clusters and apply `mode` (MODES).

    keep: every image stays, splits ignore the clusters (they are reported, with those that
    straddle splits). group: each cluster joins one split group with the lesion groups it touches.
    drop: one image per cluster stays (`kept_member`). A cluster whose members disagree on the class
    is refused when two of its byte-identical members do (every mode), and in drop mode (which
    member's label would be right?); refused means DataError naming the files (on_error "fail") or
    every member skipped ("skip"). Other label conflicts are reported, not refused (a near match
    may be two look-alike lesions).
    """
    if mode not in MODES:
        raise DataError("duplicates", f"must be one of {', '.join(MODES)}, got {mode!r}")
    n = len(image_ids)
    links = find_links(sha256, hashes, threshold)
    # members by image id, clusters by their first image id: the order of the report
    members_of = sorted((sorted(m, key=image_ids.__getitem__) for m in clusters_of(n, links)), key=lambda m: image_ids[m[0]])
    rank = None
    if predefined is not None:
        rank = [{"test": 0, "val": 1}.get(s, 2) for s in predefined]
    removed: dict[int, str] = {}
    skipped: list[tuple[int, str]] = []
    clusters = []
    for members in members_of:
        inside = set(members)
        cluster_links = [link for link in links if link.a in inside]
        identical_conflict = any(
            link.kind == "identical" and classes[link.a] != classes[link.b] for link in cluster_links
        )
        if len({classes[m] for m in members}) > 1 and (identical_conflict or mode == "drop"):
            what = "byte-identical images" if identical_conflict else "duplicate images"
            listed = ", ".join(f"{sources[m]} ({classes[m]})" for m in members)
            reason = f"{what} with different labels: {listed}"
            if on_error == "fail":
                hint = "" if identical_conflict else "; --duplicates group keeps them and reports the conflict"
                raise DataError(sources[members[0]], f"{reason}{hint}")
            for m in members:
                removed[m] = "skipped"
                skipped.append((m, reason))
        elif mode == "drop":
            keep = kept_member(members, pixels, image_ids, rank)
            removed.update((m, "dropped") for m in members if m != keep)
        clusters.append(
            ClusterInfo(
                images=[image_ids[m] for m in members],
                classes=[classes[m] for m in members],
                lesions=[groups[m] for m in members],
                links=[
                    {"a": image_ids[link.a], "b": image_ids[link.b], "kind": link.kind, "distance": link.distance}
                    for link in cluster_links
                ],
            )
        )
    kept = [i for i in range(n) if i not in removed]
    position = {i: k for k, i in enumerate(kept)}
    kept_groups = [groups[i] for i in kept]
    if mode == "group":
        remaining = [[position[m] for m in members] for members in members_of if members[0] in position]
        kept_groups = merged_groups(kept_groups, [image_ids[i] for i in kept], remaining)
    return Resolution(kept, kept_groups, clusters, members_of, removed, skipped)


CROSS_COLUMNS = [
    "image_id", "split", "class_name", "source",
    "against_image_id", "against_split", "against_class_name", "against_source",
    "kind", "distance",
]  # fmt: skip


def cross_duplicates(
    manifest: pd.DataFrame,
    against: pd.DataFrame,
    threshold: int = DEFAULT_THRESHOLD,
    where: tuple[str, str] = ("manifest", "against manifest"),
) -> pd.DataFrame:
    """Every image of `manifest` that duplicates an image of `against`: one row per pair (CROSS_COLUMNS).

    Both are prepared manifests (skindistil.data.prepare.load_manifest) with `sha256` and `phash`;
    nothing is decoded; `where` names them in errors. Rows sorted by image_id, then against_image_id.
    """
    import pandas as pd

    links = find_links(
        manifest["sha256"].tolist(),
        manifest["phash"].tolist(),
        threshold,
        against_sha256=against["sha256"].tolist(),
        against_hashes=against["phash"].tolist(),
        where=where,
    )
    rows = []
    for link in links:
        a, b = manifest.iloc[link.a], against.iloc[link.b]
        rows.append(
            [a["image_id"], a["split"], a["class_name"], a["source"],
             b["image_id"], b["split"], b["class_name"], b["source"], link.kind, link.distance]
        )  # fmt: skip
    frame = pd.DataFrame(rows, columns=CROSS_COLUMNS)
    return frame.sort_values(["image_id", "against_image_id"], ignore_index=True)
