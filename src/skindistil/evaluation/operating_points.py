"""Operating points: binary decisions (cancer vs non-cancer, melanoma vs rest) at thresholds chosen on
validation and applied unchanged elsewhere. Pure functions over numpy arrays.

Views. ``cancer``: score = the summed probabilities of the cancer classes (`CANCER_CLASSES`: MEL, BCC,
SCC, or ``malignant`` of a benign/malignant model) over the row sum; ``melanoma``: the same with the
melanoma class alone (`MELANOMA_CLASSES`). A view exists when the model has one of its classes; a
point records which classes it sums.

Targets. ``sens95`` = the largest threshold whose validation sensitivity is at least 95% (so its
specificity is the highest at that sensitivity); ``spec95`` = the smallest threshold whose validation
specificity is at least 95% (the highest sensitivity at that specificity). Levels 80, 90 and 95%.
Thresholds are validation scores; an image is positive when ``score >= threshold``. A specificity
target no finite threshold reaches (the top-scored validation image is negative and the target
needs every negative below the threshold) is left out with a note.

Intervals. On the evaluated split the achieved sensitivity and specificity carry a percentile
bootstrap interval drawn as every other interval of a report (`skindistil.evaluation.bootstrap`: the
same seed, resamples and units, patients or lesions when the dataset knows them, else images).
Resamples without a positive (or negative) image are left out of that rate's interval.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from skindistil.data.vocab import CANCER_CLASSES, MELANOMA_CLASSES
from skindistil.evaluation.bootstrap import (
    BootstrapSettings,
    draw_unit_counts,
    percentile_interval,
    unit_index,
)
from skindistil.evaluation.metrics import cancer_scores, roc_curve

VIEWS: dict[str, Collection[str]] = {"cancer": CANCER_CLASSES, "melanoma": MELANOMA_CLASSES}
TARGETS = {"sens": "sensitivity", "spec": "specificity"}
LEVELS = (0.80, 0.90, 0.95)
# predict and serve report this point when the artifact stores it (else the melanoma one)
DEFAULT_POINTS = ("cancer@sens95", "melanoma@sens95")


def point_name(view: str, target: str, level: float) -> str:
    """``cancer@sens95``: view, target abbreviation (sens | spec), level in percent."""
    abbr = next(k for k, v in TARGETS.items() if v == target)
    return f"{view}@{abbr}{round(level * 100)}"


def view_classes(class_names: Sequence[str]) -> dict[str, list[str]]:
    """The views a model with `class_names` has: view -> the classes its score sums (model order)."""
    out = {view: [c for c in class_names if c in members] for view, members in VIEWS.items()}
    return {view: classes for view, classes in out.items() if classes}


def binary_scores(probs: np.ndarray, class_names: Sequence[str], positive_classes: Collection[str]) -> np.ndarray:
    """Score (N,) float64 of the positive side: summed probabilities of `positive_classes` over the row
    sum (`metrics.cancer_scores`). ValueError when none of them is a model class."""
    scores = cancer_scores(probs, class_names, positive_classes)
    if scores is None:
        raise ValueError(f"none of {', '.join(sorted(positive_classes))} is a class of {', '.join(class_names)}")
    return scores


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, target: str, level: float) -> dict:
    """The threshold meeting `target` ("sensitivity" | "specificity") >= `level` on these (validation)
    scores, by the rule of the module docstring, with the rates it achieves there.

    Returns {threshold, sensitivity, specificity, positives, negatives}. ValueError when a side has no
    sample or no finite threshold reaches a specificity target.
    """
    if target not in TARGETS.values():
        raise ValueError(f"target must be sensitivity or specificity, got {target!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y = np.asarray(y_true).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"needs positive and negative samples, got {n_pos} positive and {n_neg} negative")
    fpr, tpr, thresholds = roc_curve(y, scores)
    # rates as count ratios (not 1 - fpr), so a rate equal to the level compares equal
    specificity = np.round((1.0 - fpr) * n_neg) / n_neg
    if target == "sensitivity":
        k = int(np.flatnonzero(tpr >= level)[0])  # the first (largest) threshold reaching it
    else:
        k = int(np.flatnonzero(specificity >= level)[-1])  # the last (smallest) threshold keeping it
        if k == 0:
            raise ValueError(
                f"no finite threshold reaches specificity {level:.0%}: it needs {int(np.ceil(level * n_neg))} of "
                f"{n_neg} negatives below the threshold, and the highest score belongs to a negative"
            )
    return {"threshold": float(thresholds[k]), "sensitivity": float(tpr[k]), "specificity": float(specificity[k]),
            "positives": n_pos, "negatives": n_neg}


def fit_operating_points(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], levels: Sequence[float] = LEVELS
) -> tuple[dict[str, dict], list[str]]:
    """Every operating point of every view of `class_names`, chosen on (validation) `probs` (N, K) and
    `labels` (N,). Returns ({name: point}, notes); a point is {view, positive_classes, target, level,
    threshold, validation: {sensitivity, specificity, positives, negatives}}. Views whose positive
    or negative side has no sample, and unreachable targets, are left out with a note."""
    names = [str(n) for n in class_names]
    labels = np.asarray(labels)
    points, notes = {}, []
    for view, positive in view_classes(names).items():
        truth = np.isin(labels, [names.index(c) for c in positive])
        scores = binary_scores(probs, names, positive)
        for target in TARGETS.values():
            for level in levels:
                name = point_name(view, target, level)
                try:
                    chosen = choose_threshold(truth, scores, target, level)
                except ValueError as exc:
                    notes.append(f"operating point {name} left out: {exc}")
                    continue
                threshold = chosen.pop("threshold")
                points[name] = {"view": view, "positive_classes": positive, "target": target, "level": level,
                                "threshold": threshold, "validation": chosen}
    return points, notes


def decide(probs: np.ndarray, class_names: Sequence[str], point: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,) float64, positive (N,) bool) of `probs` (N, K) at a stored operating point."""
    scores = binary_scores(probs, class_names, point["positive_classes"])
    return scores, scores >= point["threshold"]


def bootstrap_rates(
    truth: np.ndarray, positive: np.ndarray, units: Sequence[str] | None, settings: BootstrapSettings,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals {sensitivity: [lo, hi], specificity: [lo, hi]} of decisions
    `positive` (N,) against `truth` (N,), resampling `units` (N,) (lesion/patient ids from
    `bootstrap.resampling_units`; None: images) with the resamples of `bootstrap.draw_unit_counts`,
    the same draws as the other intervals of a report. A rate no resample defines is [NaN, NaN]."""
    truth, positive = np.asarray(truth, dtype=bool), np.asarray(positive, dtype=bool)
    index = unit_index(units, len(truth))
    n_units = int(index.max()) + 1 if index.size else 0
    # per unit: true positives, positives, true negatives, negatives
    per_unit = np.stack([np.bincount(index, weights=w, minlength=n_units)
                         for w in (truth & positive, truth, ~truth & ~positive, ~truth)], axis=1)
    sums = draw_unit_counts(n_units, settings) @ per_unit
    out = {}
    for name, num, den in (("sensitivity", 0, 1), ("specificity", 2, 3)):
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = np.where(sums[:, den] > 0, sums[:, num] / sums[:, den], np.nan)
        out[name] = percentile_interval(rates, settings.confidence)
    return out


def apply_operating_points(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], points: dict[str, dict],
    units: Sequence[str] | None, settings: BootstrapSettings | None = None,
) -> dict[str, dict]:
    """The stored `points` applied unchanged to `probs` (N, K) with `labels` (N,): per point its
    definition plus ``positives``, ``negatives``, achieved ``sensitivity`` and ``specificity`` (NaN
    when a side has no sample) and their bootstrap intervals (``*_ci``, see `bootstrap_rates`; [NaN,
    NaN] with ``settings.resamples == 0``) resampling `units` (N,) (None: images)."""
    settings = BootstrapSettings() if settings is None else settings
    names = [str(n) for n in class_names]
    labels = np.asarray(labels)
    out = {}
    for name, point in points.items():
        truth = np.isin(labels, [names.index(c) for c in point["positive_classes"]])
        _, positive = decide(probs, names, point)
        n_pos, n_neg = int(truth.sum()), int((~truth).sum())
        intervals = (bootstrap_rates(truth, positive, units, settings) if settings.enabled
                     else {"sensitivity": [float("nan")] * 2, "specificity": [float("nan")] * 2})
        out[name] = {
            **point,
            "positives": n_pos,
            "negatives": n_neg,
            "sensitivity": float((truth & positive).sum() / n_pos) if n_pos else float("nan"),
            "sensitivity_ci": intervals["sensitivity"],
            "specificity": float((~truth & ~positive).sum() / n_neg) if n_neg else float("nan"),
            "specificity_ci": intervals["specificity"],
            "bootstrap": {"replicates": settings.resamples, "seed": settings.seed,
                          "units": len(set(units)) if units is not None else len(labels)},
        }
    return out
