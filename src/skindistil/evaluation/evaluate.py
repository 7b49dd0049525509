"""Evaluate an artifact on a split of a prepared dataset: logits, optional calibration, reports."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from skindistil.data.datamodule import SkinDataModule
from skindistil.evaluation.bootstrap import BootstrapSettings, describe_units, resampling_units
from skindistil.evaluation.calibration import fit_temperature
from skindistil.evaluation.metrics import AbsentClassWarning
from skindistil.evaluation.operating_points import (
    DEFAULT_POINTS,
    apply_operating_points,
    fit_operating_points,
)
from skindistil.evaluation.report import evaluate_arrays
from skindistil.evaluation.subgroups import DEFAULT_MIN_SIZE, subgroup_attributes
from skindistil.models import LoadedModel, load_model
from skindistil.models.artifact import (
    resolve_model_dir,
    set_calibration,
    set_operating_points,
    update_metrics,
)


@dataclass
class SplitOutputs:
    image_ids: list[str]
    labels: np.ndarray
    logits: np.ndarray  # [N, C], or [num_exits, N, C] with all_exits


def split_outputs(
    loaded: LoadedModel,
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    all_exits: bool = False,
    progress: bool = True,
) -> SplitOutputs:
    """Logits of `loaded` on every image of `split`, in manifest order, with the artifact's preprocessing."""
    datamodule = SkinDataModule(data_dir, loaded.preprocess, batch_size=batch_size, num_workers=num_workers,
                                persistent_workers=False)
    dataset = datamodule.dataset(split, with_ids=True)
    if len(dataset) == 0:
        from skindistil.errors import DataError

        raise DataError(data_dir, f"split {split!r} has no images")
    if list(datamodule.vocab) != loaded.classes:
        from skindistil.errors import DataError

        raise DataError(data_dir, f"dataset classes {list(datamodule.vocab)} differ from the model's {loaded.classes}")
    loader = datamodule.loader(dataset, batch_size)
    forward = loaded.model.forward_all if all_exits else loaded.model
    chunks, ids = [], []
    with Progress(disable=not progress, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(f"predicting {split}", total=len(dataset))
        for images, _, batch_ids in loader:
            chunks.append(forward(images.to(loaded.device)).float().cpu())
            ids.extend(batch_ids)
            bar.advance(task, len(batch_ids))
    logits = torch.cat(chunks, dim=-2).numpy()
    return SplitOutputs(ids, dataset.labels.copy(), logits)


@dataclass
class SplitMetadata:
    """What the manifest says about the images of a split, in the order of `image_ids`: the bootstrap
    unit of each image (patient, else lesion, else the image), the count of units of each kind, and the
    subgroup attributes (`subgroups.subgroup_attributes`)."""

    units: list[str]
    unit_counts: dict[str, int]
    attributes: dict[str, list[str]]


def split_metadata(data_dir: str | Path, image_ids: list[str]) -> SplitMetadata:
    """`SplitMetadata` of `image_ids` from DATA_DIR/manifest.csv (DataError for an image it lacks)."""
    from skindistil.data.prepare import MANIFEST_CSV, load_manifest
    from skindistil.errors import DataError

    manifest, _ = load_manifest(data_dir)
    rows = manifest.set_index("image_id", drop=False)
    missing = [i for i in image_ids if i not in rows.index]
    if missing:
        raise DataError(Path(data_dir) / MANIFEST_CSV, f"no row for image(s) {', '.join(missing[:5])}")
    rows = rows.loc[image_ids]
    units, counts = resampling_units(image_ids, rows["group"].tolist(), rows["patient_id"].tolist())
    return SplitMetadata(units, counts, subgroup_attributes(rows.reset_index(drop=True),
                                                            str(Path(data_dir) / MANIFEST_CSV)))


def default_eval_dir(model_path: str | Path, split: str) -> Path:
    """RUN/eval/<split> for an artifact at RUN/model."""
    return resolve_model_dir(model_path).parent / "eval" / split


def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    *,
    calibrate: bool = False,
    operating_point: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    bootstrap: BootstrapSettings | None = None,
    subgroup_min_size: int = DEFAULT_MIN_SIZE,
) -> dict:
    """Score an artifact on `split`; write metrics.json, report.md, predictions.csv and plots.

    `calibrate` fits a softmax temperature on the validation split (NLL), stores it in the artifact,
    and evaluates with it (operating points chosen at another temperature are removed).
    `operating_point` ("auto" or a point name such as "melanoma@spec90") chooses every operating
    point on the validation split (`evaluation.operating_points`), stores them in the artifact's
    config.json with that point as the default predict and serve report ("auto": cancer@sens95, else
    melanoma@sens95). Stored points are applied unchanged to `split`: its metrics get
    ``operating_points`` (achieved sensitivity and specificity with bootstrap intervals over the
    manifest's lesion/patient groups). The split's headline is merged into the artifact's
    metrics.json under the split's name, so model cards and benchmark plots show test figures.
    Intervals resample patients or lesions where the manifest has them (`bootstrap`, default 1,000
    resamples); subgroups come from the manifest's metadata (groups under `subgroup_min_size` images are
    not scored). Raises DataError when no operating point can be chosen on the validation split.
    """
    loaded = load_model(model_path, device=device)
    out_dir = Path(out_dir) if out_dir else default_eval_dir(model_path, split)
    notes = []
    loader = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    val = split_outputs(loaded, data_dir, "val", **loader) if calibrate or operating_point else None
    if calibrate:
        temperature = fit_temperature(val.logits, val.labels)
        if set_calibration(loaded.path, temperature, fitted_on=f"{data_dir}:val"):
            notes.append("the stored operating points were removed: they were chosen at another temperature")
        loaded = load_model(model_path, device=device)
        notes.append(f"temperature scaling: T = {temperature:.4f}, fitted on the validation split (NLL)")
    if operating_point:
        val_probs = loaded.probabilities(torch.from_numpy(val.logits)).numpy()
        notes += store_operating_points(loaded, val_probs, val.labels, operating_point, f"{data_dir}:val")
        loaded = load_model(model_path, device=device)
        if split == "val":
            notes.append("operating points chosen on this split: their rates here are optimistic")
    outputs = split_outputs(loaded, data_dir, split, **loader)
    probs = loaded.probabilities(torch.from_numpy(outputs.logits)).numpy()
    meta = split_metadata(data_dir, outputs.image_ids)
    points = operating_point_results(loaded, probs, outputs.labels, meta, bootstrap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)  # absent classes are listed in the report's notes
        metrics = evaluate_arrays(
            probs, outputs.labels, loaded.classes, out_dir, image_ids=outputs.image_ids,
            title=f"{loaded.path.parent.name} on {split} ({len(outputs.labels)} images)", notes=notes,
            inputs={"model": str(loaded.path), "data": str(data_dir), "split": split,
                    "temperature": loaded.temperature},
            operating_points=points,
            bootstrap=bootstrap, units=meta.units, unit_counts=meta.unit_counts, subgroups=meta.attributes,
            subgroup_min_size=subgroup_min_size,
        )
    update_metrics(loaded.path, {split: artifact_entry(metrics)})
    return metrics


def artifact_entry(metrics: dict) -> dict:
    """What the artifact's metrics.json (and model card) keeps of a split's evaluation: the headline;
    on a split lacking some classes the balanced accuracy is stored as `balanced_accuracy_incomplete`
    with `classes_absent`, so nothing reads it as a score over every class."""
    entry = dict(metrics["headline"])
    if metrics["absent_classes"]:
        entry["balanced_accuracy_incomplete"] = entry.pop("balanced_accuracy")
        entry["classes_absent"] = len(metrics["absent_classes"])
    return entry


def store_operating_points(loaded: LoadedModel, probs: np.ndarray, labels: np.ndarray, default: str,
                           fitted_on: str) -> list[str]:
    """Choose every operating point on validation `probs` (N, K) / `labels` (N,) and store them in the
    artifact with `default` ("auto" or a point name); returns notes on the points left out."""
    from skindistil.errors import ConfigError, DataError

    points, notes = fit_operating_points(probs, labels, loaded.classes)
    if not points:
        reason = "; ".join(notes) or (f"the model's classes ({', '.join(loaded.classes)}) have no cancer "
                                      "(MEL, BCC, SCC, malignant) or melanoma class")
        raise DataError(fitted_on, f"no operating point can be chosen: {reason}")
    if default == "auto":
        default = next((name for name in DEFAULT_POINTS if name in points), next(iter(points)))
    elif default not in points:
        raise ConfigError(f"--operating-point {default}: not a point of this model on {fitted_on} "
                          f"(choose one of {', '.join(points)})")
    set_operating_points(loaded.path, points, fitted_on=fitted_on, default=default)
    return notes


def operating_point_results(loaded: LoadedModel, probs: np.ndarray, labels: np.ndarray, meta: SplitMetadata,
                            bootstrap: BootstrapSettings | None = None) -> dict | None:
    """The artifact's stored operating points applied to a split's `probs` (N, K) and `labels` (N,)
    (None when none are stored): {fitted_on, default, units, points: `apply_operating_points`},
    resampling the split's patients or lesions (`meta.units`) as its other intervals do."""
    stored = loaded.operating_points
    if stored is None:
        return None
    points = {name: point.model_dump() for name, point in stored.points.items()}
    return {
        "fitted_on": stored.fitted_on,
        "default": stored.default,
        "units": describe_units(meta.unit_counts),
        "points": apply_operating_points(probs, labels, loaded.classes, points, meta.units, bootstrap),
    }
