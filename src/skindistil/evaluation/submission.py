"""Score an ISIC-format predictions CSV against an ISIC ground-truth CSV as the challenge scorer
(isic-challenge-scoring) does, or refuse it.

- Rows: every truth image needs a prediction, found by its id or its ISIC 2019 name with or without
  `_downsampled` (`report.match_to_truth`); prediction rows absent from the truth are listed in a note
  (the official scorer refuses such a file; here they are left out and named).
- Columns: each row is decided over every score column of the file, as the official scorer decides over
  its categories. A column the truth has no class for is dropped (with a note) when it never reaches a
  row's top score; otherwise it stays as a class without truth samples, so the rows it wins count as
  wrong instead of being re-decided among the remaining columns.
- UNK: a truth file with UNK rows (ISIC 2019 test) scores UNK as a category. A predictions file with a
  UNK column is scored on it; an 8-class model's file reaches UNK only through the explicit
  maximum-softmax-probability rule of `unknown_scores` (`unk_threshold`), which the output states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skindistil.errors import ConfigError, CSVError
from skindistil.evaluation.metrics import UNKNOWN_CLASS
from skindistil.evaluation.report import (
    IMAGE_COLUMN,
    csv_columns,
    evaluate_arrays,
    match_to_truth,
    read_predictions_csv,
    read_truth_csv,
)

_SHOWN = 5


def unknown_scores(probs: np.ndarray, threshold: float) -> np.ndarray:
    """UNK score of each row of an 8-class model's scores, by the maximum-softmax-probability rule.

    With m the row's top class score and T = `threshold` in (0, 1):
    u = 1 - m (1 - T) / T for m <= T, and u = T (1 - m) / (1 - T) for m >= T.
    u lies in [0, 1], falls as m rises and exceeds m exactly when m < T, so the argmax over the
    classes and UNK decides UNK when the top class score is below T (m = T ties: ISIC 'undecided').
    At T = 0.5, u = 1 - m. Being a decreasing function of m, u ranks images as the classic
    maximum-softmax-probability detector (Hendrycks & Gimpel, 2017) does, so the UNK AUC is its AUROC.
    probs: (N, K) float scores in [0, 1]; returns (N,) float64.
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--unk-threshold must lie strictly between 0 and 1, got {threshold}")
    top = np.asarray(probs, dtype=np.float64).max(axis=1)
    below = 1.0 - top * (1.0 - threshold) / threshold
    above = threshold * (1.0 - top) / (1.0 - threshold)
    # Both pieces equal T at m = T in exact arithmetic; set it exactly so that the tie survives rounding.
    return np.where(top == threshold, threshold, np.where(top < threshold, below, above))


def evaluate_submission(predictions: str | Path, truth: str | Path, out: str | Path | None = None, *,
                        unk_threshold: float | None = None, bootstrap=None) -> dict:
    """Score `predictions` (ISIC CSV: image + score columns) against `truth` (ISIC ground truth) and write
    the evaluation files to `out` (default: <predictions dir>/<predictions name>_eval). `bootstrap`
    (`evaluation.bootstrap.BootstrapSettings`, default 1,000 resamples) sets the 95% intervals; rows
    are images here, the truth having no lesion or patient ids.

    Returns `report.evaluate_arrays`'s metrics, whose "notes" and "scoring" say how rows were matched,
    which columns were dropped or kept and how UNK was scored. Raises CSVError naming the file, line or
    column for a file that cannot be scored correctly, ConfigError for a misused `unk_threshold`.
    """
    predictions, truth = Path(predictions), Path(truth)
    gt = read_truth_csv(truth)
    columns = [c for c in csv_columns(predictions) if c != IMAGE_COLUMN]
    derive_unknown = _check_unknown_rule(gt.has_unknown, UNKNOWN_CLASS in columns, unk_threshold, predictions, truth)

    truth_columns = [c for c in gt.class_names if not (derive_unknown and c == UNKNOWN_CLASS)]
    extra_columns = [c for c in columns if c not in gt.class_names]
    ids, scores, _ = read_predictions_csv(predictions, [*truth_columns, *extra_columns])
    match = match_to_truth(ids, gt.image_ids, predictions)
    scores = scores[match.rows]
    by_name = dict(zip([*truth_columns, *extra_columns], scores.T, strict=True))

    notes = list(gt.notes)
    scoring: dict = {"rule": "isic-challenge-scoring: top score decides, exact ties wrong, score_weight 0 rows left out"}
    if derive_unknown:
        by_name[UNKNOWN_CLASS] = unknown_scores(scores[:, : len(truth_columns)], unk_threshold)
        rule = (f"UNK by the maximum-softmax-probability rule: an image is UNK when its top class score is below "
                f"{unk_threshold:g}; UNK score = 1 - m (1 - T) / T for m <= T, T (1 - m) / (1 - T) above "
                f"(m the top class score, T = {unk_threshold:g}{'; that is 1 - m' if unk_threshold == 0.5 else ''})")
        notes.append(rule)
        scoring["unk"] = {"source": "rule", "threshold": unk_threshold, "rule": rule}
    elif gt.has_unknown:
        notes.append(f"UNK scored from the UNK column of {predictions.name}")
        scoring["unk"] = {"source": "predictions column"}

    top = np.max([by_name[c] for c in gt.class_names], axis=0)
    kept = [c for c in extra_columns if (by_name[c] >= top).any()]
    dropped = [c for c in extra_columns if c not in kept]
    if dropped:
        notes.append(f"ignored prediction column(s): {', '.join(dropped)}")
    for column in kept:
        wins = int((by_name[column] >= top).sum())
        notes.append(f"prediction column {column} has no truth class but is the top score (or ties it) in {wins} "
                     "row(s): kept as a class with no truth samples, so those rows count as wrong")
    class_names = [*gt.class_names, *kept]

    if match.renamed:
        shown = ", ".join(f"{a} -> {b}" for a, b in match.renamed[:_SHOWN])
        notes.append(f"{len(match.renamed)} prediction row(s) matched to the truth by the ISIC 2019 name with or "
                     f"without _downsampled ({shown}{' ...' if len(match.renamed) > _SHOWN else ''})")
    if match.not_in_truth:
        shown = ", ".join(match.not_in_truth[:_SHOWN]) + (" ..." if len(match.not_in_truth) > _SHOWN else "")
        notes.append(f"{len(match.not_in_truth)} prediction row(s) not in the truth, not scored (the official "
                     f"scorer refuses such a file): {shown}")
    scoring.update(matched_by_downsampled_name=len(match.renamed), prediction_rows_not_in_truth=match.not_in_truth,
                   ignored_columns=dropped, columns_without_truth_class=kept)

    out = Path(out) if out is not None else predictions.parent / f"{predictions.stem}_eval"
    return evaluate_arrays(
        np.column_stack([by_name[c] for c in class_names]),
        gt.labels,
        class_names,
        out,
        image_ids=gt.image_ids,
        title=f"Evaluation of {predictions.name} against {truth.name}",
        notes=notes,
        inputs={"predictions": str(predictions), "truth": str(truth)},
        scoring=scoring,
        bootstrap=bootstrap,
    )


def _check_unknown_rule(truth_has_unknown: bool, predictions_have_unknown: bool, unk_threshold: float | None,
                        predictions: Path, truth: Path) -> bool:
    """Whether the UNK scores must be derived by `unknown_scores`; refuses every combination that has no
    single correct reading."""
    if unk_threshold is not None:
        if not truth_has_unknown:
            raise ConfigError(f"--unk-threshold: {truth} has no UNK rows, so no image is UNK; drop the option")
        if predictions_have_unknown:
            raise ConfigError(f"--unk-threshold: {predictions} has its own UNK column; drop the option to score "
                              "that column, or drop the column to apply the rule")
        return True
    if truth_has_unknown and not predictions_have_unknown:
        raise CSVError(predictions, f"no UNK column, but {truth} has UNK rows (ISIC 2019 test style): an 8-class "
                                    "model reaches UNK only through an out-of-distribution rule; pass "
                                    "--unk-threshold T (UNK when the top class score is below T, e.g. 0.5) or "
                                    "add a UNK column")
    return False
