"""Early exit for models with per-depth heads (MultiExitViT artifacts, kind "depth_vit").

Rule (the same as `MultiExitViT.early_exit`): a sample stops at the first exit whose top softmax
probability (temperature 1, float32) is >= the threshold tau; the last exit takes every sample still
in flight. tau <= 0 stops everything at the first exit; tau > 1 runs every sample to full depth.
"Depth used" is the exit's depth in blocks (1..N), so the mean depth used is the average number of
blocks run per image.

Accuracy-side questions (BMA at tau, the BMA-vs-mean-depth curve) are answered exactly and cheaply by
simulating the rule on the logits of every exit, computed once (`split_outputs(all_exits=True)`).
Speed is measured for real with `MultiExitViT.early_exit`, which runs blocks only on the samples still in
flight, against the full-depth forward on the same batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from skindistil.errors import ConfigError
from skindistil.evaluation.bootstrap import BootstrapSettings
from skindistil.evaluation.metrics import (
    AbsentClassWarning,
    accuracy,
    balanced_accuracy,
    decide,
    expected_calibration_error,
    reliability_bins,
)
from skindistil.evaluation.plots import plot_early_exit_curve
from skindistil.evaluation.report import evaluate_arrays, write_metrics_json
from skindistil.evaluation.retention import compare_models
from skindistil.files import write_text
from skindistil.markdown import markdown_table
from skindistil.measure import device_sync, time_interleaved
from skindistil.models import LoadedModel, MultiExitViT, load_model

# 0.3..0.99, then the full-depth reference (every sample at the last exit)
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
FULL_DEPTH = "full"


def exit_confidences(all_logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Top softmax probability at every exit, [D, N], from logits [D, N, C] (float32, as in
    `MultiExitViT.early_exit`, so that a simulated decision is the model's decision)."""
    logits = torch.as_tensor(np.asarray(all_logits, dtype=np.float32))
    return logits.softmax(dim=-1).amax(dim=-1).numpy()


def simulate_early_exit(
    all_logits: np.ndarray | torch.Tensor, exits: Sequence[int], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The early-exit decisions from the logits of every exit.

    all_logits: [D, N, C], one row per exit in `exits` (depths, ascending, the last being the full
    depth). Returns (logits [N, C] of the exit each sample stops at, depth used [N] int64).
    """
    all_logits = np.asarray(all_logits, dtype=np.float32)
    if all_logits.ndim != 3 or all_logits.shape[0] != len(exits):
        raise ValueError(f"all_logits {all_logits.shape}: expected [{len(exits)} exits, N, C]")
    confident = exit_confidences(all_logits) >= threshold
    confident[-1] = True  # the last exit takes whatever remains
    stop = confident.argmax(axis=0)  # the first confident exit of each sample
    depths = np.asarray(exits, dtype=np.int64)[stop]
    return all_logits[stop, np.arange(all_logits.shape[1])], depths


def early_exit_point(
    all_logits: np.ndarray, labels: np.ndarray, exits: Sequence[int], threshold: float | str, num_classes: int,
    teacher: dict | None = None,
) -> dict:
    """BMA, accuracy, ECE and reliability bins, mean depth used and the share of samples leaving at
    each exit, at one threshold (`FULL_DEPTH` for the last exit alone). `teacher` ({"probs" [N, C], "classes", "units",
    "unit_counts", "bootstrap"}) adds "comparison": `retention.compare_models` against it."""
    tau = np.inf if threshold == FULL_DEPTH else float(threshold)
    logits, depths = simulate_early_exit(all_logits, exits, tau)
    probs = torch.from_numpy(logits).softmax(dim=-1).numpy()
    preds = decide(probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)  # a tiny split may lack a class
        bma = balanced_accuracy(labels, preds, num_classes)
    point = {
        "threshold": threshold,
        "balanced_accuracy": bma,
        "accuracy": accuracy(labels, preds),
        "ece": expected_calibration_error(probs, labels),
        "reliability": {key: value.tolist() for key, value in reliability_bins(probs, labels).items()},
        "mean_depth": float(depths.mean()),
        "exit_share": {int(d): float(np.mean(depths == d)) for d in exits},
    }
    if teacher is not None:
        point["comparison"] = compare_models(teacher["probs"], probs, labels, teacher["classes"], teacher["units"],
                                             teacher["bootstrap"], teacher["unit_counts"])
    return point


def sweep_thresholds(
    all_logits: np.ndarray,
    labels: np.ndarray,
    exits: Sequence[int],
    num_classes: int,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    teacher: dict | None = None,
) -> list[dict]:
    """`early_exit_point` at each threshold, then at full depth (the reference every curve ends at)."""
    points = [early_exit_point(all_logits, labels, exits, float(t), num_classes, teacher) for t in thresholds]
    return points + [early_exit_point(all_logits, labels, exits, FULL_DEPTH, num_classes, teacher)]


def measure_throughput(
    model: MultiExitViT,
    batches: Iterable[torch.Tensor],
    threshold: float,
    device: torch.device | str = "cpu",
    *,
    repeats: int = 5,
    max_images: int = 2048,
) -> dict:
    """Real early-exit decisions on every batch, and images per second of `model.early_exit(x,
    threshold)` against the full-depth forward.

    One untimed pass runs `early_exit` on all batches (its decisions are returned, and it warms up);
    the first `max_images` images are kept in memory and timed `repeats` times by
    `skindistil.measure.time_interleaved`: each round runs early exit over all kept batches, then the
    full-depth forward over them, so a load change on a shared machine hits both alike; data loading
    is outside the timed spans, the device synchronised inside them. Throughputs are medians over the
    rounds; speedup is the median per-round ratio.

    Returns {"early_exit_images_per_s", "full_depth_images_per_s", "speedup", "timed_images",
    "repeats", "logits" [N, C], "depths" [N]}.
    """
    device = torch.device(device)
    sync = device_sync(device)
    model = model.eval().to(device)
    logits, depths, kept, kept_images = [], [], [], 0
    with torch.inference_mode():
        for x in batches:
            x = x.to(device)
            z, d = model.early_exit(x, threshold)
            logits.append(z.float().cpu())
            depths.append(d.cpu())
            if kept_images < max_images:
                kept.append(x[: max_images - kept_images])
                kept_images += len(kept[-1])
        if not kept:
            raise ConfigError("early exit throughput: no images to time")
        model(kept[0])
        if sync:
            sync()
        rounds = max(1, repeats)
        early_s, full_s = (
            np.array(t)
            for t in time_interleaved(
                [lambda xs: [model.early_exit(x, threshold) for x in xs], lambda xs: [model(x) for x in xs]],
                [kept, kept],
                repeats=rounds,
                min_repeats=rounds,
                max_seconds=math.inf,
                sync=sync,
            )
        )
    return {
        "early_exit_images_per_s": float(np.median(kept_images / early_s)),
        "full_depth_images_per_s": float(np.median(kept_images / full_s)),
        "speedup": float(np.median(full_s / early_s)),
        "timed_images": kept_images,
        "repeats": rounds,
        "logits": torch.cat(logits).numpy(),
        "depths": torch.cat(depths).numpy(),
    }


# ------------------------------------------------------------------------------------ on an artifact


def load_depth_model(model_path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load an artifact and check it has per-depth heads."""
    loaded = load_model(model_path, device=device)
    if not isinstance(loaded.model, MultiExitViT):
        raise ConfigError(
            f"{loaded.path}: early exit needs an artifact with per-depth heads (kind depth_vit, from "
            f"`distill --method fcvit|fcvit-probs|full`), not kind {loaded.config.get('kind')!r}"
        )
    return loaded


def evaluate_threshold(
    model_path: str | Path,
    data_dir: str | Path,
    split: str,
    threshold: float,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Evaluate early exit at `threshold` on `split`: the full report of its predictions in `out_dir`
    (metrics.json, report.md, predictions.csv, plots; intervals resample the manifest's patients or
    lesions) with an "early_exit" section (mean depth used,
    share per exit, measured throughput with and without early exit, agreement of the simulated
    decisions with the model's own)."""
    from skindistil.evaluation.evaluate import split_metadata, split_outputs

    loaded = load_depth_model(model_path, device)
    outputs = split_outputs(loaded, data_dir, split, batch_size=batch_size, num_workers=num_workers,
                            all_exits=True, progress=progress)
    meta = split_metadata(data_dir, outputs.image_ids)
    exits = list(loaded.model.exits)
    point = early_exit_point(outputs.logits, outputs.labels, exits, threshold, len(loaded.classes))
    simulated_logits, simulated_depths = simulate_early_exit(outputs.logits, exits, threshold)
    timing = measure_throughput(loaded.model, _split_images(loaded, data_dir, split, batch_size, num_workers),
                                threshold, device)
    early_exit = {
        "threshold": threshold,
        "mean_depth": point["mean_depth"],
        "full_depth": loaded.model.depth,
        "exit_share": point["exit_share"],
        "images_per_s": timing["early_exit_images_per_s"],
        "full_depth_images_per_s": timing["full_depth_images_per_s"],
        "speedup": timing["speedup"],
        "device": str(device),
        "batch_size": batch_size,
        "timed_images": timing["timed_images"],
        "timing_repeats": timing["repeats"],
        "simulated_matches_model": float(np.mean(timing["depths"] == simulated_depths)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)
        metrics = evaluate_arrays(
            loaded.probabilities(torch.from_numpy(simulated_logits)).numpy(), outputs.labels, loaded.classes,
            out_dir, image_ids=outputs.image_ids,
            title=f"{loaded.path.parent.name} on {split}, early exit at confidence >= {threshold}",
            notes=[f"early exit: mean depth {point['mean_depth']:.2f} of {loaded.model.depth} blocks"],
            inputs={"model": str(loaded.path), "data": str(data_dir), "split": split},
            units=meta.units, unit_counts=meta.unit_counts,
        )
    metrics["early_exit"] = early_exit
    metrics["headline"] = {**metrics["headline"], "mean_depth": early_exit["mean_depth"],
                           "images_per_s": early_exit["images_per_s"],
                           "full_depth_images_per_s": early_exit["full_depth_images_per_s"]}
    write_metrics_json(metrics["files"]["metrics"], metrics)
    return metrics


def sweep_exits(
    model_path: str | Path,
    data_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    teacher_probs: np.ndarray | None = None,
    bootstrap: BootstrapSettings | None = None,
) -> dict:
    """The BMA-vs-mean-depth curve over `thresholds` (plus full depth), with the ECE of every threshold
    and of every exit alone, written to out_dir/early_exit.{json,md,png}. With `teacher_probs` (the
    teacher's scores [N, C] on the split, in manifest order) every point also gets "comparison"
    against the teacher (`retention.compare_models`). Returns the JSON's content with "files" added."""
    from skindistil.evaluation.evaluate import split_metadata, split_outputs

    loaded = load_depth_model(model_path, device)
    outputs = split_outputs(loaded, data_dir, split, batch_size=batch_size, num_workers=num_workers,
                            all_exits=True, progress=progress)
    exits = list(loaded.model.exits)
    teacher = None
    if teacher_probs is not None:
        if np.shape(teacher_probs) != (len(outputs.labels), len(loaded.classes)):
            raise ConfigError(f"teacher scores {np.shape(teacher_probs)} do not match the split "
                              f"({len(outputs.labels)} images, {len(loaded.classes)} classes)")
        meta = split_metadata(data_dir, outputs.image_ids)
        teacher = {"probs": teacher_probs, "classes": loaded.classes, "units": meta.units,
                   "unit_counts": meta.unit_counts, "bootstrap": bootstrap or BootstrapSettings()}
    points = sweep_thresholds(outputs.logits, outputs.labels, exits, len(loaded.classes), thresholds, teacher)
    per_exit = [early_exit_point(outputs.logits[i:i + 1], outputs.labels, [d], FULL_DEPTH, len(loaded.classes))
                for i, d in enumerate(exits)]
    result = {
        "model": str(loaded.path),
        "data": str(data_dir),
        "split": split,
        "num_samples": len(outputs.labels),
        "depth": loaded.model.depth,
        "exits": exits,
        "points": points,
        "per_exit_balanced_accuracy": {int(d): p["balanced_accuracy"] for d, p in zip(exits, per_exit, strict=True)},
        "per_exit_ece": {int(d): p["ece"] for d, p in zip(exits, per_exit, strict=True)},
        "per_exit_reliability": {int(d): p["reliability"] for d, p in zip(exits, per_exit, strict=True)},
    }
    return {**result, "files": write_sweep_report(result, out_dir)}


def write_sweep_report(result: dict, out_dir: str | Path) -> dict[str, str]:
    """early_exit.json, early_exit.md (one row per threshold) and early_exit.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Early exit: {Path(result['model']).parent.name} on {result['split']} ({result['num_samples']} images)"
    rows = []
    for p in result["points"]:
        tau = p["threshold"] if p["threshold"] == FULL_DEPTH else f"{p['threshold']:.2f}"
        diff, agree = "", ""
        if p.get("comparison"):
            d = p["comparison"]["balanced_accuracy"]["difference"]
            low, high = d["interval"] or (float("nan"), float("nan"))
            diff, agree = f"{d['value']:+.4f} ({low:+.4f} to {high:+.4f})", f"{p['comparison']['agreement']['top1']:.4f}"
        rows.append([tau, f"{p['balanced_accuracy']:.4f}", f"{p['accuracy']:.4f}", f"{p['ece']:.4f}",
                     f"{p['mean_depth']:.2f}", diff, agree, *[f"{p['exit_share'][d]:.2f}" for d in result["exits"]]])
    header = ["threshold", "BMA", "accuracy", "ECE", "mean depth", "BMA - teacher (CI)", "agreement",
              *[f"exit {d}" for d in result["exits"]]]
    lines = [f"# {title}", "",
             "A sample stops at the first exit whose top softmax probability >= threshold; "
             f"`{FULL_DEPTH}` runs all {result['depth']} blocks.", "", markdown_table(header, rows),
             "", "Columns `exit d`: share of the images leaving at depth d.", "",
             "BMA of each exit alone: "
             + ", ".join(f"{d}: {b:.4f}" for d, b in result["per_exit_balanced_accuracy"].items()),
             "", "ECE of each exit alone: " + ", ".join(f"{d}: {e:.4f}" for d, e in result["per_exit_ece"].items())]
    files = {"json": out / "early_exit.json", "md": out / "early_exit.md", "png": out / "early_exit.png"}
    write_metrics_json(files["json"], result)
    write_text(files["md"], "\n".join(lines) + "\n")
    plot_early_exit_curve(result["points"], result["per_exit_balanced_accuracy"], files["png"], title=title)
    return {key: str(path) for key, path in files.items()}


def _split_images(loaded: LoadedModel, data_dir, split: str, batch_size: int, num_workers: int | None):
    """The preprocessed image batches of `split` (labels and ids dropped), streamed from the cache."""
    from skindistil.data.datamodule import SkinDataModule

    datamodule = SkinDataModule(data_dir, loaded.preprocess, batch_size=batch_size, num_workers=num_workers,
                                persistent_workers=False)
    for images, *_ in datamodule.loader(datamodule.dataset(split), batch_size):
        yield images
