"""Prepare a dataset once: decode, border-crop, resize and cache every image; split; write the manifest.

Layout of a prepared DATA_DIR (format 1):

    dataset.json          source, classes, preprocessing, split settings, per-split class counts, notes
    manifest.csv          one row per image (MANIFEST_COLUMNS, then the patient/lesion METADATA_FIELDS:
                          age, sex, site, patient_id, lesion_id); `cache_file` is relative to DATA_DIR
    cache/<hh>/<id>.npy   uint8 HWC RGB, shorter side = short_side (<hh>: 2 hex chars of sha1(id))
    cache/<hh>/<id>.mask.npy  with `masks`: the image's lesion mask, uint8 HW (0-255, lesion >= 128),
                          border-cropped by the image's box and resized to the cached image's size
    cache/journal.jsonl   one JSON line per cached image (its source hash and geometry)
    prepare_report.json   skipped items, duplicate clusters, counts, timings

Nothing is half-written: each .npy is written to a temporary name and renamed into place, the
journal line follows only once the file is complete, and manifest.csv / dataset.json are written
atomically at the very end (dataset.json last: it marks DATA_DIR as prepared). A rerun, after an
interruption or with more images, reuses every cache file whose journal entry matches the source
content (sha256) and settings, so only missing or changed images are decoded again.

Duplicates (skindistil.data.duplicates): every image's perceptual hash goes to the manifest
(`phash`); exact and near duplicates form clusters, listed in prepare_report.json and numbered in
the manifest (`duplicate_cluster`); by default each cluster is one split group, so no duplicate
sits on two sides of a split.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from skindistil.data import duplicates as dups
from skindistil.data.imageio import DEFAULT_MAX_PIXELS, border_crop_box, resize_shorter
from skindistil.data.masks import MaskLocator, read_mask
from skindistil.data.names import safe_file_stem
from skindistil.data.records import METADATA_FIELDS, Problem, Record
from skindistil.data.sources import ON_ERROR_CHOICES, Source
from skindistil.data.splits import (
    DEFAULT_FRACTIONS,
    SPLIT_NAMES,
    check_fractions,
    kfold_assign,
    split_train_val_test,
    stratified_subset,
)
from skindistil.data.vocab import ClassVocab
from skindistil.devices import usable_cores
from skindistil.errors import ConfigError, DataError, ImageError, WriteError
from skindistil.files import describe_os_error, file_sha256, save_npy, write_csv, write_json, write_text

FORMAT = 1
DATASET_JSON = "dataset.json"
MANIFEST_CSV = "manifest.csv"
REPORT_JSON = "prepare_report.json"
CACHE_DIR = "cache"
JOURNAL = "journal.jsonl"
MANIFEST_COLUMNS = [
    "image_id", "label", "class_name", "group", "split", "fold", "source",
    "orig_width", "orig_height", "crop_x0", "crop_y0", "crop_x1", "crop_y1",
    "width", "height", "sha256", "cache_file",
    "phash", "duplicate_cluster",
]  # fmt: skip
# Written after MANIFEST_COLUMNS; optional when reading (datasets prepared before they existed lack them).
MANIFEST_METADATA = list(METADATA_FIELDS)
# The cached lesion mask relative to DATA_DIR ("" for an image without one); optional when reading.
MASK_COLUMN = "mask_file"


@dataclass
class PrepareResult:
    """What a prepare run produced. `images_per_second` = images handled / decode-phase seconds."""

    data_dir: Path
    num_images: int
    num_decoded: int
    num_reused: int
    counts: dict[str, dict[str, int]]
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    images_per_second: float = 0.0
    duplicates: dict[str, Any] = field(default_factory=dict)
    num_masks: int = 0


@dataclass(frozen=True)
class _Settings:
    """Everything a worker needs besides the record; fixed for one run."""

    data_dir: Path
    short_side: int
    border_crop: bool
    max_pixels: int
    masks: MaskLocator | None = None


def cache_file_for(image_id: str) -> str:
    """Cache path of an image, relative to DATA_DIR: cache/<hh>/<name>.npy.

    <hh> (two hex digits of the id's SHA-1) spreads files over 256 folders; <name> is
    `safe_file_stem(image_id)`, so ids with slashes, spaces, ... never share a file.
    """
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()
    return f"{CACHE_DIR}/{digest[:2]}/{safe_file_stem(image_id)}.npy"


def mask_file_for(cache_file: str) -> str:
    """Cache path of an image's mask, beside the image's: cache/<hh>/<name>.mask.npy."""
    return cache_file[: -len(".npy")] + ".mask.npy"


def default_workers() -> int:
    """All cores this process may use (`devices.usable_cores`)."""
    return usable_cores()


def prepare_dataset(
    source: Source,
    out_dir: str | Path,
    *,
    short_side: int = 256,
    border_crop: bool = True,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    folds: int | None = None,
    seed: int = 42,
    on_error: str = "fail",
    workers: int | None = None,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    duplicates: str = "group",
    duplicate_threshold: int = dups.DEFAULT_THRESHOLD,
    masks: str | Path | MaskLocator | None = None,
) -> PrepareResult:
    """Decode, crop, resize and cache `source` into `out_dir`; split it; write manifest and dataset.json.

    `on_error` and `max_pixels` here govern both parsing and decoding (they override the source's
    own). With ``on_error="fail"`` the first bad row or image raises its DataError/ImageError, after
    the work done so far is journaled (a rerun resumes); with ``"skip"`` bad items are left out and
    listed in prepare_report.json. Splits: the source's predefined ones if it has them (DermaMNIST, a
    split-folder tree; a split it lacks is drawn from train by `fractions`, grouped and stratified),
    else grouped-stratified train/val/test by `fractions`; `folds` adds k-fold ids over train+val
    (the test split stays held out). `limit` keeps a class-stratified subset of that many images.
    `masks` (a folder or a ``{stem}`` pattern, see `skindistil.data.masks`) caches each image's lesion
    mask beside it, cropped and resized like the image (manifest column `mask_file`, "" for an image
    without one; a note counts those); a mask of the wrong size is a bad item like a broken image.
    `workers` None = all cores; 0 or 1 = in this process. Worker processes are started, not forked,
    so a script calling this with workers > 1 needs the usual ``if __name__ == "__main__":`` guard.
    `duplicates` (keep, group, drop) and `duplicate_threshold` (bits): see
    `skindistil.data.duplicates.resolve_duplicates`; with predefined splits, group refuses clusters
    that straddle them (DataError).
    """
    started = time.perf_counter()
    fractions = check_fractions(fractions)
    if len(fractions) != len(SPLIT_NAMES):
        raise ConfigError(f"need {len(SPLIT_NAMES)} split fractions ({'/'.join(SPLIT_NAMES)}), got {list(fractions)}")
    if short_side < 1:
        raise ConfigError(f"short_side must be at least 1, got {short_side}")
    if folds is not None and folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if on_error not in ON_ERROR_CHOICES:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if duplicates not in dups.MODES:
        raise ConfigError(f"duplicates must be one of {', '.join(dups.MODES)}, got {duplicates!r}")
    if duplicate_threshold < 0:
        raise ConfigError(f"duplicate_threshold must be >= 0 bits, got {duplicate_threshold}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")

    # A private copy, so the caller's source keeps its own settings and problem list.
    source = copy.copy(source)
    source.on_error, source.max_pixels, source.problems, source.notes = on_error, int(max_pixels), [], []
    records = source.records()
    vocab = source.vocab
    problems = list(source.problems)
    notes = list(source.notes)
    records = _drop_invalid(records, vocab, on_error, problems)
    if limit is not None:
        records = [records[i] for i in stratified_subset([r.label for r in records], limit, seed)]
    if not records:
        raise DataError(source.fingerprint(), "no usable images")
    timings = {"parse": time.perf_counter() - started}
    if masks is not None and not isinstance(masks, MaskLocator):
        masks = MaskLocator(str(masks))
    if masks is not None:
        no_file = next((r for r in records if not os.path.isfile(r.source)), None)
        if no_file is not None:
            raise ConfigError(f"--masks: source {source.name} yields images without a file ({no_file.source}); "
                              "masks are matched to image files by name")

    data_dir = Path(out_dir)
    settings = _Settings(data_dir, int(short_side), bool(border_crop), int(max_pixels), masks)
    _retire_previous(data_dir)
    journal = _read_journal(data_dir)
    tasks = []
    for record in records:
        cache_file = cache_file_for(record.image_id)
        known = journal.get(record.image_id)
        if known is not None and not _same_settings(known, settings, cache_file):
            known = None
        tasks.append((record, cache_file, known))

    decode_started = time.perf_counter()
    entries = _process_all(source, tasks, settings, workers, on_error, problems, progress)
    timings["decode"] = time.perf_counter() - decode_started

    duplicates_started = time.perf_counter()
    cached = [(record, entries[record.image_id]) for record in records if record.image_id in entries]
    if not cached:
        raise DataError(source.fingerprint(), "no image could be prepared (see the skipped items)")
    resolution = _resolve_duplicates(cached, vocab, duplicates, duplicate_threshold, on_error, problems)
    timings["duplicates"] = time.perf_counter() - duplicates_started
    split_started = time.perf_counter()
    kept = [cached[i] for i in resolution.kept]
    if not kept:
        raise DataError(source.fingerprint(), "no image left after the duplicate check (see the skipped items)")
    labels = np.array([r.label for r, _ in kept], dtype=np.int64)
    groups = resolution.split_groups
    split, predefined, drawn = _assign_splits(source, [r for r, _ in kept], labels, groups, fractions, seed)
    notes += [f"no predefined {name} split: {name} drawn from train (grouped, stratified by --split)" for name in drawn]
    cluster_of = _cluster_splits(source, resolution, split, predefined, duplicates)
    fold = np.full(len(kept), -1, dtype=np.int64)
    if folds:
        pool = np.flatnonzero(split != "test")
        fold[pool] = kfold_assign(labels[pool], [groups[i] for i in pool], folds, seed)
    timings["split"] = time.perf_counter() - split_started

    write_started = time.perf_counter()
    manifest = _manifest_frame(kept, vocab, split, fold)
    manifest["duplicate_cluster"] = pd.array(cluster_of, dtype="Int64")
    counts = {name: vocab.counts(labels[split == name].tolist()) for name in SPLIT_NAMES}
    notes += split_class_notes(counts)
    num_masks = sum(1 for _, entry in kept if entry.get("mask_file"))
    if masks is not None and num_masks < len(kept):
        notes.append(f"{len(kept) - num_masks} of {len(kept)} images have no mask in {masks.spec} (mask_file empty "
                     "in the manifest; localization scores leave them out)")
    reused = sum(1 for _, entry in kept if entry.get("reused"))
    write_csv(data_dir / MANIFEST_CSV, manifest)
    _finish_cache(data_dir, [entry for _, entry in cached])
    timings["write"] = time.perf_counter() - write_started
    timings["total"] = time.perf_counter() - started
    images_per_second = len(tasks) / max(timings["decode"], 1e-9)
    duplicate_report = {
        "method": dups.METHOD,
        "threshold": duplicate_threshold,
        "mode": duplicates,
        "num_clusters": len(resolution.clusters),
        "num_images_in_clusters": sum(len(c.images) for c in resolution.clusters),
        "num_joining_lesions": sum(c.joins_lesions for c in resolution.clusters),
        "num_dropped": sum(1 for why in resolution.removed.values() if why == "dropped"),
        "straddling_splits": sum(c.straddles for c in resolution.clusters),
        "label_conflicts": sum(c.label_conflict for c in resolution.clusters),
        "clusters": [c.to_dict() for c in resolution.clusters],
    }

    report = {
        "num_images": len(kept),
        "num_decoded": len(kept) - reused,
        "num_reused": reused,
        "num_skipped": len(problems),
        "problems": [p.to_dict() for p in problems],
        "notes": notes,
        "counts": counts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "images_per_second": round(images_per_second, 1),
        "workers": workers,
        "duplicates": duplicate_report,
    }
    write_json(data_dir / REPORT_JSON, report)
    dataset = {
        "format": FORMAT,
        "source": source.name,
        "root": str(source.root) if source.root is not None else None,
        "fingerprint": source.fingerprint(),
        "classes": vocab.to_list(),
        "short_side": settings.short_side,
        "border_crop": settings.border_crop,
        "max_pixels": settings.max_pixels,
        "limit": limit,
        "masks": masks.spec if masks is not None else None,
        "num_masks": num_masks,
        "splits": {
            "seed": seed,
            "fractions": None if predefined else list(fractions),
            "folds": folds,
            "predefined": predefined,
            "drawn_from_train": drawn,
        },
        "counts": counts,
        "num_images": len(kept),
        "notes": notes,
        "duplicates": {k: duplicate_report[k] for k in ("method", "threshold", "mode", "num_clusters")},
    }
    write_json(data_dir / DATASET_JSON, dataset)
    return PrepareResult(
        data_dir=data_dir,
        num_images=len(kept),
        num_decoded=len(kept) - reused,
        num_reused=reused,
        counts=counts,
        problems=problems,
        notes=notes,
        timings=timings,
        images_per_second=images_per_second,
        duplicates=duplicate_report,
        num_masks=num_masks,
    )


def split_class_notes(counts: dict[str, dict[str, int]]) -> list[str]:
    """What a user must know about classes missing from splits, from {split: {class: count}}.

    Fewer than two classes overall, or a class without training images: training refuses the dataset.
    A class absent from val or test: that split's balanced accuracy can only average the others (the
    evaluation report marks it incomplete).
    """
    classes = list(next(iter(counts.values())))
    present = [c for c in classes if any(split.get(c, 0) for split in counts.values())]
    notes = []
    if len(present) < 2:
        notes.append(f"only {len(present)} class(es) with images ({', '.join(present) or 'none'}): no classifier "
                     "can be trained or scored on this dataset")
    for name, split_counts in counts.items():
        if not sum(split_counts.values()):
            continue
        missing = [c for c in classes if not split_counts.get(c, 0)]
        if not missing:
            continue
        if name == "train":
            notes.append(f"train has no image of class(es) {', '.join(missing)}: training on this dataset is refused")
        else:
            notes.append(f"{name} has no image of class(es) {', '.join(missing)}: its balanced accuracy averages "
                         f"the other {len(classes) - len(missing)} classes and is reported as incomplete")
    return notes


def load_manifest(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a prepared DATA_DIR: (manifest as a DataFrame, dataset.json as a dict).

    Column types: label/width/height/... int, fold nullable Int64 (<NA> without k-fold), group str or
    None. Raises DataError naming the path when DATA_DIR is not a complete prepared dataset.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(data_dir, "prepared dataset folder not found")
    info_path = data_dir / DATASET_JSON
    if not info_path.is_file():
        raise DataError(data_dir, f"not a prepared dataset (no {DATASET_JSON}); run `skindistil prepare --out {data_dir}`")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(info_path, f"unreadable dataset description: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise DataError(info_path, f"unsupported prepared-dataset format {found!r} (expected {FORMAT})")
    manifest_path = data_dir / MANIFEST_CSV
    if not manifest_path.is_file():
        raise DataError(data_dir, f"prepared dataset without {MANIFEST_CSV}; prepare it again")
    text_columns = ["image_id", "class_name", "group", "split", "source", "sha256", "cache_file", "fold",
                    *MANIFEST_METADATA, "phash", "duplicate_cluster", MASK_COLUMN]
    frame = pd.read_csv(manifest_path, dtype=dict.fromkeys(text_columns, str), keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(manifest_path, f"missing column(s) {', '.join(missing)}")
    for name in [*MANIFEST_METADATA, MASK_COLUMN]:
        if name not in frame.columns:
            frame[name] = ""
    if len(frame) != info.get("num_images"):
        raise DataError(manifest_path, f"{len(frame)} rows but dataset.json says {info.get('num_images')} images")
    for column in ("fold", "duplicate_cluster"):
        frame[column] = pd.to_numeric(frame[column].mask(frame[column] == "")).astype("Int64")
    frame["group"] = frame["group"].where(frame["group"] != "", None)
    return frame, info


def duplicates_between(data_dir: str | Path, against: str | Path, threshold: int = dups.DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Every image of prepared `data_dir` that duplicates an image of prepared `against`.

    Reads both manifests' sha256 and perceptual hashes (no image is decoded); one row per pair,
    columns `skindistil.data.duplicates.CROSS_COLUMNS`. Raises DataError naming dataset.json when a
    dataset was hashed by another method, ConfigError for a negative threshold.
    """
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0 bits, got {threshold}")
    frames, where = [], []
    for folder in (data_dir, against):
        manifest, info = load_manifest(folder)
        method = (info.get("duplicates") or {}).get("method")
        if method != dups.METHOD:
            raise DataError(Path(folder) / DATASET_JSON, f"perceptual hash method {method!r}, not {dups.METHOD!r}; prepare it again")
        frames.append(manifest)
        where.append(str(Path(folder) / MANIFEST_CSV))
    return dups.cross_duplicates(frames[0], frames[1], threshold, where=(where[0], where[1]))


# --------------------------------------------------------------------------- records and splits


def _drop_invalid(records: list[Record], vocab: ClassVocab, on_error: str, problems: list[Problem]) -> list[Record]:
    """Checks every source gets for free: unique image ids and labels inside the vocabulary."""
    kept = []
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            reason = f"duplicate image id {record.image_id!r}"
        elif not 0 <= record.label < len(vocab):
            reason = f"label {record.label} outside the {len(vocab)} classes"
        else:
            seen.add(record.image_id)
            kept.append(record)
            continue
        if on_error == "fail":
            raise DataError(record.source, reason)
        problems.append(Problem(record.source, reason))
    return kept


def _assign_splits(source, records, labels, groups, fractions, seed) -> tuple[np.ndarray, bool, list[str]]:
    """(split name per record, whether the source's predefined splits were kept, the splits drawn from train).

    Predefined splits without val or test (a tree of train/ and test/ only) keep what they have; each
    missing split is drawn from train with the share `fractions` gives it, grouped and stratified.
    """
    given = [r.split for r in records]
    if all(s is None for s in given):
        return split_train_val_test(labels, groups, fractions, seed), False, []
    if any(s is None for s in given):
        raise DataError(source.fingerprint(), "some records carry a predefined split and others do not")
    unknown = sorted(set(given) - set(SPLIT_NAMES))
    if unknown:
        raise DataError(source.fingerprint(), f"unknown predefined split(s) {unknown}; expected {', '.join(SPLIT_NAMES)}")
    split = np.asarray(given, dtype=object)
    if not (split == "train").any():
        raise DataError(source.fingerprint(), "the predefined splits hold no train images")
    drawn = [name for name in SPLIT_NAMES if name != "train" and not (split == name).any()]
    drawn = [name for name in drawn if fractions[SPLIT_NAMES.index(name)] > 0]
    if drawn:
        names = ["train", *drawn]
        shares = np.array([fractions[SPLIT_NAMES.index(name)] for name in names])
        pool = np.flatnonzero(split == "train")
        split[pool] = split_train_val_test(labels[pool], [groups[i] for i in pool], shares / shares.sum(), seed, names)
    return split, True, drawn


def _resolve_duplicates(cached, vocab, mode, threshold, on_error, problems) -> dups.Resolution:
    """Duplicate clusters of the cached images and what `mode` keeps; refused clusters become problems."""
    records = [record for record, _ in cached]
    resolution = dups.resolve_duplicates(
        image_ids=[r.image_id for r in records],
        sources=[r.source for r in records],
        classes=[vocab.names[r.label] for r in records],
        groups=[r.group for r in records],
        sha256=[entry["sha256"] for _, entry in cached],
        hashes=[entry["phash"] for _, entry in cached],
        pixels=[entry["orig_width"] * entry["orig_height"] for _, entry in cached],
        predefined=[r.split for r in records] if any(r.split for r in records) else None,
        mode=mode,
        threshold=threshold,
        on_error=on_error,
    )
    problems.extend(Problem(records[i].source, reason) for i, reason in resolution.skipped)
    return resolution


def _cluster_splits(source, resolution: dups.Resolution, split: np.ndarray, predefined: bool, mode: str) -> list:
    """Fill each cluster's splits; cluster number per kept image (None outside clusters).

    Predefined splits cannot be regrouped: in group mode a cluster across them is refused.
    """
    position = {i: k for k, i in enumerate(resolution.kept)}
    cluster_of: list = [None] * len(resolution.kept)
    for number, (cluster, members) in enumerate(zip(resolution.clusters, resolution.cluster_members, strict=True)):
        cluster.splits = [str(split[position[m]]) if m in position else resolution.removed[m] for m in members]
        for m in members:
            if m in position:
                cluster_of[position[m]] = number
    straddling = [c for c in resolution.clusters if c.straddles]
    if predefined and mode == "group" and straddling:
        raise DataError(
            source.fingerprint(),
            f"{len(straddling)} duplicate cluster(s) straddle the predefined splits, e.g. {straddling[0].describe()}; "
            "--duplicates drop keeps one copy per cluster (the one in test, then val), --duplicates keep accepts them",
        )
    return cluster_of


def _manifest_frame(kept: list[tuple[Record, dict]], vocab: ClassVocab, split: np.ndarray, fold: np.ndarray) -> pd.DataFrame:
    rows = []
    for (record, entry), split_name, fold_id in zip(kept, split, fold, strict=True):
        x0, y0, x1, y1 = entry["crop"]
        rows.append(
            {
                "image_id": record.image_id,
                "label": record.label,
                "class_name": vocab.names[record.label],
                "group": record.group or "",
                "split": split_name,
                "fold": int(fold_id) if fold_id >= 0 else None,
                "source": record.source,
                "orig_width": entry["orig_width"],
                "orig_height": entry["orig_height"],
                "crop_x0": x0,
                "crop_y0": y0,
                "crop_x1": x1,
                "crop_y1": y1,
                "width": entry["width"],
                "height": entry["height"],
                "sha256": entry["sha256"],
                "cache_file": entry["cache_file"],
                "phash": entry["phash"],
                **{name: record.meta.get(name, "") for name in MANIFEST_METADATA},
                MASK_COLUMN: entry.get("mask_file") or "",
            }
        )
    frame = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *MANIFEST_METADATA, MASK_COLUMN])
    frame["fold"] = frame["fold"].astype("Int64")
    return frame


# --------------------------------------------------------------------------- decoding (workers)


def _process_all(source, tasks, settings, workers, on_error, problems, progress) -> dict[str, dict]:
    """Run every task (inline or in a process pool); journal each finished image as it arrives.

    Returns image_id -> journal entry for the images that are cached now.
    """
    entries: dict[str, dict] = {}
    journal_path = settings.data_dir / CACHE_DIR / JOURNAL
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(journal_path, "ab", buffering=0) as journal,  # unbuffered: nothing left to fail at close
        _outcomes(source, tasks, settings, workers) as outcomes,
        Progress(
            TextColumn("[bold]prepare[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bar,
    ):
        job = bar.add_task(source.name or type(source).__name__, total=len(tasks), rate="")
        started = time.perf_counter()
        for done, ((record, _, _), outcome) in enumerate(zip(tasks, outcomes, strict=True), start=1):
            if outcome[0] == "error":
                _, error_type, where, reason = outcome
                if on_error == "fail":
                    raise error_type(where, reason)
                problems.append(Problem(where, reason))
            else:
                entry = outcome[1]
                if not entry.get("reused"):
                    _append_journal(journal, journal_path, entry)
                entries[record.image_id] = entry
            elapsed = time.perf_counter() - started
            bar.update(job, advance=1, rate=f"{done / elapsed:.0f} img/s" if elapsed > 0 else "")
    return entries


def _append_journal(journal, path: Path, entry: dict) -> None:
    """One line per cached image, flushed at once (a rerun reads it back; a line cut short is ignored)."""
    line = memoryview((json.dumps(entry) + "\n").encode("utf-8"))
    try:
        while line:  # a raw write may be partial (a nearly full disk); the next one then fails
            line = line[journal.write(line):]
    except OSError as exc:
        raise WriteError(path, f"cannot append to the journal: {describe_os_error(exc)}") from exc


@contextlib.contextmanager
def _outcomes(source, tasks, settings, workers) -> Iterator[Iterator[tuple]]:
    """Iterator of task outcomes in task order; a pool is shut down (pending work cancelled) on exit."""
    if workers <= 1 or len(tasks) < 2:
        yield (_process_record(source, settings, *task) for task in tasks)
        return
    workers = min(workers, len(tasks))
    executor = ProcessPoolExecutor(
        workers, mp_context=_pool_context(), initializer=_init_worker, initargs=(source, settings, os.getpid())
    )
    try:
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        yield executor.map(_worker_task, tasks, chunksize=chunksize)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """Workers started from a fork server (spawn where there is none), not forked from this process.

    Forking this process would copy whatever threads it runs (the progress bar, torch) in an
    undefined state; the fork server is a clean single-threaded process. The preload makes each
    worker start in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "scipy.ndimage", "imagehash", "scipy.fftpack"])
    return context


_worker_state: tuple[Source, _Settings] | None = None


def _init_worker(source: Source, settings: _Settings, parent_pid: int) -> None:
    global _worker_state
    # Ctrl-C goes to the parent, which cancels pending work and shuts the pool down cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    _worker_state = (source, settings)


def _exit_when_orphaned(parent_pid: int, interval: float = 1.0) -> None:
    """End this worker once the parent is gone.

    A pool worker holds both ends of its task queue's pipe, so if the parent dies without shutting
    the pool down (SIGKILL, OOM killer) the worker would wait for tasks forever.
    """
    while True:
        time.sleep(interval)
        try:
            os.kill(parent_pid, 0)
        except (ProcessLookupError, PermissionError):
            os._exit(1)


def _worker_task(task: tuple) -> tuple:
    source, settings = _worker_state
    return _process_record(source, settings, *task)


def _process_record(source: Source, settings: _Settings, record: Record, cache_file: str, known: dict | None) -> tuple:
    """Cache one image. Returns ("ok", journal entry) or ("error", DataError subclass, where, reason).

    The error is returned, not raised, so the parent decides between failing and skipping (and
    exceptions with custom constructors need not cross the process boundary).
    """
    try:
        return ("ok", _cache_image(source, settings, record, cache_file, known))
    except DataError as exc:
        return ("error", type(exc), exc.where, exc.reason)


def _cache_image(source: Source, settings: _Settings, record: Record, cache_file: str, known: dict | None) -> dict:
    file_hash = file_sha256(record.source) if os.path.isfile(record.source) else None
    mask_path = _find_mask(settings.masks, record)
    mask_hash = file_sha256(str(mask_path)) if mask_path is not None else None
    if (known is not None and file_hash == known["sha256"] and known.get("mask_sha256") == mask_hash
            and _cache_intact(settings.data_dir, known)):
        return {**known, "reused": True}
    image = source.open(record)
    width, height = image.size
    if width * height > settings.max_pixels:
        raise ImageError(record.source, f"image is {width}x{height}, over the limit of {settings.max_pixels:,} pixels")
    pixels = np.asarray(image)
    # Sources without a file (npz rows, generated images) are identified by their decoded pixels.
    content_hash = file_hash or _pixels_sha256(pixels)
    if (known is not None and content_hash == known["sha256"] and known.get("mask_sha256") == mask_hash
            and _cache_intact(settings.data_dir, known)):
        return {**known, "reused": True}
    phash = dups.perceptual_hash(image)
    box = border_crop_box(pixels) if settings.border_crop else (0, 0, width, height)
    cached = np.asarray(resize_shorter(image.crop(box), settings.short_side), dtype=np.uint8)
    mask_file = None
    if mask_path is not None:
        mask = Image.fromarray(read_mask(mask_path, size=(width, height), image=record.source))
        # the image's box and the same resize, so mask and image stay pixel-aligned
        cached_mask = np.asarray(resize_shorter(mask.crop(box), settings.short_side), dtype=np.uint8)
        mask_file = mask_file_for(cache_file)
        save_npy(settings.data_dir / mask_file, cached_mask)
    save_npy(settings.data_dir / cache_file, cached)
    return {
        "image_id": record.image_id,
        "sha256": content_hash,
        "short_side": settings.short_side,
        "border_crop": settings.border_crop,
        "cache_file": cache_file,
        "orig_width": width,
        "orig_height": height,
        "crop": [int(v) for v in box],
        "width": int(cached.shape[1]),
        "height": int(cached.shape[0]),
        "phash": phash,
        "phash_method": dups.METHOD,
        "masks": settings.masks.spec if settings.masks is not None else None,
        "mask_file": mask_file,
        "mask_sha256": mask_hash,
    }


def _find_mask(masks: MaskLocator | None, record: Record) -> Path | None:
    """The mask file of `record` (by its image id's name, then its file's name), or None."""
    if masks is None:
        return None
    return masks.find(Path(record.image_id).name) or masks.find(record.source)


def _pixels_sha256(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


def _cache_intact(data_dir: Path, entry: dict) -> bool:
    """The cache file (and the mask's, if any) exists and its .npy header has the recorded shape
    (reads the headers only)."""
    files = [(entry["cache_file"], (entry["height"], entry["width"], 3))]
    if entry.get("mask_file"):
        files.append((entry["mask_file"], (entry["height"], entry["width"])))
    for name, shape in files:
        try:
            cached = np.load(data_dir / name, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if cached.shape != shape or cached.dtype != np.uint8:
            return False
    return True


# --------------------------------------------------------------------------- DATA_DIR bookkeeping


def _same_settings(entry: dict, settings: _Settings, cache_file: str) -> bool:
    return (
        entry.get("short_side") == settings.short_side
        and entry.get("border_crop") == settings.border_crop
        and entry.get("cache_file") == cache_file
        and entry.get("masks") == (settings.masks.spec if settings.masks is not None else None)
        and isinstance(entry.get("sha256"), str)
        and entry.get("phash_method") == dups.METHOD
    )


def _retire_previous(data_dir: Path) -> None:
    """Before the cache changes: unmark DATA_DIR as prepared and drop temporaries of killed runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in (DATASET_JSON, MANIFEST_CSV, REPORT_JSON):
        (data_dir / name).unlink(missing_ok=True)
    for pattern in ("*.tmp", f"{CACHE_DIR}/*.tmp", f"{CACHE_DIR}/*/*.tmp"):
        for tmp in data_dir.glob(pattern):
            tmp.unlink(missing_ok=True)


def _read_journal(data_dir: Path) -> dict[str, dict]:
    """image_id -> latest journal entry. A line cut short by an interruption is ignored."""
    path = data_dir / CACHE_DIR / JOURNAL
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("image_id"), str):
                entries[entry["image_id"]] = entry
    return entries


def _finish_cache(data_dir: Path, entries: list[dict]) -> None:
    """Rewrite the journal with exactly the kept images and delete cache files nothing refers to."""
    journal = [{k: v for k, v in entry.items() if k != "reused"} for entry in entries]
    write_text(data_dir / CACHE_DIR / JOURNAL, "".join(json.dumps(e) + "\n" for e in journal))
    wanted = {e["cache_file"] for e in journal} | {e["mask_file"] for e in journal if e.get("mask_file")}
    for path in (data_dir / CACHE_DIR).glob("*/*.npy"):
        if path.relative_to(data_dir).as_posix() not in wanted:
            path.unlink()
