"""Evaluation outputs: ISIC-format CSVs in and out, metrics.json, report.md, and `evaluate_arrays`,
which writes all of them (plus the plots) for one set of scores."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skindistil.errors import CSVError, DataError
from skindistil.evaluation import plots
from skindistil.evaluation.bootstrap import BootstrapSettings, metric_intervals
from skindistil.evaluation.metrics import classification_metrics
from skindistil.evaluation.subgroups import DEFAULT_MIN_SIZE, subgroup_metrics

IMAGE_COLUMN = "image"
# Columns of an ISIC ground-truth CSV that are not classes: UNK is never set in ISIC 2019 training data
# and is not a class here; the weights are the official scorer's per-row weights.
NON_CLASS_COLUMNS = ("UNK", "score_weight", "validation_weight")
_JPG_SUFFIX = re.compile(r"\.jpg$", re.IGNORECASE)


def read_truth_csv(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Read an ISIC ground-truth CSV: ``image`` plus one 0/1 column per class, one 1 per row.

    The class columns, in file order, define the class order; UNK is ignored. As in the official
    scorer, rows with ``score_weight`` 0 are left out; other weights must be 1 (weighted scoring is
    not supported). Returns (image ids, labels (N,), class names). Raises CSVError naming the
    column or line at fault.
    """
    path = Path(path)
    table = _read_csv(path)
    class_names = [c for c in table.columns if c not in (IMAGE_COLUMN, *NON_CLASS_COLUMNS)]
    if not class_names:
        raise CSVError(path, f"no class columns (found: {', '.join(table.columns)})")
    values = _numeric_columns(table, class_names, path)
    if "score_weight" in table.columns:
        weights = _numeric_columns(table, ["score_weight"], path)[:, 0]
        odd = np.flatnonzero((weights != 0) & (weights != 1))
        if odd.size:
            raise CSVError(
                _line(path, table.index[odd[0]], "score_weight"),
                "score_weight must be 0 or 1 (weighted scoring is not supported)",
            )
        keep = weights == 1
        table, values = table[keep], values[keep]
    not_binary = np.argwhere((values != 0) & (values != 1))
    if not_binary.size:
        row, col = not_binary[0]
        raise CSVError(_line(path, table.index[row], class_names[col]), "truth values must be 0 or 1")
    positives = values.sum(axis=1)
    bad_rows = np.flatnonzero(positives != 1)
    if bad_rows.size:
        row = bad_rows[0]
        reason = (
            f"{int(positives[row])} positive classes; each truth row needs exactly one of "
            f"{', '.join(class_names)} (UNK is not a class)"
        )
        raise CSVError(_line(path, table.index[row]), reason)
    image_ids = _image_ids(table, path)
    return image_ids, values.argmax(axis=1), class_names


def read_predictions_csv(
    path: str | Path, class_names: Sequence[str], image_ids: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """Read an ISIC-format predictions CSV: ``image`` plus one score column per class.

    The columns `class_names` must all be present and hold finite numbers in [0, 1]; other columns
    (e.g. UNK) are ignored. With `image_ids`, returns the rows of exactly those images in that order
    (every one must be present; other rows are ignored). Returns (image ids, scores (N, K) in the
    order of `class_names`, ignored column names). Raises CSVError naming the column, line or images
    at fault.
    """
    path = Path(path)
    table = _read_csv(path)
    missing = [c for c in class_names if c not in table.columns]
    if missing:
        raise CSVError(
            path, f"missing class column(s) {', '.join(missing)} (found: {', '.join(table.columns)})"
        )
    ignored = [c for c in table.columns if c != IMAGE_COLUMN and c not in class_names]
    ids = _image_ids(table, path)
    scores = _numeric_columns(table, list(class_names), path)
    outside = np.argwhere((scores < 0) | (scores > 1))
    if outside.size:
        row, col = outside[0]
        raise CSVError(
            _line(path, table.index[row], class_names[col]), f"score {scores[row, col]} is outside [0, 1]"
        )
    if image_ids is None:
        return ids, scores, ignored
    position = {image_id: i for i, image_id in enumerate(ids)}
    absent = [i for i in image_ids if i not in position]
    if absent:
        shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise CSVError(path, f"no prediction for {len(absent)} image(s) of the truth: {shown}")
    return list(image_ids), scores[[position[i] for i in image_ids]], ignored


def write_predictions_csv(
    path: str | Path, image_ids: Sequence[str], probs: np.ndarray, class_names: Sequence[str]
) -> Path:
    """Write scores in ISIC challenge format: ``image`` then one column per class. Floats are
    written in shortest round-trip form, so re-reading the file reproduces the scores (and ties)."""
    path = Path(path)
    table = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(class_names))
    table.insert(0, IMAGE_COLUMN, list(image_ids))
    table.to_csv(path, index=False)
    return path


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    """Write `metrics` as strict JSON (NaN and infinities become null)."""
    path = Path(path)
    path.write_text(json.dumps(_json_ready(metrics), indent=2) + "\n")
    return path


PER_CLASS_COLUMNS = (
    "support",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "auc",
    "auc_sens_80",
    "average_precision",
)


def incomplete_warning(metrics: dict) -> str | None:
    """The warning an evaluation on a set lacking some classes carries wherever its scores are shown
    (None when every class has truth samples)."""
    absent, names = metrics.get("absent_classes") or [], metrics["classes"]
    if not absent:
        return None
    return (f"INCOMPLETE: no truth samples of {', '.join(absent)}. Balanced accuracy and the macro means "
            f"average the {len(names) - len(absent)} classes present, not all {len(names)}: they are not "
            "comparable with scores on a set holding every class.")


def headline_rows(metrics: dict) -> list[tuple[str, float]]:
    """(metric, value) of the headline; on an incomplete set the class-averaged metrics say over how many
    classes they average."""
    absent, k = metrics.get("absent_classes") or [], len(metrics["classes"])
    averaged = ("balanced_accuracy", "macro_")
    return [(f"{name} ({k - len(absent)} of {k} classes)" if absent and name.startswith(averaged) else name, value)
            for name, value in metrics["headline"].items()]


def interval(metrics: dict, key: str) -> list | None:
    """The [low, high] bootstrap interval stored for headline metric `key`, or None."""
    return (metrics.get("intervals") or {}).get("headline", {}).get(key)


def class_interval(metrics: dict, class_name: str, column: str = "sensitivity") -> list | None:
    """The [low, high] bootstrap interval of a class's sensitivity (recall) or auc, or None."""
    return (metrics.get("intervals") or {}).get("per_class", {}).get(class_name, {}).get(column)


def interval_header(metrics: dict) -> str:
    """"95% CI" (the confidence of the stored intervals)."""
    return f"{100 * metrics['intervals']['confidence']:g}% CI"


def format_interval(bounds) -> str:
    """"[0.6123, 0.7011]"; "n/a" without bounds."""
    if not bounds or any(b is None or (isinstance(b, float) and math.isnan(b)) for b in bounds):
        return "n/a"
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def interval_note(metrics: dict) -> str | None:
    """How the intervals were drawn, in words (None without intervals)."""
    info = metrics.get("intervals")
    if not info:
        return None
    note = (f"Intervals: {100 * info['confidence']:g}% percentile bootstrap, {info['resamples']} resamples "
            f"(seed {info['seed']}) of {info['unit']}.")
    if info["resamples_missing_a_class"]:
        note += (f" {info['resamples_missing_a_class']} resample(s) lacked a class present in the set: their BMA "
                 "and macro means average the classes present (as the ISIC scorer does).")
    return note


def subgroup_rows(subgroups: dict) -> list[list]:
    """Rows (attribute, group, images, classes, BMA, interval, accuracy, interval) of `subgroup_metrics`."""
    rows = []
    for name, attribute in subgroups["attributes"].items():
        for row in attribute["groups"]:
            if row["scored"]:
                rows.append([name, row["group"], row["count"], row["classes_present"], row["balanced_accuracy"],
                             format_interval(row["bma_interval"]), row["accuracy"],
                             format_interval(row["accuracy_interval"])])
            else:
                rows.append([name, row["group"], row["count"], row["classes_present"],
                             f"too small (< {subgroups['min_size']})", "", "", ""])
    return rows


SUBGROUP_HEADER = ["attribute", "group", "images", "classes", "BMA", "BMA CI", "accuracy", "accuracy CI"]


def subgroup_gaps(subgroups: dict) -> list[str]:
    """One sentence per attribute: its largest BMA gap between scored groups, with the interval."""
    out = []
    for name, attribute in subgroups["attributes"].items():
        gap = attribute["gap"]
        if gap is None:
            out.append(f"{name}: fewer than two groups with at least {subgroups['min_size']} images; no gap.")
        else:
            bounds = gap["interval"]
            noise = ""
            if bounds and not any(math.isnan(b) for b in bounds):
                noise = (" (contains 0: not distinguishable from no gap)" if bounds[0] <= 0 <= bounds[1]
                         else " (excludes 0)")
            out.append(f"{name}: largest BMA gap {gap['value']:.4f} ({gap['best']} vs {gap['worst']}), "
                       f"interval {format_interval(bounds)}{noise}.")
    return out


def render_report_md(metrics: dict, title: str) -> str:
    """Markdown report of a `classification_metrics` result: headline, per-class, confusion matrix and
    cancer-view tables, then notes. Undefined values print as n/a. A set lacking some classes gets
    `incomplete_warning` under the title and labelled class-averaged metrics."""
    names = metrics["classes"]
    sections = [f"# {title}\n\n{metrics['num_samples']} samples, {len(names)} classes."]
    warning = incomplete_warning(metrics)
    if warning:
        sections.append(f"**{warning}**")
    note = interval_note(metrics)
    if note:
        rows = [(label, value, format_interval(interval(metrics, key)))
                for (label, value), key in zip(headline_rows(metrics), metrics["headline"], strict=True)]
        sections.append("## Headline\n\n" + _md_table(["metric", "value", interval_header(metrics)], rows)
                        + f"\n\n{note}")
    else:
        sections.append("## Headline\n\n" + _md_table(["metric", "value"], headline_rows(metrics)))

    per_class = [[name, *(metrics["per_class"][name][c] for c in PER_CLASS_COLUMNS)] for name in names]
    sections.append("## Per class\n\n" + _md_table(["class", *PER_CLASS_COLUMNS], per_class))
    if note:
        rows = [[name, metrics["per_class"][name]["sensitivity"], format_interval(class_interval(metrics, name)),
                 metrics["per_class"][name]["auc"], format_interval(class_interval(metrics, name, "auc"))]
                for name in names]
        sections.append("## Per-class recall and AUC with intervals\n\n"
                        + _md_table(["class", "recall", "recall CI", "AUC", "AUC CI"], rows))

    cm = metrics["confusion_matrix"]
    undecided = [[n] for n in cm["undecided"]] if any(cm["undecided"]) else [[] for _ in names]
    header = ["true \\ predicted", *names, *(["undecided"] if any(cm["undecided"]) else [])]
    rows = [
        [name, *counts, *extra] for name, counts, extra in zip(names, cm["counts"], undecided, strict=True)
    ]
    sections.append("## Confusion matrix\n\n" + _md_table(header, rows))

    cancer = metrics["cancer"]
    if cancer is not None:
        rows = [
            ("cancer samples", cancer["support"]["cancer"]),
            ("non-cancer samples", cancer["support"]["non_cancer"]),
            (f"sensitivity (cancer probability > {cancer['threshold']})", cancer["sensitivity"]),
            ("specificity", cancer["specificity"]),
            ("AUC", cancer["auc"]),
        ]
        heading = f"## Cancer vs non-cancer ({', '.join(cancer['cancer_classes'])})"
        sections.append(f"{heading}\n\n" + _md_table(["metric", "value"], rows))

    if metrics.get("subgroups"):
        subgroups = metrics["subgroups"]
        text = ("BMA averages the classes present in each group (column `classes`); groups with fewer than "
                f"{subgroups['min_size']} images are not scored.")
        sections.append("## Subgroups\n\n" + text + "\n\n" + _md_table(SUBGROUP_HEADER, subgroup_rows(subgroups))
                        + "\n\n" + "\n".join(f"- {gap}" for gap in subgroup_gaps(subgroups)))

    if metrics["notes"]:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in metrics["notes"]))
    return "\n\n".join(sections) + "\n"


def evaluate_arrays(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    image_ids: Sequence[str] | None = None,
    title: str = "Evaluation",
    notes: Sequence[str] = (),
    inputs: dict | None = None,
    *,
    bootstrap: BootstrapSettings | None = None,
    units: Sequence[str] | None = None,
    unit_counts: dict[str, int] | None = None,
    subgroups: dict[str, Sequence[str]] | None = None,
    subgroup_min_size: int = DEFAULT_MIN_SIZE,
) -> dict:
    """Score `probs` (N, K) against `labels` (N,) and write everything to `out_dir`.

    Writes metrics.json, report.md, predictions.csv (ISIC format; ids default to row numbers) and
    confusion_matrix.png, roc.png, reliability.png. `notes` (e.g. ignored CSV columns) are added to
    the metrics' own notes; `inputs` (e.g. the files scored) is stored under "inputs". Returns the
    `classification_metrics` dict plus "title", "inputs" and "files" (name -> path).

    Bootstrap intervals (`bootstrap`, default 1,000 seeded resamples; ``resamples=0`` for none) go under
    "intervals" (`bootstrap.metric_intervals`), resampling `units` (one per image, e.g. lesion ids
    from `bootstrap.resampling_units`; default: images). `subgroups` (attribute -> group per image,
    `subgroups.subgroup_attributes`) adds "subgroups" (`subgroups.subgroup_metrics`) and subgroups.png.
    """
    bootstrap = BootstrapSettings() if bootstrap is None else bootstrap
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels) or probs.shape[1] != len(class_names):
        raise DataError(
            "evaluation inputs",
            f"need scores (N, {len(class_names)}) and N labels, got {probs.shape} and {labels.shape}",
        )
    if not np.isfinite(probs).all():
        raise DataError("evaluation inputs", "scores contain NaN or infinite values")
    if image_ids is None:
        image_ids = [str(i) for i in range(len(labels))]
    elif len(image_ids) != len(labels):
        raise DataError("evaluation inputs", f"{len(image_ids)} image ids for {len(labels)} samples")

    metrics = classification_metrics(probs, labels, class_names)
    metrics["notes"] = [*notes, *metrics["notes"]]
    if bootstrap.enabled:
        metrics["intervals"] = metric_intervals(probs, labels, class_names, units, bootstrap, unit_counts)
    if subgroups:
        metrics["subgroups"] = subgroup_metrics(probs, labels, class_names, subgroups, units, bootstrap,
                                                subgroup_min_size)
    metrics = {"title": title, "inputs": dict(inputs or {}), **metrics}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = metrics["classes"]
    cm = np.asarray(metrics["confusion_matrix"]["counts"])
    support = np.array([metrics["per_class"][n]["support"] for n in names])
    files = {
        "predictions": write_predictions_csv(out / "predictions.csv", image_ids, probs, names),
        "report": out / "report.md",
        "confusion_matrix_png": plots.plot_confusion_matrix(cm, names, out / "confusion_matrix.png", support),
        "roc_png": plots.plot_roc_curves(probs, labels, names, out / "roc.png"),
        "reliability_png": plots.plot_reliability(
            metrics["reliability"], out / "reliability.png", metrics["headline"]["ece"]
        ),
        "metrics": out / "metrics.json",
    }
    if metrics.get("subgroups"):
        files["subgroups_png"] = plots.plot_subgroups(metrics["subgroups"], out / "subgroups.png")
    files["report"].write_text(render_report_md(metrics, title))
    metrics["files"] = {key: str(path) for key, path in files.items()}
    write_metrics_json(files["metrics"], metrics)
    return metrics


def _read_csv(path: Path) -> pd.DataFrame:
    """The data rows with every cell a stripped string, so each bad value can be reported by line and
    column; the index is the 0-based line number (the header is line 0)."""
    if not path.is_file():
        raise CSVError(path, "file not found")
    try:
        # header=None keeps duplicate column names visible (pandas would rename them to "X.1").
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CSVError(path, f"cannot parse CSV: {exc}") from None
    columns = [c.strip() for c in raw.iloc[0]]
    if "" in columns:
        raise CSVError(path, f"empty column name at position {columns.index('') + 1}")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise CSVError(path, f"duplicate column(s) {', '.join(duplicated)}")
    if IMAGE_COLUMN not in columns:
        raise CSVError(path, f"missing column {IMAGE_COLUMN!r} (found: {', '.join(columns)})")
    table = raw.iloc[1:]
    if table.empty:
        raise CSVError(path, "no data rows")
    table.columns = columns
    return table


def _image_ids(table: pd.DataFrame, path: Path) -> list[str]:
    """Image ids with a trailing .jpg removed (as the official scorer does); empty or duplicate ids
    are errors."""
    ids = [_JPG_SUFFIX.sub("", s.strip()) for s in table[IMAGE_COLUMN]]
    first_line: dict[str, int] = {}
    for row, image_id in zip(table.index, ids, strict=True):
        if not image_id:
            raise CSVError(_line(path, row, IMAGE_COLUMN), "empty image id")
        if image_id in first_line:
            raise CSVError(
                _line(path, row, IMAGE_COLUMN),
                f"duplicate image id {image_id!r} (first on line {first_line[image_id]})",
            )
        first_line[image_id] = row + 1
    return ids


def _numeric_columns(table: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """The given columns as a float array (rows, columns); the first empty, non-numeric or non-finite
    cell is a CSVError naming its line and column."""
    out = np.empty((len(table), len(columns)))
    for j, column in enumerate(columns):
        cells = table[column].str.strip().tolist()
        values = np.array([_parse_float(cell) for cell in cells])
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            row = table.index[bad[0]]
            raise CSVError(_line(path, row, column), f"not a finite number: {cells[bad[0]]!r}")
        out[:, j] = values
    return out


def _parse_float(cell: str) -> float:
    """float(cell), or NaN when it is not a number. Python's parser is exact (pandas.to_numeric can be
    off by an ulp), so written scores and their ties read back unchanged."""
    try:
        return float(cell)
    except ValueError:
        return float("nan")


def _line(path: Path, row: int, column: str | None = None) -> str:
    """Location of table row `row` (index from `_read_csv`) as the file's 1-based line number."""
    where = f"{path}, line {row + 1}"
    return f"{where}, column {column!r}" if column is not None else where


def _md_table(header: Sequence[str], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
