"""What a student loses against its teacher, on the same images: paired bootstrap of the BMA difference
and of the retention ratio, McNemar's test, per-class retention, agreement, and the retention gate.

Definitions (teacher T, student S, scored on the same N images with the ISIC tie rule):

- BMA difference = BMA(S) - BMA(T); retention = BMA(S) / BMA(T). Their intervals come from a paired
  bootstrap: both models are scored on the same resampled units in each resample (`bootstrap`).
- Per-class retention of class c = recall_c(S) / recall_c(T) (undefined when T's recall is 0).
- McNemar's test on top-1 correctness: b = images T gets right and S wrong, c = the reverse; the exact
  two-sided binomial p-value of b against Binomial(b + c, 1/2) (scipy.stats.binomtest; 1.0 when b + c
  is 0). It ignores the grouping of images: with lesion groups the bootstrap interval is the figure
  to trust.
- Top-1 agreement = share of images where S and T decide the same class (an undecided row agrees only
  with an undecided row). Cancer agreement = the same share among the images where T or S decides a
  cancer class (MEL, BCC, SCC): do they flag the same lesions as the same cancer?
- The student's loss is *distinguishable from zero* when the interval of the BMA difference excludes 0.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from scipy.stats import binomtest

from skindistil.data.vocab import CANCER_CLASSES
from skindistil.errors import ConfigError
from skindistil.evaluation.bootstrap import (
    DEFAULT_BOOTSTRAP,
    BootstrapSettings,
    WeightedScorer,
    describe_units,
    percentile_interval,
    resample,
)
from skindistil.evaluation.metrics import balanced_accuracy, class_support, confusion_matrix, decide


def mcnemar(teacher_correct: np.ndarray, student_correct: np.ndarray) -> dict:
    """Exact McNemar test on paired top-1 correctness (bool arrays, N each)."""
    teacher_correct, student_correct = np.asarray(teacher_correct, bool), np.asarray(student_correct, bool)
    b = int(np.sum(teacher_correct & ~student_correct))
    c = int(np.sum(~teacher_correct & student_correct))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return {"teacher_only_correct": b, "student_only_correct": c, "p_value": p}


def agreement(teacher_preds: np.ndarray, student_preds: np.ndarray, cancer_index: Collection[int]) -> dict:
    """Top-1 agreement on all images and on the images either model decides as a cancer class."""
    same = np.asarray(teacher_preds) == np.asarray(student_preds)
    flagged = np.isin(teacher_preds, list(cancer_index)) | np.isin(student_preds, list(cancer_index))
    return {"top1": float(np.mean(same)),
            "cancer": float(np.mean(same[flagged])) if flagged.any() else float("nan"),
            "cancer_images": int(flagged.sum())}


def compare_models(teacher_probs: np.ndarray, student_probs: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str], units: Sequence[str] | None = None,
                   settings: BootstrapSettings = DEFAULT_BOOTSTRAP, unit_counts: dict[str, int] | None = None,
                   cancer_classes: Collection[str] = CANCER_CLASSES) -> dict:
    """Teacher vs student on the same images (see the module docstring for every definition).

    teacher_probs, student_probs: (N, K) class scores; labels: (N,) int in [0, K); units: the bootstrap
    unit of each image (`bootstrap.resampling_units`; None resamples images).

    Returns {"balanced_accuracy": {"teacher", "student", "difference": {"value", "interval"}, "retention": {"value",
    "interval"}}, "distinguishable": bool | None, "verdict": words, "mcnemar": `mcnemar`, "agreement":
    `agreement` plus "top1_interval", "per_class": {class: {"teacher_recall", "student_recall",
    "retention", "interval"}}, "bootstrap": settings and unit}. Intervals are [low, high] (NaN bounds
    when undefined; None without resamples).
    """
    names = list(class_names)
    k = len(names)
    labels = np.asarray(labels, dtype=np.int64)
    teacher_probs, student_probs = np.asarray(teacher_probs, float), np.asarray(student_probs, float)
    if teacher_probs.shape != student_probs.shape or teacher_probs.shape != (len(labels), k):
        raise ValueError(f"teacher scores {teacher_probs.shape} and student scores {student_probs.shape} "
                         f"must both be ({len(labels)}, {k})")
    t_preds, s_preds = decide(teacher_probs), decide(student_probs)
    support = class_support(labels, k)
    t_recall = _recall(labels, t_preds, k, support)
    s_recall = _recall(labels, s_preds, k, support)
    t_bma = balanced_accuracy(labels, t_preds, k, names)
    s_bma = balanced_accuracy(labels, s_preds, k, names)
    cancer_index = [i for i, n in enumerate(names) if n in cancer_classes]
    agree = agreement(t_preds, s_preds, cancer_index)

    out = {
        "balanced_accuracy": {"teacher": t_bma, "student": s_bma,
                "difference": {"value": s_bma - t_bma, "interval": None},
                "retention": {"value": s_bma / t_bma if t_bma > 0 else float("nan"), "interval": None}},
        "mcnemar": mcnemar(t_preds == labels, s_preds == labels),
        "agreement": {**agree, "top1_interval": None},
        "per_class": {name: {"teacher_recall": float(t_recall[c]), "student_recall": float(s_recall[c]),
                             "retention": _safe_ratio(s_recall[c], t_recall[c]), "interval": None}
                      for c, name in enumerate(names)},
        "bootstrap": {**settings.describe(),
                      "unit": describe_units(unit_counts) if unit_counts else f"{len(labels)} images"},
    }
    if settings.enabled:
        teacher, student = WeightedScorer(teacher_probs, labels, k), WeightedScorer(student_probs, labels, k)
        same = (t_preds == s_preds).astype(float)

        def paired(w):
            tc, sc = teacher.counts(w), student.counts(w)
            tb, sb = teacher.balanced_accuracy(tc), student.balanced_accuracy(sc)
            return {"difference": sb - tb, "retention": _safe_ratio(sb, tb),
                    "class_retention": _safe_ratio(student.recall(sc), teacher.recall(tc)),
                    "top1": (w @ same) / w.sum(axis=1)}

        values = resample(paired, units, len(labels), settings)
        conf = settings.confidence
        out["balanced_accuracy"]["difference"]["interval"] = percentile_interval(values["difference"], conf)
        out["balanced_accuracy"]["retention"]["interval"] = percentile_interval(values["retention"], conf)
        out["agreement"]["top1_interval"] = percentile_interval(values["top1"], conf)
        for c, name in enumerate(names):
            out["per_class"][name]["interval"] = percentile_interval(values["class_retention"][:, c], conf)
    out["distinguishable"], out["verdict"] = verdict(out)
    return out


def verdict(comparison: dict) -> tuple[bool | None, str]:
    """Whether the student's BMA difference is distinguishable from zero, and the sentence saying so."""
    diff = comparison["balanced_accuracy"]["difference"]
    value, interval = diff["value"], diff["interval"]
    p = comparison["mcnemar"]["p_value"]
    if interval is None or any(np.isnan(interval)):
        return None, (f"BMA difference {value:+.4f}; no bootstrap interval, so whether it is more than noise "
                      f"is not established (McNemar p = {p:.3g}).")
    low, high = interval
    pct = f"{100 * comparison['bootstrap']['confidence']:g}%"
    span = f"{value:+.4f} ({pct} CI {low:+.4f} to {high:+.4f})"
    if low <= 0.0 <= high:
        return False, (f"The BMA difference student - teacher is {span}: the interval contains 0, so the "
                       f"difference is not distinguishable from zero on this set (McNemar p = {p:.3g}).")
    direction = "loss" if high < 0 else "gain"
    return True, (f"The BMA difference student - teacher is {span}: the interval excludes 0, so the student's "
                  f"{direction} is distinguishable from zero on this set (McNemar p = {p:.3g}).")


# ----------------------------------------------------------------------------- retention gate


def parse_retention_gate(items: str | Sequence[str] | dict | None, class_names: Sequence[str] | None = None
                         ) -> dict[str, float]:
    """Minimum per-class retention, from ``["MEL=0.97", "BCC=0.95"]``, ``"MEL=0.97,BCC=0.95"`` or a
    mapping {class: ratio}. Ratios must be positive numbers (0.97 = the student keeps at least 97% of the
    teacher's recall); with `class_names`, every class must be one of them. Raises ConfigError naming the
    item at fault."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        texts = [items] if isinstance(items, str) else list(items)
        pairs = []
        for text in texts:
            for item in str(text).split(","):
                if not item.strip():
                    continue
                name, sep, value = item.partition("=")
                if not sep or not name.strip():
                    raise ConfigError(f"min_class_retention: {item.strip()!r} is not CLASS=RATIO (e.g. MEL=0.97)")
                pairs.append((name.strip(), value.strip()))
    gate = {}
    for name, value in pairs:
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"min_class_retention: {name}={value!r}: the ratio is not a number") from None
        if not np.isfinite(ratio) or ratio <= 0:
            raise ConfigError(f"min_class_retention: {name}={value}: the ratio must be a positive number")
        if class_names is not None and name not in class_names:
            raise ConfigError(f"min_class_retention: unknown class {name!r}; the model's classes are "
                              f"{', '.join(class_names)}")
        gate[name] = ratio
    return gate


def check_retention_gate(comparison: dict, gate: dict[str, float]) -> list[str]:
    """The gate's failures for one student (empty when it passes). A class fails when its retention (the
    point estimate) is below the minimum, or is undefined (the teacher never recalls it, or the split
    has no image of it): a gate that cannot be checked is not passed."""
    failures = []
    for name, minimum in gate.items():
        row = comparison["per_class"].get(name)
        if row is None:
            failures.append(f"{name}: not a class of the model")
            continue
        ratio = row["retention"]
        if ratio is None or np.isnan(ratio):
            failures.append(f"{name}: retention undefined (teacher recall {_fmt(row['teacher_recall'])}), "
                            f"minimum {minimum:g}")
        elif ratio < minimum:
            failures.append(f"{name}: retention {ratio:.4f} < minimum {minimum:g} (student recall "
                            f"{_fmt(row['student_recall'])}, teacher {_fmt(row['teacher_recall'])})")
    return failures


def _recall(labels, preds, k, support) -> np.ndarray:
    tp = np.diag(confusion_matrix(labels, preds, k)).astype(float)
    return np.divide(tp, support, out=np.full(k, np.nan), where=support > 0)


def _safe_ratio(num, den):
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)
    return float(out) if out.ndim == 0 else out


def _fmt(value) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"
