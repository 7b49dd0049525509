"""Evaluate an artifact on a split of a prepared dataset: logits, optional calibration, reports."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from skindistil.data.datamodule import SkinDataModule
from skindistil.evaluation.bootstrap import BootstrapSettings, resampling_units
from skindistil.evaluation.calibration import fit_temperature
from skindistil.evaluation.metrics import AbsentClassWarning
from skindistil.evaluation.report import evaluate_arrays
from skindistil.evaluation.subgroups import DEFAULT_MIN_SIZE, subgroup_attributes
from skindistil.models import LoadedModel, load_model
from skindistil.models.artifact import resolve_model_dir, set_calibration, update_metrics


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
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    bootstrap: BootstrapSettings | None = None,
    subgroup_min_size: int = DEFAULT_MIN_SIZE,
) -> dict:
    """Score an artifact on `split`; write metrics.json, report.md, predictions.csv and plots.

    `calibrate` fits a softmax temperature on the validation split (NLL), stores it in the artifact,
    and evaluates with it. The split's metrics are merged into the artifact's metrics.json under the
    split's name, so model cards and benchmark plots show test figures. Intervals resample patients or
    lesions where the manifest has them (`bootstrap`, default 1,000 resamples); subgroups come from the
    manifest's metadata (groups under `subgroup_min_size` images are not scored).
    """
    loaded = load_model(model_path, device=device)
    out_dir = Path(out_dir) if out_dir else default_eval_dir(model_path, split)
    notes = []
    if calibrate:
        val = split_outputs(loaded, data_dir, "val", batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
        temperature = fit_temperature(val.logits, val.labels)
        set_calibration(loaded.path, temperature, fitted_on=f"{data_dir}:val")
        loaded = load_model(model_path, device=device)
        notes.append(f"temperature scaling: T = {temperature:.4f}, fitted on the validation split (NLL)")
    outputs = split_outputs(loaded, data_dir, split, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
    probs = loaded.probabilities(torch.from_numpy(outputs.logits)).numpy()
    meta = split_metadata(data_dir, outputs.image_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)  # absent classes are listed in the report's notes
        metrics = evaluate_arrays(
            probs, outputs.labels, loaded.classes, out_dir, image_ids=outputs.image_ids,
            title=f"{loaded.path.parent.name} on {split} ({len(outputs.labels)} images)", notes=notes,
            inputs={"model": str(loaded.path), "data": str(data_dir), "split": split,
                    "temperature": loaded.temperature},
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
