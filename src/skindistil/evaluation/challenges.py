"""Submissions to the binary ISIC challenges, scored with each challenge's own metric.

    SIIM-ISIC 2020   image_name,target   melanoma ROC AUC (`metrics.roc_auc`)
    ISIC 2024        isic_id,target      partial AUC above 80% TPR (`metrics.partial_auc_above_tpr`),
                                         range [0, 0.2]; the full ROC AUC beside it

A submission holds one probability of the positive class (melanoma in 2020, malignant in 2024) per
image, in [0, 1]. The truth is the challenge's training table as shipped (2020: train.csv or
ISIC_2020_Training_GroundTruth*.csv; 2024: train-metadata.csv; other columns are ignored) or any CSV
with the id column and a 0/1 ``target``. The format is told apart by the id column; ISIC 2019's
``image`` column means the multi-class path (`report.read_truth_csv`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skindistil.errors import CSVError, DataError
from skindistil.evaluation.metrics import partial_auc_above_tpr, roc_auc
from skindistil.evaluation.report import (
    IMAGE_COLUMN,
    _image_ids,
    _line,
    _md_table,
    _numeric_columns,
    _read_csv,
    write_metrics_json,
)
from skindistil.files import write_text

TARGET_COLUMN = "target"
CLASSES = ["benign", "malignant"]


@dataclass(frozen=True)
class ChallengeFormat:
    name: str
    title: str
    id_column: str
    positive: str  # what target = 1 means


FORMATS = {
    "isic2020": ChallengeFormat("isic2020", "SIIM-ISIC 2020", "image_name", "melanoma"),
    "isic2024": ChallengeFormat("isic2024", "ISIC 2024 (SLICE-3D)", "isic_id", "malignant"),
}
ID_COLUMNS = {IMAGE_COLUMN: "isic2019", **{f.id_column: key for key, f in FORMATS.items()}}


def submission_format(path: str | Path) -> str:
    """"isic2019", "isic2020" or "isic2024", from the id column of a predictions CSV's header.
    CSVError when it has none of image, image_name, isic_id, or more than one."""
    path = Path(path)
    columns = _header(path)
    found = [c for c in ID_COLUMNS if c in columns]
    if len(found) != 1:
        what = "none" if not found else f"{len(found)} ({', '.join(found)})"
        raise CSVError(path, f"cannot tell the submission format: it has {what} of the id columns image "
                             f"(ISIC 2019), image_name (SIIM-ISIC 2020), isic_id (ISIC 2024); "
                             f"found: {', '.join(columns)}")
    return ID_COLUMNS[found[0]]


def read_submission(path: str | Path, fmt: ChallengeFormat) -> tuple[list[str], np.ndarray]:
    """(ids, target probabilities (N,) float64) of a submission with exactly the columns id,target.
    CSVError naming the line and column of a missing, non-numeric or out-of-range value, a duplicate
    id or an unexpected column."""
    path = Path(path)
    table = _read_csv(path, fmt.id_column)
    expected = [fmt.id_column, TARGET_COLUMN]
    if sorted(table.columns) != sorted(expected):
        raise CSVError(path, f"a {fmt.title} submission has exactly the columns {','.join(expected)}; "
                             f"found: {', '.join(table.columns)}")
    ids = _image_ids(table, path, fmt.id_column)
    scores = _numeric_columns(table, [TARGET_COLUMN], path)[:, 0]
    outside = np.flatnonzero((scores < 0) | (scores > 1))
    if outside.size:
        row = outside[0]
        raise CSVError(_line(path, table.index[row], TARGET_COLUMN),
                       f"target {scores[row]} is outside [0, 1] (a probability of {fmt.positive})")
    return ids, scores


def read_challenge_truth(path: str | Path, fmt: ChallengeFormat) -> tuple[list[str], np.ndarray]:
    """(ids, targets (N,) int 0/1) of a challenge truth table: its id column and ``target``; other
    columns are ignored. CSVError naming the file, line and column at fault, including a truth in
    another challenge's format."""
    path = Path(path)
    columns = _header(path)
    if fmt.id_column not in columns:
        other = next((ID_COLUMNS[c] for c in ID_COLUMNS if c in columns), None)
        hint = f"; it looks like {other} ground truth" if other else ""
        raise CSVError(path, f"the predictions are a {fmt.title} submission ({fmt.id_column},target) but this "
                             f"truth has no {fmt.id_column!r} column{hint} (found: {', '.join(columns)})")
    table = _read_csv(path, fmt.id_column)
    if TARGET_COLUMN not in table.columns:
        raise CSVError(path, f"missing column {TARGET_COLUMN!r} (found: {', '.join(table.columns)})")
    ids = _image_ids(table, path, fmt.id_column)
    targets = _numeric_columns(table, [TARGET_COLUMN], path)[:, 0]
    odd = np.flatnonzero((targets != 0) & (targets != 1))
    if odd.size:
        raise CSVError(_line(path, table.index[odd[0]], TARGET_COLUMN), "target must be 0 or 1")
    return ids, targets.astype(np.int64)


def challenge_metrics(fmt: ChallengeFormat, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The challenge's metric(s): 2020 {auc}; 2024 {partial_auc_above_80_tpr, auc}."""
    headline = {"auc": roc_auc(targets, scores)}
    if fmt.name == "isic2024":
        headline = {"partial_auc_above_80_tpr": partial_auc_above_tpr(targets, scores, 0.8), **headline}
    return headline


def evaluate_submission(predictions: str | Path, truth: str | Path, out_dir: str | Path) -> dict:
    """Score a 2020 or 2024 submission against its truth; write metrics.json and report.md to `out_dir`.

    Every truth image needs a prediction (score a subset with a truth holding only those rows);
    predictions of other images are left out with a note. Raises CSVError for malformed files or
    mismatched formats, DataError when the truth lacks positives or negatives (the AUC is undefined).
    Returns {title, challenge, inputs, classes, absent_classes, num_samples, support, headline, notes,
    files}.
    """
    predictions, truth = Path(predictions), Path(truth)
    fmt = FORMATS[submission_format(predictions)]
    truth_ids, targets = read_challenge_truth(truth, fmt)
    ids, scores = read_submission(predictions, fmt)
    position = {image_id: i for i, image_id in enumerate(ids)}
    missing = [i for i in truth_ids if i not in position]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CSVError(predictions, f"no prediction for {len(missing)} of the {len(truth_ids)} image(s) of "
                                    f"{truth.name}: {shown}")
    support = {"benign": int((targets == 0).sum()), "malignant": int((targets == 1).sum())}
    if not all(support.values()):
        raise DataError(truth, f"{len(targets)} truth rows, {support['malignant']} with target 1 and "
                               f"{support['benign']} with target 0: the AUC needs both")
    notes = []
    if len(ids) > len(truth_ids):
        notes.append(f"{len(ids) - len(truth_ids)} prediction(s) of images not in {truth.name} left out")
    scores = scores[[position[i] for i in truth_ids]]
    title = f"{fmt.title} evaluation of {predictions.name} against {truth.name}"
    metrics = {
        "title": title,
        "challenge": fmt.name,
        "inputs": {"predictions": str(predictions), "truth": str(truth)},
        "classes": CLASSES,
        "absent_classes": [],
        "num_samples": len(truth_ids),
        "support": support,
        "headline": challenge_metrics(fmt, targets, scores),
        "notes": notes,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics["files"] = {"report": str(out / "report.md"), "metrics": str(out / "metrics.json")}
    write_text(out / "report.md", _report_md(metrics, fmt))
    write_metrics_json(out / "metrics.json", metrics)
    return metrics


def _report_md(metrics: dict, fmt: ChallengeFormat) -> str:
    rows = [(name, value) for name, value in metrics["headline"].items()]
    support = metrics["support"]
    text = [f"# {metrics['title']}",
            f"{metrics['num_samples']} images: {support['malignant']} {fmt.positive} (target 1), "
            f"{support['benign']} other (target 0).",
            "## Headline\n\n" + _md_table(["metric", "value"], rows)]
    if fmt.name == "isic2024":
        text.append("partial_auc_above_80_tpr: the ISIC 2024 metric, the ROC area above 80% sensitivity, "
                    "not standardised; range [0, 0.2].")
    if metrics["notes"]:
        text.append("## Notes\n\n" + "\n".join(f"- {note}" for note in metrics["notes"]))
    return "\n\n".join(text) + "\n"


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise CSVError(path, "file not found")
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0, dtype=str).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CSVError(path, f"cannot parse CSV: {exc}") from None

