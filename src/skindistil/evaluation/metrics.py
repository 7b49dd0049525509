"""Classification metrics: pure functions over numpy arrays.

Conventions shared by every function here:

- ``labels``: int array (N,), the true class index of each sample, in [0, K).
- ``probs``: float array (N, K), one score per class (probabilities; an ISIC submission need not
  sum to 1, so nothing here assumes it does unless a docstring says so).
- ``preds``: int array (N,), the decided class of each sample, or ``UNDECIDED`` where the top score
  is shared (see `decide`). An undecided sample is wrong for every class.
- A class is *absent* when no sample has it as its true label. Means over classes ("macro") run over
  the classes present in the truth; per-class values that would be 0/0 are NaN.

The ISIC 2019 challenge scorer (PyPI ``isic-challenge-scoring``) is the reference for the balanced
accuracy, the tie rule, ROC AUC, the AUC above 80% sensitivity and average precision; the tests check
parity with it. The confusion matrix, precision/recall/F1, ROC curve, ROC AUC and average precision
are scikit-learn's; what is ISIC's own (the tie rule, the AUC above a sensitivity, the cancer view,
ISIC 2024's partial AUC) is written here on top of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence

import numpy as np

from skindistil.data.vocab import CANCER_CLASSES

UNDECIDED = -1
# ISIC 2019's "none of the above" category: a class of its test truth, not a diagnosis.
UNKNOWN_CLASS = "UNK"


class AbsentClassWarning(UserWarning):
    """Some classes have no sample in the truth: their recall and AUC are undefined (NaN)."""


def decide(probs: np.ndarray) -> np.ndarray:
    """Top-1 class of each row, ISIC style: the argmax, or ``UNDECIDED`` (-1) where two or more
    classes share the exact maximum score. An exact tie is thus wrong for every class, as in the
    official ISIC scorer ("undecided")."""
    probs = _as_probs(probs)
    top = probs.max(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)
    preds[(probs == top).sum(axis=1) > 1] = UNDECIDED
    return preds


def class_support(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of samples of each true class, shape (K,)."""
    labels = _as_labels(labels, num_classes)
    return np.bincount(labels, minlength=num_classes)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of samples of true class i decided as class j, shape (K, K).

    Undecided samples appear in no column: row i sums to the support of class i minus its
    undecided samples.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    labels, preds = _as_labels(labels, num_classes), _as_preds(preds, num_classes)
    _same_length(labels, preds)
    decided = preds != UNDECIDED
    if not decided.any():  # scikit-learn refuses an empty input
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return sk_confusion_matrix(labels[decided], preds[decided], labels=np.arange(num_classes)).astype(np.int64)


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Fraction of samples whose decided class is the true class (undecided samples are wrong)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    _same_length(labels, preds)
    if labels.size == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.mean(labels == preds))


def balanced_accuracy(
    labels: np.ndarray,
    preds: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> float:
    """Balanced multi-class accuracy (BMA), the ISIC 2019 ranking metric.

    BMA = mean over the classes present in the truth of recall_c = TP_c / support_c, where an
    undecided sample counts in support_c and never in TP_c. Absent classes are left out of the mean
    (the official scorer does the same: its 0/0 recall is NaN and its mean skips NaN) and an
    `AbsentClassWarning` names them.
    """
    support = class_support(labels, num_classes)
    cm = confusion_matrix(labels, preds, num_classes)
    present = _present_or_raise(support)
    warn_absent_classes(support, class_names)
    return float(np.mean(np.diag(cm)[present] / support[present]))


def warn_absent_classes(support: np.ndarray, class_names: Sequence[str] | None = None) -> list[str]:
    """Emit an `AbsentClassWarning` naming the classes with zero support; return their names."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(support))]
    absent = [names[i] for i in np.flatnonzero(support == 0)]
    if absent:
        warnings.warn(
            f"no truth samples for class(es) {', '.join(absent)}: balanced accuracy and macro means "
            f"average the {len(names) - len(absent)} present classes; their recall and AUC are NaN",
            AbsentClassWarning,
            stacklevel=3,
        )
    return absent


def precision_recall_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, object]:
    """Per-class precision, recall and F1 with their macro and support-weighted means.

    precision_c = TP_c / (TP_c + FP_c), taken as 0 when class c is never predicted (scikit-learn's
    ``zero_division=0``: a class the model never outputs lowers the macro mean);
    recall_c = TP_c / support_c (NaN for an absent class); F1_c = 2 P R / (P + R), 0 when P + R = 0.
    macro_* = unweighted mean over classes present in the truth; weighted_* = mean weighted by support
    (so weighted recall equals accuracy).
    """
    from sklearn.metrics import precision_recall_fscore_support

    support = class_support(labels, num_classes)
    present = _present_or_raise(support)
    preds = _as_preds(preds, num_classes)
    _same_length(np.asarray(labels), preds)
    # undecided (-1) is no class of `labels`: a false negative of its true class, nobody's false positive
    precision, recall, f1, _ = precision_recall_fscore_support(
        np.asarray(labels), preds, labels=np.arange(num_classes), average=None, zero_division=0)
    precision, recall, f1 = precision.astype(float), recall.astype(float), f1.astype(float)
    recall[~present] = np.nan
    f1[~present] = np.nan
    out: dict[str, object] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    weights = support[present] / support[present].sum()
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{name}"] = float(np.mean(values[present]))
        out[f"weighted_{name}"] = float(np.sum(weights * values[present]))
    return out


def one_vs_rest_rates(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Diagnostic-test rates of each class against the rest, from the decided classes.

    For class c: TP = true c decided c; FN = true c decided otherwise or undecided; FP = other
    classes decided c; TN = the remaining samples. sensitivity = TP/(TP+FN), specificity =
    TN/(TN+FP), ppv = TP/(TP+FP), npv = TN/(TN+FN); each is NaN when its denominator is 0 (unlike
    `precision_recall_f1`, nothing is imputed here). Note the official ISIC scorer's per-category
    table instead thresholds each class score at 0.5.
    """
    support = class_support(labels, num_classes)
    cm = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(cm).astype(float)
    fn = support - tp
    fp = cm.sum(axis=0) - tp
    tn = len(np.asarray(labels)) - tp - fn - fp
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a binary problem: (fpr, tpr, thresholds), one point per distinct score.

    Point k classifies ``score >= thresholds[k]`` as positive; the curve starts at (0, 0) with
    threshold +inf. Tied scores move in one step, so the trapezoid area under this curve counts a
    tied positive/negative pair as half right (the Mann-Whitney AUC). Needs both classes present.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = _binary_inputs(y_true, scores)
    if not _has_both_classes(y):
        raise ValueError("a ROC curve needs at least one positive and one negative sample")
    fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    thresholds[0] = np.inf  # scikit-learn's start point, whatever its version writes there
    return fpr, tpr, thresholds


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`: the trapezoid over `roc_curve`, so
    ties count half). NaN when the truth has only one class."""
    from sklearn.metrics import roc_auc_score

    y, s = _binary_inputs(y_true, scores)
    if not _has_both_classes(y):
        return float("nan")
    return float(roc_auc_score(y, s))


def auc_above_sensitivity(y_true: np.ndarray, scores: np.ndarray, min_sensitivity: float = 0.8) -> float:
    """ISIC's "auc_sens_80": the area under the part of the ROC curve where TPR >= min_sensitivity.

    As in the official scorer: find the first ROC point with TPR >= min_sensitivity, add the point
    where the curve (linearly interpolated) crosses TPR = min_sensitivity, and integrate TPR over FPR
    from that crossing's FPR to 1 with the trapezoid rule. The area is not normalised: it includes
    the band below TPR = min_sensitivity, a perfect ranking scores 1.0 and a random one
    (1 - s^2) / 2 for s = min_sensitivity (0.18 at 0.8). NaN when the truth has only one class.
    """
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    if not _has_both_classes(y_true):
        return float("nan")
    fpr, tpr, _ = roc_curve(y_true, scores)
    k = int(np.searchsorted(tpr, min_sensitivity, side="left"))
    # tpr[k - 1] < min_sensitivity <= tpr[k]; tpr[0] = 0 so k >= 1.
    fpr_cross = np.interp(min_sensitivity, tpr[k - 1 : k + 1], fpr[k - 1 : k + 1])
    return _trapezoid(np.r_[fpr_cross, fpr[k:]], np.r_[min_sensitivity, tpr[k:]])


def partial_auc_above_tpr(y_true: np.ndarray, scores: np.ndarray, min_tpr: float = 0.8) -> float:
    """ISIC 2024 (SLICE-3D) primary metric: the partial ROC area above a true positive rate of `min_tpr`.

    As the challenge's published metric computes it: flip the labels (benign becomes the positive
    class) and the scores (``1 - score``), take the ROC curve of that flipped problem up to a false
    positive rate of ``max_fpr = 1 - min_tpr`` (the point at max_fpr linearly interpolated) and
    integrate it with the trapezoid rule, without McClish standardisation. In the original problem
    this is the area of the band TPR in [min_tpr, 1] that lies under the ROC curve. Range
    [0, 1 - min_tpr]: 0.2 for a perfect ranking at 0.8, 0.02 for a random one. Tied scores move in
    one step (a tied pair counts half). Scores are probabilities, usually in [0, 1]; ``1 - score``
    is kept (rather than ``-score``) because the challenge uses it and its rounding can tie two
    nearly equal scores. NaN when the truth has only one class.
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    y, s = _binary_inputs(y_true, scores)
    if not _has_both_classes(y):
        return float("nan")
    max_fpr = 1.0 - min_tpr
    fpr, tpr, _ = roc_curve(~y, 1.0 - s)
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    # fpr[stop - 1] <= max_fpr < fpr[stop]; fpr[0] = 0 and fpr[-1] = 1 > max_fpr
    tpr_at_max = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    return _trapezoid(np.r_[fpr[:stop], max_fpr], np.r_[tpr[:stop], tpr_at_max])


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: AP = sum_k (R_k - R_{k-1}) P_k over the distinct score thresholds in
    decreasing order (R_0 = 0), with P_k and R_k the precision and recall of ``score >= t_k``. This
    is the step-wise (non-interpolated) area under the precision-recall curve, as scikit-learn and
    the ISIC scorer define it. NaN when there is no positive sample."""
    from sklearn.metrics import average_precision_score

    y, s = _binary_inputs(y_true, scores)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-1 reliability table over `n_bins` equal-width confidence bins (b/n, (b+1)/n].

    Confidence = the row's maximum score; a sample is correct when `decide` picks its true class
    (an exact tie is wrong). Returns ``edges`` (n+1,), and per bin ``count``, mean ``confidence`` and
    ``accuracy`` (NaN for empty bins). A confidence of 0 falls in the first bin.
    """
    probs = _as_probs(probs)
    labels = _as_labels(labels, probs.shape[1])
    _same_length(labels, probs)
    confidence = probs.max(axis=1)
    correct = (decide(probs) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(bin_of, minlength=n_bins)
    return {
        "edges": edges,
        "count": count,
        "confidence": _ratio(np.bincount(bin_of, weights=confidence, minlength=n_bins), count),
        "accuracy": _ratio(np.bincount(bin_of, weights=correct, minlength=n_bins), count),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins b of (n_b / N) * |accuracy_b - confidence_b|, on the top-1 confidence
    with `n_bins` equal-width bins (see `reliability_bins`)."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    weights = bins["count"][filled] / bins["count"].sum()
    return float(np.sum(weights * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])))


def cancer_scores(
    probs: np.ndarray, class_names: Sequence[str], cancer_classes: Collection[str] = CANCER_CLASSES
) -> np.ndarray | None:
    """Probability of cancer per row: the summed scores of the cancer classes divided by the row
    sum (equal to the plain sum for softmax outputs; ISIC CSV rows need not sum to 1). A row of
    zeros scores 0. None when no class of `class_names` is a cancer class."""
    probs = _as_probs(probs)
    is_cancer = np.array([name in cancer_classes for name in class_names])
    if len(is_cancer) != probs.shape[1]:
        raise ValueError(f"{len(is_cancer)} class names for {probs.shape[1]} score columns")
    if not is_cancer.any():
        return None
    total = probs.sum(axis=1)
    return np.divide(probs[:, is_cancer].sum(axis=1), total, out=np.zeros(len(probs)), where=total > 0)


def cancer_view(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    cancer_classes: Collection[str] = CANCER_CLASSES,
    threshold: float = 0.5,
) -> dict[str, object] | None:
    """Cancer vs non-cancer as a binary problem (cancer = MEL, BCC, SCC by default).

    Score = `cancer_scores`; decided cancer when score > threshold. Returns the cancer classes
    found, support of each side, sensitivity, specificity (NaN if a side has no sample) and ROC
    AUC of the score. None when `class_names` holds no cancer class. UNK (`UNKNOWN_CLASS`) is no
    diagnosis: its truth rows and its score column are left out (``unknown_left_out`` counts the rows).
    """
    names = list(class_names)
    labels = _as_labels(labels, len(names))
    left_out = 0
    if UNKNOWN_CLASS in names:
        unk = names.index(UNKNOWN_CLASS)
        rows = labels != unk
        left_out = int((~rows).sum())
        probs = np.delete(_as_probs(probs)[rows], unk, axis=1)
        labels = labels[rows] - (labels[rows] > unk)
        names = names[:unk] + names[unk + 1 :]
    scores = cancer_scores(probs, names, cancer_classes)
    if scores is None:
        return None
    cancer_idx = [i for i, name in enumerate(names) if name in cancer_classes]
    truth = np.isin(labels, cancer_idx)
    decided = scores > threshold
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    return {
        "cancer_classes": [names[i] for i in cancer_idx],
        "threshold": threshold,
        "support": {"cancer": n_pos, "non_cancer": n_neg},
        "sensitivity": float(np.sum(decided & truth) / n_pos) if n_pos else float("nan"),
        "specificity": float(np.sum(~decided & ~truth) / n_neg) if n_neg else float("nan"),
        "auc": roc_auc(truth, scores),
        **({"unknown_left_out": left_out} if UNKNOWN_CLASS in class_names else {}),
    }


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], n_bins: int = 15
) -> dict[str, object]:
    """Every metric of a classifier's scores on one labelled set, as plain Python values.

    Keys: ``classes``, ``num_samples``, ``undecided`` (rows with tied top scores), ``absent_classes``
    (no truth sample), ``complete`` (no class absent: the means cover every class),
    ``headline`` (balanced_accuracy, accuracy, macro/weighted precision, recall and F1, macro_auc,
    macro_auc_sens_80, macro_average_precision, ece: macro means over classes whose value is
    defined), ``per_class`` (class -> support, sensitivity, specificity, ppv, npv, f1, auc,
    auc_sens_80, average_precision), ``confusion_matrix`` (counts, undecided per true class),
    ``reliability`` (`reliability_bins`), ``cancer`` (`cancer_view` or None) and ``notes``.
    Undefined values are float NaN. Warns with `AbsentClassWarning` when a class has no sample.
    """
    names = [str(n) for n in class_names]
    probs = _as_probs(probs)
    k = len(names)
    if probs.shape[1] != k:
        raise ValueError(f"{k} class names for {probs.shape[1]} score columns")
    labels = _as_labels(labels, k)
    _same_length(labels, probs)

    preds = decide(probs)
    support = class_support(labels, k)
    cm = confusion_matrix(labels, preds, k)
    prf = precision_recall_f1(labels, preds, k)
    rates = one_vs_rest_rates(labels, preds, k)
    onehot = labels[:, None] == np.arange(k)[None, :]
    auc = np.array([roc_auc(onehot[:, c], probs[:, c]) for c in range(k)])
    auc80 = np.array([auc_above_sensitivity(onehot[:, c], probs[:, c]) for c in range(k)])
    ap = np.array([average_precision(onehot[:, c], probs[:, c]) for c in range(k)])
    absent = [names[i] for i in np.flatnonzero(support == 0)]
    undecided = preds == UNDECIDED

    headline = {
        "balanced_accuracy": balanced_accuracy(labels, preds, k, names),
        "accuracy": accuracy(labels, preds),
        **{
            f"{avg}_{m}": prf[f"{avg}_{m}"]
            for avg in ("macro", "weighted")
            for m in ("precision", "recall", "f1")
        },
        "macro_auc": _nanmean(auc),
        "macro_auc_sens_80": _nanmean(auc80),
        "macro_average_precision": _nanmean(ap),
        "ece": expected_calibration_error(probs, labels, n_bins),
    }
    per_class = {
        name: {
            "support": int(support[c]),
            "sensitivity": float(rates["sensitivity"][c]),
            "specificity": float(rates["specificity"][c]),
            "ppv": float(rates["ppv"][c]),
            "npv": float(rates["npv"][c]),
            "f1": float(prf["f1"][c]),
            "auc": float(auc[c]),
            "auc_sens_80": float(auc80[c]),
            "average_precision": float(ap[c]),
        }
        for c, name in enumerate(names)
    }
    bins = reliability_bins(probs, labels, n_bins)
    notes = []
    if absent:
        notes.append(
            f"no truth samples for {', '.join(absent)}: left out of balanced accuracy and macro means; "
            "their sensitivity and AUC are undefined"
        )
    if undecided.any():
        notes.append(f"{int(undecided.sum())} row(s) with a tied top score count as wrong (ISIC 'undecided')")
    cancer = cancer_view(probs, labels, names)
    if cancer is None:
        notes.append(f"no cancer view: none of {', '.join(names)} is a cancer class")
    elif UNKNOWN_CLASS in names:
        notes.append(f"cancer view: the {cancer['unknown_left_out']} UNK image(s) and the UNK score are left out "
                     "(UNK is no diagnosis)")
    return {
        "classes": names,
        "num_samples": int(len(labels)),
        "undecided": int(undecided.sum()),
        "absent_classes": absent,
        "complete": not absent,
        "headline": headline,
        "per_class": per_class,
        "confusion_matrix": {
            "counts": cm.tolist(),
            "undecided": np.bincount(labels[undecided], minlength=k).tolist(),
        },
        "reliability": {key: value.tolist() for key, value in bins.items()},
        "cancer": cancer,
        "notes": notes,
    }


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"scores must be a 2-D array (samples, classes), got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("scores contain NaN or infinite values")
    return probs


def _as_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels


def _as_preds(preds: np.ndarray, num_classes: int) -> np.ndarray:
    preds = np.asarray(preds).astype(np.int64)
    if preds.ndim != 1 or (preds.size and (preds.min() < UNDECIDED or preds.max() >= num_classes)):
        raise ValueError(f"predictions must be a 1-D array of classes in [0, {num_classes}) or UNDECIDED")
    return preds


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} labels for {len(b)} predictions")


def _present_or_raise(support: np.ndarray) -> np.ndarray:
    present = support > 0
    if not present.any():
        raise ValueError("no samples: the metric is undefined")
    return present


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise num / den with NaN where den is 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _binary_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    _same_length(y, s)
    if y.size == 0:
        raise ValueError("no samples: the metric is undefined")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def _has_both_classes(y_true: np.ndarray) -> bool:
    y = np.asarray(y_true).astype(bool)
    return bool(y.any() and not y.all())
