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
bootstrap interval: replicate b resamples the groups (lesions or patients, when the dataset knows
them; else images) with replacement, ``rng.integers(0, G, size=(n_boot, G))[b]`` with
``rng = numpy.random.default_rng(seed)``, and recomputes both rates over the images of the drawn
groups. Replicates without a positive (or negative) image are left out of that rate's interval.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from skindistil.data.vocab import CANCER_CLASSES, MELANOMA_CLASSES
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


def group_index(image_ids: Sequence[str], groups: Sequence[str | None] | None = None) -> np.ndarray:
    """Integer group of each image (N,) for the bootstrap: equal `groups` values share one; an image
    without a group (None, "" or no `groups`) is its own."""
    groups = groups if groups is not None else [None] * len(image_ids)
    keys = [f"group:{g}" if g else f"image:{i}" for i, g in zip(image_ids, groups, strict=True)]
    _, index = np.unique(np.asarray(keys, dtype=str), return_inverse=True)
    return index.ravel()


def bootstrap_rates(
    truth: np.ndarray, positive: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals {sensitivity: [lo, hi], specificity: [lo, hi]} of decisions
    `positive` (N,) against `truth` (N,), resampling `groups` (N,) ints in [0, G) as the module
    docstring describes. A rate no replicate defines is [NaN, NaN]."""
    truth, positive = np.asarray(truth, dtype=bool), np.asarray(positive, dtype=bool)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    # per group: true positives, positives, true negatives, negatives
    per_group = np.stack([np.bincount(groups, weights=w, minlength=n_groups)
                          for w in (truth & positive, truth, ~truth & ~positive, ~truth)], axis=1)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    flat = draws + n_groups * np.arange(n_boot)[:, None]
    weights = np.bincount(flat.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    sums = weights @ per_group
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, num, den in (("sensitivity", 0, 1), ("specificity", 2, 3)):
        defined = sums[:, den] > 0
        rates = sums[defined, num] / sums[defined, den]
        out[name] = np.percentile(rates, [tail, 100 - tail]).tolist() if rates.size else [float("nan")] * 2
    return out


def apply_operating_points(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], points: dict[str, dict],
    groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
) -> dict[str, dict]:
    """The stored `points` applied unchanged to `probs` (N, K) with `labels` (N,): per point its
    definition plus ``positives``, ``negatives``, achieved ``sensitivity`` and ``specificity`` (NaN
    when a side has no sample) and their 95% bootstrap intervals (``*_ci``, see `bootstrap_rates`)
    over `groups` (N,) (`group_index`)."""
    names = [str(n) for n in class_names]
    labels = np.asarray(labels)
    out = {}
    for name, point in points.items():
        truth = np.isin(labels, [names.index(c) for c in point["positive_classes"]])
        _, positive = decide(probs, names, point)
        n_pos, n_neg = int(truth.sum()), int((~truth).sum())
        intervals = bootstrap_rates(truth, positive, groups, n_boot=n_boot, seed=seed)
        out[name] = {
            **point,
            "positives": n_pos,
            "negatives": n_neg,
            "sensitivity": float((truth & positive).sum() / n_pos) if n_pos else float("nan"),
            "sensitivity_ci": intervals["sensitivity"],
            "specificity": float((~truth & ~positive).sum() / n_neg) if n_neg else float("nan"),
            "specificity_ci": intervals["specificity"],
            "bootstrap": {"replicates": n_boot, "seed": seed, "units": int(groups.max()) + 1 if groups.size else 0},
        }
    return out
