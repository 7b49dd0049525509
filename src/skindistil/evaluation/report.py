"""Evaluation outputs: ISIC-format CSVs in and out, metrics.json, report.md, and `evaluate_arrays`,
which writes all of them (plus the plots) for one set of scores."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skindistil.data.sources import find_isic_image, isic_image_key
from skindistil.errors import CSVError, DataError
from skindistil.evaluation import plots
from skindistil.evaluation.bootstrap import BootstrapSettings, metric_intervals
from skindistil.evaluation.metrics import UNKNOWN_CLASS, classification_metrics
from skindistil.evaluation.subgroups import DEFAULT_MIN_SIZE, subgroup_metrics
from skindistil.files import write_csv, write_json, write_text
from skindistil.markdown import markdown_table

IMAGE_COLUMN = "image"
# Per-row weights of the official scorer's truth files; not classes.
WEIGHT_COLUMNS = ("score_weight", "validation_weight")
# UNK is a class only in a truth file with UNK rows (ISIC 2019 test); the training truth never sets it.
NON_CLASS_COLUMNS = (UNKNOWN_CLASS, *WEIGHT_COLUMNS)
# Images the official scorer (isic-challenge-scoring's parse_truth_csv) gives weight 0 in any truth file.
OFFICIAL_UNSCORED_IMAGES = ("ISIC_0035068",)
_JPG_SUFFIX = re.compile(r"\.jpg$", re.IGNORECASE)


@dataclass(frozen=True)
class GroundTruth:
    """The scored rows of an ISIC ground-truth CSV."""

    image_ids: list[str]
    labels: np.ndarray  # (N,) int64, index into class_names
    class_names: list[str]  # file order; ends with UNK when the file has UNK rows
    notes: tuple[str, ...] = ()  # rows left out and why, UNK scored as a class

    @property
    def has_unknown(self) -> bool:
        return UNKNOWN_CLASS in self.class_names


def read_truth_csv(path: str | Path) -> GroundTruth:
    """Read an ISIC ground-truth CSV: ``image`` plus one 0/1 column per class, one 1 per row; optional
    ``UNK``, ``score_weight`` and ``validation_weight`` columns (the ISIC 2019 test truth has all three).

    The class columns, in file order, define the class order. UNK is a class when some scored row is
    UNK (test style), as in the official scorer; an all-zero UNK column (training style) is dropped.
    As in the official scorer, rows with ``score_weight`` 0 and the image ISIC_0035068 are not scored;
    other weights must be 1 (weighted scoring is not supported, so it is refused rather than
    approximated). Image ids lose a trailing .jpg; ISIC_X and ISIC_X_downsampled in one file are one
    image twice. Raises CSVError naming the column or line at fault.
    """
    path = Path(path)
    table = _read_csv(path)
    class_names = [c for c in table.columns if c not in (IMAGE_COLUMN, *NON_CLASS_COLUMNS)]
    if not class_names:
        raise CSVError(path, f"no class columns (found: {', '.join(table.columns)})")
    columns = [*class_names, UNKNOWN_CLASS] if UNKNOWN_CLASS in table.columns else class_names
    values = _numeric_columns(table, columns, path)
    image_ids = np.array(_image_ids(table, path), dtype=object)
    notes = []
    weights = np.ones(len(table))
    if "score_weight" in table.columns:
        weights = _numeric_columns(table, ["score_weight"], path)[:, 0]
        odd = np.flatnonzero((weights != 0) & (weights != 1))
        if odd.size:
            raise CSVError(
                _line(path, table.index[odd[0]], "score_weight"),
                "score_weight must be 0 or 1 (weighted scoring is not supported)",
            )
        if (weights == 0).any():
            notes.append(f"{int((weights == 0).sum())} truth row(s) with score_weight 0 are not scored "
                         "(as in the official scorer)")
    official = np.isin(image_ids, OFFICIAL_UNSCORED_IMAGES) & (weights == 1)
    if official.any():
        weights = np.where(official, 0.0, weights)
        notes.append(f"{', '.join(image_ids[official])} not scored: the official scorer gives it weight 0")
    keep = weights == 1
    if not keep.any():
        raise CSVError(path, "no scored rows (every score_weight is 0)")
    table, values, image_ids = table[keep], values[keep], image_ids[keep]
    not_binary = np.argwhere((values != 0) & (values != 1))
    if not_binary.size:
        row, col = not_binary[0]
        raise CSVError(_line(path, table.index[row], columns[col]), "truth values must be 0 or 1")
    if columns[-1] == UNKNOWN_CLASS:
        if values[:, -1].any():
            notes.append(f"{int(values[:, -1].sum())} UNK truth row(s) (ISIC 2019 test style): UNK is scored "
                         "as a category, as the official scorer does")
        else:
            columns, values = columns[:-1], values[:, :-1]
    positives = values.sum(axis=1)
    bad_rows = np.flatnonzero(positives != 1)
    if bad_rows.size:
        row = bad_rows[0]
        reason = (
            f"{int(positives[row])} positive classes; each truth row needs exactly one of {', '.join(columns)}"
        )
        raise CSVError(_line(path, table.index[row]), reason)
    return GroundTruth(list(image_ids), values.argmax(axis=1), list(columns), tuple(notes))


def read_predictions_csv(
    path: str | Path, class_names: Sequence[str], image_ids: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """Read an ISIC-format predictions CSV: ``image`` plus one score column per class.

    The columns `class_names` must all be present and hold finite numbers in [0, 1]; other columns
    (e.g. UNK) are ignored. With `image_ids`, returns the rows of exactly those images in that order,
    matched as `match_to_truth` does (every one must be present; other rows are left out: see
    `match_to_truth` to learn which). Returns (image ids, scores (N, K) in the order of `class_names`,
    ignored column names). Raises CSVError naming the column, line or images at fault.
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
    return list(image_ids), scores[match_to_truth(ids, image_ids, path).rows], ignored


@dataclass(frozen=True)
class TruthMatch:
    """How the rows of a predictions CSV map onto the images of a truth file."""

    rows: np.ndarray  # (N_truth,) int: the predictions row of each truth image, in truth order
    renamed: list[tuple[str, str]]  # (prediction id, truth id) pairs matched through `_downsampled`
    not_in_truth: list[str]  # prediction ids with no truth row, in file order


def match_to_truth(prediction_ids: Sequence[str], truth_ids: Sequence[str], path: str | Path) -> TruthMatch:
    """Find each truth image among the predictions: by its exact id, or by its ISIC 2019 name with or
    without `_downsampled` (ISIC_0000017 vs ISIC_0000017_downsampled; `prepare` matches image files
    the same way). A truth image without a prediction is a CSVError naming `path` and the images, as
    the official scorer refuses such a file; predictions without a truth row are returned in
    `not_in_truth` for the caller to report."""
    index = {image_id: row for row, image_id in enumerate(prediction_ids)}
    rows, renamed, absent = [], [], []
    for image_id in truth_ids:
        row = find_isic_image(index, image_id)
        if row is None:
            absent.append(image_id)
            continue
        rows.append(row)
        if prediction_ids[row] != image_id:
            renamed.append((prediction_ids[row], image_id))
    if absent:
        shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise CSVError(path, f"no prediction for {len(absent)} image(s) of the truth: {shown} (an incomplete "
                             "file is refused, as by the official scorer)")
    used = set(rows)
    extra = [image_id for row, image_id in enumerate(prediction_ids) if row not in used]
    return TruthMatch(np.array(rows, dtype=np.int64), renamed, extra)


def csv_columns(path: str | Path) -> list[str]:
    """The column names of an ISIC CSV (validated as `read_predictions_csv` does)."""
    return list(_read_csv(Path(path)).columns)


def write_predictions_csv(
    path: str | Path, image_ids: Sequence[str], probs: np.ndarray, class_names: Sequence[str]
) -> Path:
    """Write scores in ISIC challenge format: ``image`` then one column per class. Floats are
    written in shortest round-trip form, so re-reading the file reproduces the scores (and ties)."""
    path = Path(path)
    table = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(class_names))
    table.insert(0, IMAGE_COLUMN, list(image_ids))
    return write_csv(path, table)


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    """Write `metrics` as strict JSON (NaN and infinities become null)."""
    return write_json(path, metrics)


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
                             format_interval(row["balanced_accuracy_interval"]), row["accuracy"],
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

    if metrics.get("operating_points"):
        sections.append(render_operating_points_md(metrics["operating_points"]))
    if metrics.get("subgroups"):
        subgroups = metrics["subgroups"]
        text = ("BMA averages the classes present in each group (column `classes`); groups with fewer than "
                f"{subgroups['min_size']} images are not scored.")
        sections.append("## Subgroups\n\n" + text + "\n\n" + _md_table(SUBGROUP_HEADER, subgroup_rows(subgroups))
                        + "\n\n" + "\n".join(f"- {gap}" for gap in subgroup_gaps(subgroups)))

    if metrics["notes"]:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in metrics["notes"]))
    return "\n\n".join(sections) + "\n"


def render_operating_points_md(result: dict) -> str:
    """Markdown section of `evaluation.evaluate.operating_point_results`: one row per stored point."""
    header = ["point", "positive classes", "threshold", "val sensitivity", "val specificity", "positives",
              "negatives", "sensitivity (95% CI)", "specificity (95% CI)"]
    rows = [
        [name + (" (default)" if name == result["default"] else ""), " + ".join(p["positive_classes"]),
         f"{p['threshold']:.6g}", p["validation"]["sensitivity"], p["validation"]["specificity"], p["positives"],
         p["negatives"], _with_interval(p["sensitivity"], p["sensitivity_ci"]),
         _with_interval(p["specificity"], p["specificity_ci"])]
        for name, p in result["points"].items()
    ]
    first = next(iter(result["points"].values()))
    text = (f"Thresholds chosen on {result['fitted_on']} (sensN: the largest threshold with sensitivity >= N% "
            f"there; specN: the smallest with specificity >= N%) and applied unchanged here; positive when the "
            f"score >= threshold. Intervals: percentile bootstrap over {first['bootstrap']['units']} "
            f"{result['units']}, {first['bootstrap']['replicates']} replicates, seed {first['bootstrap']['seed']}.")
    return f"## Operating points\n\n{text}\n\n" + _md_table(header, rows)


def _with_interval(value: float, interval: Sequence[float]) -> str:
    return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def evaluate_arrays(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    image_ids: Sequence[str] | None = None,
    title: str = "Evaluation",
    notes: Sequence[str] = (),
    inputs: dict | None = None,
    scoring: dict | None = None,
    operating_points: dict | None = None,
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
    the metrics' own notes; `inputs` (e.g. the files scored) is stored under "inputs", `scoring` (how
    the rows were matched, the UNK rule) under "scoring" when given, `operating_points`
    (`evaluation.evaluate.operating_point_results`) under "operating_points" and in report.md. Returns the
    `classification_metrics` dict plus "title", "inputs", "scoring" (if given) and "files" (name -> path).

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
    metrics = {"title": title, "inputs": dict(inputs or {}), **({"scoring": scoring} if scoring else {}), **metrics}
    if operating_points:
        metrics["operating_points"] = operating_points

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
    write_text(files["report"], render_report_md(metrics, title))
    metrics["files"] = {key: str(path) for key, path in files.items()}
    write_metrics_json(files["metrics"], metrics)
    return metrics


def _read_csv(path: Path, id_column: str = IMAGE_COLUMN) -> pd.DataFrame:
    """The data rows with every cell a stripped string, so each bad value can be reported by line and
    column; the index is the 0-based line number (the header is line 0). `id_column` must exist."""
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
    if id_column not in columns:
        raise CSVError(path, f"missing column {id_column!r} (found: {', '.join(columns)})")
    table = raw.iloc[1:]
    if table.empty:
        raise CSVError(path, "no data rows")
    table.columns = columns
    return table


def _image_ids(table: pd.DataFrame, path: Path, column: str = IMAGE_COLUMN) -> list[str]:
    """Image ids of `column` with a trailing .jpg removed (as the official scorer does); empty ids, and ids of one
    image twice (also as ISIC_X and ISIC_X_downsampled, ISIC 2019's two names of an image), are errors."""
    ids = [_JPG_SUFFIX.sub("", s.strip()) for s in table[column]]
    first: dict[str, tuple[int, str]] = {}
    for row, image_id in zip(table.index, ids, strict=True):
        if not image_id:
            raise CSVError(_line(path, row, column), "empty image id")
        key = isic_image_key(image_id)
        if key in first:
            line, earlier = first[key]
            also = f" as {earlier!r}, the same ISIC image" if earlier != image_id else ""
            raise CSVError(_line(path, row, column), f"duplicate image id {image_id!r} (first on line {line}{also})")
        first[key] = (row + 1, image_id)
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
    """`markdown_table` of `rows` with their numbers formatted by `_fmt` (4 decimals, n/a for None/NaN)."""
    return markdown_table(header, [[_fmt(cell) for cell in row] for row in rows])


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
