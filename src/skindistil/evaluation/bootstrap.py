"""Bootstrap confidence intervals for the classification metrics, vectorised over resamples.

The resampling unit is the most correlated group an image belongs to (`resampling_units`): its patient
when the dataset gives one, else its lesion, else the image itself. One resample draws as many units as
there are, with replacement, from a seeded ``numpy.random.Generator``; an image's weight in the resample
is the number of times its unit was drawn. Every metric of a resample is then a weighted version of the
metric of `skindistil.evaluation.metrics` (integer weights = duplicated rows, so the weighted value is
exactly the metric of the duplicated set; a test checks this against a hand loop), computed for all
resamples at once with matrix products and run sums instead of a Python loop.

Intervals are percentile intervals (the (1-c)/2 and (1+c)/2 quantiles of the resampled values, c = 0.95
by default) over 1,000 resamples by default.

A resample in which a class has no sample: the class's recall and AUC are undefined (NaN) in that
resample and left out of its interval; the balanced accuracy and macro means of that resample average
the classes present, as the ISIC scorer does on a set lacking a class. `resamples_missing_a_class`
counts such resamples, so a report can say how often it happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from skindistil.errors import ConfigError
from skindistil.evaluation.metrics import UNDECIDED, decide

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 42
_CHUNK = 250  # resamples per vectorised block: bounds memory at _CHUNK x N weights
MIN_SENSITIVITY = 0.8  # ISIC's auc_sens_80


@dataclass(frozen=True)
class BootstrapSettings:
    """How intervals are drawn: `resamples` (0 turns intervals off), `confidence` in (0, 1), `seed`."""

    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        if not isinstance(self.resamples, int) or self.resamples < 0:
            raise ConfigError(f"bootstrap resamples: must be a whole number >= 0 (0: no intervals), got {self.resamples!r}")
        if not 0.0 < float(self.confidence) < 1.0:
            raise ConfigError(f"bootstrap confidence: must lie in (0, 1), got {self.confidence!r}")

    @property
    def enabled(self) -> bool:
        return self.resamples > 0

    def describe(self) -> dict:
        return {"method": "percentile bootstrap", "resamples": self.resamples, "confidence": self.confidence,
                "seed": self.seed}


DEFAULT_BOOTSTRAP = BootstrapSettings()


def resampling_units(image_ids: Sequence[str], lesion_ids: Sequence[str | None] | None = None,
                     patient_ids: Sequence[str | None] | None = None) -> tuple[list[str], dict[str, int]]:
    """The bootstrap unit of each image: ``patient:<id>`` when it has a patient id, else
    ``lesion:<id>`` when it has a lesion id, else ``image:<id>``. Empty or None ids count as missing.

    Returns (unit per image, number of distinct units of each kind, e.g. {"patient": 0, "lesion": 412,
    "image": 3}).
    """
    n = len(image_ids)
    lesions = list(lesion_ids) if lesion_ids is not None else [None] * n
    patients = list(patient_ids) if patient_ids is not None else [None] * n
    if len(lesions) != n or len(patients) != n:
        raise ValueError(f"{n} images but {len(lesions)} lesion ids and {len(patients)} patient ids")
    units = []
    for image, lesion, patient in zip(image_ids, lesions, patients, strict=True):
        if patient:
            units.append(f"patient:{patient}")
        elif lesion:
            units.append(f"lesion:{lesion}")
        else:
            units.append(f"image:{image}")
    kinds = {"patient": set(), "lesion": set(), "image": set()}
    for unit in units:
        kind, _, _ = unit.partition(":")
        kinds[kind].add(unit)
    return units, {kind: len(found) for kind, found in kinds.items()}


def describe_units(counts: dict[str, int]) -> str:
    """Words for `resampling_units`' counts, e.g. "412 lesions and 3 images"."""
    parts = [f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in counts.items() if n]
    return " and ".join(parts) if parts else "no units"


def unit_index(units: Sequence[str] | None, n: int) -> np.ndarray:
    """Integer id (0..G-1, in order of first appearance) of each image's unit; one unit per image
    when `units` is None."""
    if units is None:
        return np.arange(n)
    if len(units) != n:
        raise ValueError(f"{len(units)} resampling units for {n} samples")
    _, first, inverse = np.unique(np.asarray(units, dtype=object).astype(str), return_index=True,
                                  return_inverse=True)
    # renumber by first appearance so the draws do not depend on how the ids sort
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse]


def draw_unit_counts(num_units: int, settings: BootstrapSettings) -> np.ndarray:
    """How often each unit is drawn in each resample, (resamples, num_units) int64: resample b draws
    ``rng.integers(0, num_units, num_units)`` with ``rng = numpy.random.default_rng(seed)``, resample
    after resample."""
    rng = np.random.default_rng(settings.seed)
    draws = rng.integers(0, num_units, size=(settings.resamples, num_units))
    offsets = np.arange(settings.resamples)[:, None] * num_units
    return np.bincount((draws + offsets).ravel(), minlength=settings.resamples * num_units).reshape(
        settings.resamples, num_units)


def weight_blocks(units: Sequence[str] | None, n: int, settings: BootstrapSettings):
    """Yield the image weights of the resamples, (block, N) float64 blocks of at most _CHUNK rows."""
    index = unit_index(units, n)
    counts = draw_unit_counts(int(index.max()) + 1 if n else 0, settings)
    for start in range(0, settings.resamples, _CHUNK):
        yield counts[start:start + _CHUNK][:, index].astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float) -> list[float]:
    """[low, high] percentile interval of the defined (non-NaN) values, along axis 0; NaN when none is."""
    values = np.asarray(values, dtype=float)
    tail = 100 * (1 - confidence) / 2
    defined = ~np.isnan(values)
    if values.ndim == 1:
        if not defined.any():
            return [float("nan"), float("nan")]
        low, high = np.percentile(values[defined], [tail, 100 - tail])
        return [float(low), float(high)]
    return [percentile_interval(values[:, j], confidence) for j in range(values.shape[1])]


# ----------------------------------------------------------------------------- weighted metrics


class WeightedScorer:
    """The metrics of one model's scores under many weightings of its samples at once.

    Built once from probs (N, K) and labels (N,); each method takes weights (B, N) and returns one
    value per weighting (B,) or (B, K), with the definitions of `skindistil.evaluation.metrics` (ISIC
    tie rule: an undecided row is wrong for every class).
    """

    def __init__(self, probs: np.ndarray, labels: np.ndarray, num_classes: int):
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        k = num_classes
        self.probs, self.labels, self.num_classes = probs, labels, k
        self.preds = decide(probs)
        self.truth = (labels[:, None] == np.arange(k)).astype(np.float64)  # (N, K)
        self.decided = ((self.preds[:, None] == np.arange(k)) & (self.preds[:, None] != UNDECIDED)).astype(np.float64)
        self.correct = (self.preds == labels).astype(np.float64)
        self._runs = [_score_runs(probs[:, c]) for c in range(k)]

    def counts(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Weighted counts per class, (B, K) each: ``support`` (true class), ``tp`` (decided as the
        true class) and ``predicted`` (decided as the class); and ``correct`` and ``total`` (B,)."""
        return {"support": w @ self.truth, "tp": w @ (self.truth * self.decided), "predicted": w @ self.decided,
                "correct": w @ self.correct, "total": w.sum(axis=1)}

    @staticmethod
    def recall(counts: dict[str, np.ndarray]) -> np.ndarray:
        """Per-class recall (B, K); NaN for a class without weight."""
        return _ratio(counts["tp"], counts["support"])

    @staticmethod
    def balanced_accuracy(counts: dict[str, np.ndarray]) -> np.ndarray:
        return _nanmean_rows(WeightedScorer.recall(counts))

    @staticmethod
    def accuracy(counts: dict[str, np.ndarray]) -> np.ndarray:
        return counts["correct"] / counts["total"]

    @staticmethod
    def macro_f1(counts: dict[str, np.ndarray]) -> np.ndarray:
        """Macro F1 over the classes present (precision 0 for a class never predicted, as
        `precision_recall_f1`)."""
        tp, predicted, support = counts["tp"], counts["predicted"], counts["support"]
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        f1[support == 0] = np.nan
        return _nanmean_rows(f1)

    def roc(self, w: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """ROC points (fpr, tpr), (B, R+1) each, of class c against the rest, one point per distinct
        score as `metrics.roc_curve`; NaN rows where a side has no weight."""
        order, starts = self._runs[c]
        ws = w[:, order]
        positive = np.cumsum(ws * self.truth[order, c], axis=1)
        total = np.cumsum(ws, axis=1)
        if len(starts) < len(order):  # tied scores move together: keep the last point of each run
            ends = np.r_[starts[1:], len(order)] - 1
            positive, total = positive[:, ends], total[:, ends]
        tps = np.hstack([np.zeros((len(w), 1)), positive])
        fps = np.hstack([np.zeros((len(w), 1)), total - positive])
        return _ratio(fps, fps[:, -1:]), _ratio(tps, tps[:, -1:])

    def auc(self, w: np.ndarray, min_sensitivity: float = MIN_SENSITIVITY) -> tuple[np.ndarray, np.ndarray]:
        """Per-class ROC AUC and ISIC auc_sens_80 (area where TPR >= `min_sensitivity`), (B, K) each,
        as `metrics.roc_auc` and `metrics.auc_above_sensitivity`; NaN where a side has no weight."""
        auc = np.empty((len(w), self.num_classes))
        above = np.empty_like(auc)
        rows = np.arange(len(w))
        for c in range(self.num_classes):
            fpr, tpr = self.roc(w, c)
            defined = ~np.isnan(tpr[:, -1]) & ~np.isnan(fpr[:, -1])
            if not defined.all():
                fpr, tpr = np.nan_to_num(fpr), np.nan_to_num(tpr, nan=1.0)
            segments = np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2  # segment j: point j -> j+1
            auc[:, c] = np.where(defined, segments.sum(axis=1), np.nan)
            # the first point with TPR >= s is k (>= 1 since tpr[:, 0] = 0); the curve crosses s between k-1 and k
            k = np.maximum(np.argmax(tpr >= min_sensitivity, axis=1), 1)
            t0, t1, f0, f1 = tpr[rows, k - 1], tpr[rows, k], fpr[rows, k - 1], fpr[rows, k]
            cross = f0 + (min_sensitivity - t0) * _ratio(f1 - f0, t1 - t0, fill=0.0)
            after = np.arange(segments.shape[1])[None, :] >= k[:, None]
            area = (f1 - cross) * (min_sensitivity + t1) / 2 + np.sum(segments * after, axis=1)
            above[:, c] = np.where(defined, area, np.nan)
        return auc, above


def _score_runs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort order (decreasing score) and the start of each run of equal scores in it."""
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    return order, starts


def headline_statistics(scorer: WeightedScorer, w: np.ndarray) -> dict[str, np.ndarray]:
    """The headline metrics with intervals, per weighting: balanced_accuracy, accuracy, macro_f1,
    macro_auc, macro_auc_sens_80 (B,), and per class sensitivity, auc and support (B, K)."""
    counts = scorer.counts(w)
    auc, auc_sens_80 = scorer.auc(w)
    return {
        "balanced_accuracy": scorer.balanced_accuracy(counts),
        "accuracy": scorer.accuracy(counts),
        "macro_f1": scorer.macro_f1(counts),
        "macro_auc": _nanmean_rows(auc),
        "macro_auc_sens_80": _nanmean_rows(auc_sens_80),
        "sensitivity": scorer.recall(counts),
        "auc": auc,
        "support": counts["support"],
    }


def resample(statistics: Callable[[np.ndarray], dict[str, np.ndarray]], units: Sequence[str] | None, n: int,
             settings: BootstrapSettings) -> dict[str, np.ndarray]:
    """`statistics(weights)` over every resample: each value stacked to (resamples, ...)."""
    blocks = [statistics(w) for w in weight_blocks(units, n, settings)]
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}


def metric_intervals(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     units: Sequence[str] | None = None, settings: BootstrapSettings = DEFAULT_BOOTSTRAP,
                     unit_counts: dict[str, int] | None = None) -> dict:
    """Bootstrap intervals of the headline metrics (balanced_accuracy, accuracy, macro_f1, macro_auc,
    macro_auc_sens_80) and of each class's sensitivity (recall) and AUC.

    Returns {**settings.describe(), "unit": words, "units": G, "resamples_missing_a_class": count,
    "headline": {metric: [low, high]}, "per_class": {class: {"sensitivity": [low, high], "auc": [low,
    high]}}}; an undefined bound is NaN.
    """
    names = list(class_names)
    labels = np.asarray(labels)
    scorer = WeightedScorer(probs, labels, len(names))
    values = resample(lambda w: headline_statistics(scorer, w), units, len(labels), settings)
    present = np.bincount(labels, minlength=len(names)) > 0
    missing = int(np.sum(np.any((values["support"] == 0) & present[None, :], axis=1)))
    conf = settings.confidence
    index = unit_index(units, len(labels))
    return {
        **settings.describe(),
        "unit": describe_units(unit_counts) if unit_counts else f"{len(labels)} images",
        "units": int(index.max()) + 1,
        "resamples_missing_a_class": missing,
        "headline": {key: percentile_interval(values[key], conf)
                     for key in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "macro_auc_sens_80")},
        "per_class": {name: {"sensitivity": percentile_interval(values["sensitivity"][:, c], conf),
                             "auc": percentile_interval(values["auc"][:, c], conf)}
                      for c, name in enumerate(names)},
    }


def _ratio(num: np.ndarray, den: np.ndarray, fill: float = np.nan) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    return np.divide(num, den, out=np.full(num.shape, fill), where=den > 0)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    defined = ~np.isnan(values)
    total = np.where(defined, values, 0.0).sum(axis=1)
    count = defined.sum(axis=1)
    return np.divide(total, count, out=np.full(len(values), np.nan), where=count > 0)
