"""Metrics: hand-computed cases, and parity with the official ISIC 2019 scorer (isic-challenge-scoring)."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic

from skindistil.data.vocab import ISIC2019
from skindistil.evaluation import metrics as m
from skindistil.evaluation.calibration import apply_temperature, fit_temperature, temperature_nll

CLASSES = ISIC2019.to_list()
K = len(CLASSES)


# ---- hand computations -------------------------------------------------------------------------

# 3 classes, 8 samples; row 7 is an exact tie (undecided).
HAND_LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
HAND_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # 0 -> 0
        [0.6, 0.3, 0.1],  # 0 -> 0
        [0.2, 0.5, 0.3],  # 0 -> 1
        [0.1, 0.8, 0.1],  # 1 -> 1
        [0.5, 0.4, 0.1],  # 1 -> 0
        [0.1, 0.1, 0.8],  # 2 -> 2
        [0.2, 0.2, 0.6],  # 2 -> 2
        [0.4, 0.2, 0.4],  # 2 -> tie between 0 and 2: undecided
    ]
)


def test_decide_marks_exact_ties_undecided():
    preds = m.decide(HAND_PROBS)
    assert preds.tolist() == [0, 0, 1, 1, 0, 2, 2, m.UNDECIDED]
    assert m.decide(np.full((2, 4), 0.25)).tolist() == [m.UNDECIDED, m.UNDECIDED]


def test_confusion_matrix_accuracy_and_balanced_accuracy_by_hand():
    preds = m.decide(HAND_PROBS)
    cm = m.confusion_matrix(HAND_LABELS, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 2]]  # the undecided row is in no column
    assert m.accuracy(HAND_LABELS, preds) == pytest.approx(5 / 8)
    # recalls 2/3, 1/2, 2/3 (the tie counts in class 2's support)
    assert m.balanced_accuracy(HAND_LABELS, preds, 3) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_precision_recall_f1_by_hand():
    out = m.precision_recall_f1(HAND_LABELS, m.decide(HAND_PROBS), 3)
    precision = np.array([2 / 3, 1 / 2, 2 / 2])
    recall = np.array([2 / 3, 1 / 2, 2 / 3])
    f1 = 2 * precision * recall / (precision + recall)
    np.testing.assert_allclose(out["precision"], precision)
    np.testing.assert_allclose(out["recall"], recall)
    np.testing.assert_allclose(out["f1"], f1)
    support = np.array([3, 2, 3])
    assert out["macro_f1"] == pytest.approx(f1.mean())
    assert out["weighted_precision"] == pytest.approx((support * precision).sum() / 8)
    assert out["weighted_recall"] == pytest.approx(5 / 8)  # weighted recall is accuracy


def test_never_predicted_class_has_zero_precision_in_macro_mean():
    labels = np.array([0, 1, 1])
    preds = np.array([0, 0, 0])
    out = m.precision_recall_f1(labels, preds, 2)
    assert out["precision"].tolist() == [pytest.approx(1 / 3), 0.0]
    assert out["macro_precision"] == pytest.approx(1 / 6)
    assert np.isnan(m.one_vs_rest_rates(labels, preds, 2)["ppv"][1])  # the rates table leaves 0/0 undefined


def test_one_vs_rest_rates_by_hand():
    rates = m.one_vs_rest_rates(HAND_LABELS, m.decide(HAND_PROBS), 3)
    # class 0: TP 2, FN 1, FP 1 (row 4), TN 4
    assert rates["sensitivity"][0] == pytest.approx(2 / 3)
    assert rates["specificity"][0] == pytest.approx(4 / 5)
    assert rates["ppv"][0] == pytest.approx(2 / 3)
    assert rates["npv"][0] == pytest.approx(4 / 5)
    # class 2: TP 2, FN 1 (the undecided row), FP 0, TN 5
    assert rates["sensitivity"][2] == pytest.approx(2 / 3)
    assert rates["specificity"][2] == pytest.approx(1.0)
    assert rates["npv"][2] == pytest.approx(5 / 6)


def test_roc_auc_counts_ties_as_half():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.9, 0.1, 0.5])
    # positive/negative pairs: (0.9, 0.9) half, (0.9, 0.5) right, (0.1, 0.9) and (0.1, 0.5) wrong
    assert m.roc_auc(y, s) == pytest.approx(1.5 / 4)


def test_roc_auc_equals_mann_whitney_on_random_scores():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y], s[~y]
    mann_whitney = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert m.roc_auc(y, s) == pytest.approx(mann_whitney, abs=1e-12)


def test_roc_curve_by_hand_one_point_per_distinct_score():
    """Starts at (0, 0) with threshold +inf; tied scores (0.5 twice, one of each class) move in one step."""
    fpr, tpr, thresholds = m.roc_curve([1, 0, 1, 0, 1], [0.9, 0.5, 0.5, 0.2, 0.1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    # collinear points are kept (scikit-learn's default would drop the middle one): one point per score
    fpr, tpr, thresholds = m.roc_curve([1, 1, 1, 0], [0.9, 0.8, 0.7, 0.1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.1])


def test_malformed_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="2-D array"):
        m.classification_metrics(np.array([0.2, 0.8]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="2-D array"):
        m.decide(np.zeros((3, 0)))
    assert m.decide(np.array([[1.0], [0.5]])).tolist() == [0, 0]  # one column is a valid (trivial) input
    with pytest.raises(ValueError, match=r"classes in \[0, 3\) or UNDECIDED"):
        m.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)  # a class index one past the end
    with pytest.raises(ValueError, match=r"classes in \[0, 3\)"):
        m.confusion_matrix(np.array([0, 1]), np.array([0, -2]), 3)
    with pytest.raises(ValueError, match=r"classes in \[0, 3\)"):
        m.confusion_matrix(np.array([0, 1]), np.array([[0, 1]]), 3)
    with pytest.raises(ValueError, match="2 labels for 3 predictions"):
        m.accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="1-D integer array"):
        m.confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.roc_auc([0, 1], [0.1, np.inf])
    with pytest.raises(ValueError, match="no samples"):
        m.roc_auc([], [])
    assert np.isnan(m.roc_auc([1], [0.3]))  # one sample: one class only, undefined
    with pytest.raises(ValueError, match=r"min_tpr must be in \[0, 1\)"):
        m.partial_auc_above_tpr([0, 1], [0.1, 0.9], 1.0)
    assert m.partial_auc_above_tpr([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3], 0.0) == pytest.approx(m.roc_auc(
        [0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3]))  # above a TPR of 0: the whole area


def test_auc_above_sensitivity_by_hand():
    # ranking P P P P N P N N N N: the curve reaches TPR 0.8 at FPR 0, then (0.2, 0.8), (0.2, 1), (1, 1)
    y = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0])
    s = np.linspace(1.0, 0.1, 10)
    assert m.auc_above_sensitivity(y, s) == pytest.approx(0.2 * 0.8 + 0.8 * 1.0)
    perfect = (s > 0.5).astype(int)
    assert m.auc_above_sensitivity(perfect, s) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_sensitivity"):
        m.auc_above_sensitivity(y, s, 0.0)


def test_average_precision_by_hand():
    # thresholds 0.9: P 1, R 1/2; 0.8: P 1/2, R 1/2; 0.7: P 2/3, R 1
    assert m.average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_ranking_metrics_are_nan_with_one_class_only():
    assert np.isnan(m.roc_auc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert np.isnan(m.auc_above_sensitivity([1, 1], [0.1, 0.5]))
    assert np.isnan(m.average_precision([0, 0], [0.1, 0.5]))
    with pytest.raises(ValueError, match="positive and one negative"):
        m.roc_curve([1, 1], [0.2, 0.3])


def test_expected_calibration_error_known_case():
    # 10 rows at confidence 0.9 with 8 right, 10 rows at confidence 0.7 all right:
    # ECE = 0.5 * |0.8 - 0.9| + 0.5 * |1.0 - 0.7| = 0.2
    probs = np.array([[0.9, 0.1]] * 10 + [[0.3, 0.7]] * 10)
    labels = np.array([0] * 8 + [1] * 2 + [1] * 10)
    assert m.expected_calibration_error(probs, labels) == pytest.approx(0.2)
    bins = m.reliability_bins(probs, labels)
    assert len(bins["count"]) == 15 and bins["count"].sum() == 20
    assert bins["count"][13] == 10 and bins["count"][10] == 10  # 0.9 in (13/15, 14/15], 0.7 in (10/15, 11/15]
    assert bins["accuracy"][13] == pytest.approx(0.8)
    assert np.isnan(bins["accuracy"][0])


def test_expected_calibration_error_is_zero_when_calibrated_and_edges_are_right_closed():
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    labels = np.array([0, 0, 1])
    bins = m.reliability_bins(probs, labels)
    assert bins["count"][14] == 2  # confidence 1.0 falls in the last bin
    assert bins["count"][7] == 1  # 0.5 in (7/15, 8/15]; the tie is wrong
    assert m.expected_calibration_error(probs, labels) == pytest.approx(1 / 3 * 0.5)


def test_cancer_view_by_hand():
    names = ["MEL", "NV", "BCC"]
    probs = np.array([[0.6, 0.4, 0.0], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    labels = np.array([0, 2, 1, 1])
    view = m.cancer_view(probs, labels, names)
    # cancer scores 0.6, 0.6, 0.2, 0.3: both cancers above 0.5, both non-cancers below
    assert view["cancer_classes"] == ["MEL", "BCC"]
    assert view["support"] == {"cancer": 2, "non_cancer": 2}
    assert view["sensitivity"] == 1.0 and view["specificity"] == 1.0 and view["auc"] == 1.0
    # scores are normalised by the row sum (ISIC rows need not sum to 1)
    np.testing.assert_allclose(m.cancer_scores(probs * 2, names), [0.6, 0.6, 0.2, 0.3])
    assert m.cancer_view(probs, labels, ["NV", "BKL", "DF"]) is None


def test_cancer_view_leaves_unk_out_by_hand():
    """ISIC 2019's UNK is no diagnosis: its rows and its score column leave the cancer view, the other scores
    are renormalised without it, and a score equal to the threshold is not decided cancer."""
    names = ["MEL", "NV", "UNK", "BCC"]
    probs = np.array([
        [0.3, 0.2, 0.5, 0.0],  # MEL: without UNK 0.3 / 0.5 = 0.6 -> cancer
        [0.1, 0.3, 0.2, 0.4],  # BCC: 0.5 / 0.8 = 0.625 -> cancer
        [0.2, 0.4, 0.2, 0.2],  # NV: 0.4 / 0.8 = 0.5, exactly the threshold -> not cancer
        [0.3, 0.1, 0.0, 0.6],  # NV: 0.9 -> cancer (a false positive)
        [0.0, 0.1, 0.9, 0.0],  # UNK truth: left out
        [0.1, 0.8, 0.0, 0.1],  # MEL: 0.2 -> missed
    ])
    labels = np.array([0, 3, 1, 1, 2, 0])
    view = m.cancer_view(probs, labels, names)
    assert view["cancer_classes"] == ["MEL", "BCC"] and view["threshold"] == 0.5
    assert view["unknown_left_out"] == 1
    assert view["support"] == {"cancer": 3, "non_cancer": 2}
    assert view["sensitivity"] == pytest.approx(2 / 3) and view["specificity"] == pytest.approx(1 / 2)
    # cancer scores 0.6, 0.625, 0.2 against 0.5, 0.9: 2 of the 6 pairs ranked right
    assert view["auc"] == pytest.approx(2 / 6)
    assert "unknown_left_out" not in m.cancer_view(probs[:, [0, 1, 3]], np.array([0, 2, 1, 1, 1, 0]),
                                                   ["MEL", "NV", "BCC"])
    only_cancer = m.cancer_view(probs, np.zeros(6, dtype=int), names)  # no non-cancer truth: NaN specificity
    assert np.isnan(only_cancer["specificity"]) and only_cancer["sensitivity"] == pytest.approx(3 / 6)
    only_non_cancer = m.cancer_view(probs, np.ones(6, dtype=int), names)  # scores 0.6 .625 .5 .9 0 .2
    assert np.isnan(only_non_cancer["sensitivity"]) and only_non_cancer["specificity"] == pytest.approx(3 / 6)
    zero_rows = m.cancer_scores(np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.0]]), ["MEL", "NV", "BCC"])
    np.testing.assert_array_equal(zero_rows, [0.0, 0.5])  # a row of zeros scores 0, not NaN
    with pytest.raises(ValueError, match="3 class names for 4 score columns"):
        m.cancer_scores(probs, ["MEL", "NV", "BCC"])


def test_confusion_matrix_and_accuracy_edge_cases():
    # a class absent from truth and decisions still has its row and column
    assert m.confusion_matrix(np.array([0, 0]), np.array([0, 2]), 4).tolist() == [
        [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    everything_undecided = m.confusion_matrix(np.array([0, 1]), np.array([m.UNDECIDED, m.UNDECIDED]), 3)
    assert everything_undecided.shape == (3, 3) and everything_undecided.dtype == np.int64
    assert not everything_undecided.any()
    assert m.accuracy(np.array([1]), np.array([1])) == 1.0
    with pytest.raises(ValueError, match="zero samples"):
        m.accuracy(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="no samples"):
        m.balanced_accuracy(np.array([], dtype=int), np.array([], dtype=int), 2)
    prf = m.precision_recall_f1(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert np.isnan(prf["recall"][2]) and np.isnan(prf["f1"][2]) and prf["support"].tolist() == [2, 1, 0]


def test_absent_class_warning_names_the_classes_and_the_count_averaged():
    with pytest.warns(m.AbsentClassWarning) as caught:
        assert m.warn_absent_classes(np.array([3, 0, 2, 0]), ["a", "b", "c", "d"]) == ["b", "d"]
    assert str(caught[0].message) == ("no truth samples for class(es) b, d: balanced accuracy and macro means "
                                      "average the 2 present classes; their recall and AUC are NaN")
    with pytest.warns(m.AbsentClassWarning, match="class\\(es\\) 1: .* average the 1 present"):
        m.warn_absent_classes(np.array([1, 0]))


def test_calibration_and_partial_auc_defaults_and_bounds():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, size=400)
    probs = apply_temperature(rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[labels], 1.0)
    assert m.expected_calibration_error(probs, labels) == pytest.approx(m.expected_calibration_error(probs, labels, 15))
    assert m.expected_calibration_error(probs, labels) != pytest.approx(m.expected_calibration_error(probs, labels, 16))
    y, scores = labels == 0, probs[:, 0]
    assert 0.0 <= m.auc_above_sensitivity(y, scores, 1.0) <= 1.0  # the whole top of the curve is allowed
    for bad in (0.0, 1.01):
        with pytest.raises(ValueError):
            m.auc_above_sensitivity(y, scores, bad)


def test_absent_class_warns_and_gives_defined_results():
    rng = np.random.default_rng(2)
    labels = rng.choice([0, 1], size=200)  # only MEL and NV, as in the UDA-1 data
    probs = rng.dirichlet(np.ones(K), size=200)
    with pytest.warns(m.AbsentClassWarning, match="BCC.*SCC"):
        out = m.classification_metrics(probs, labels, CLASSES)
    assert out["absent_classes"] == CLASSES[2:]
    recall = [out["per_class"][c]["sensitivity"] for c in CLASSES[:2]]
    assert out["headline"]["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert all(np.isnan(out["per_class"][c]["auc"]) for c in CLASSES[2:])
    defined = [out["per_class"][c]["auc"] for c in CLASSES[:2]]
    assert out["headline"]["macro_auc"] == pytest.approx(np.mean(defined))
    assert out["notes"][0] == ("no truth samples for BCC, AK, BKL, DF, VASC, SCC: left out of balanced accuracy "
                               "and macro means; their sensitivity and AUC are undefined")
    no_cancer = m.classification_metrics(probs[:, :2] + 0.01, labels, ["NV", "BKL"])
    assert no_cancer["cancer"] is None and no_cancer["notes"] == ["no cancer view: none of NV, BKL is a cancer class"]


def test_classification_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError, match="class names"):
        m.classification_metrics(np.ones((3, 2)) / 2, np.array([0, 1, 0]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels must lie"):
        m.classification_metrics(np.ones((2, 2)) / 2, np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        m.classification_metrics(np.array([[np.nan, 1.0]]), np.array([0]), ["a", "b"])


# ---- temperature scaling -----------------------------------------------------------------------


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(3)
    true_logits = rng.normal(0.0, 2.0, size=(20000, 5))
    cumulative = np.cumsum(apply_temperature(true_logits, 1.0), axis=1)
    labels = (rng.random((20000, 1)) > cumulative).sum(axis=1)  # labels drawn from softmax(true_logits)
    overconfident = true_logits * 2.5  # a model whose logits need T = 2.5 to be calibrated
    fitted = fit_temperature(overconfident, labels)
    assert fitted == pytest.approx(2.5, rel=0.05)
    assert temperature_nll(overconfident, labels, fitted) < temperature_nll(overconfident, labels, 1.0)


def test_apply_temperature_keeps_argmax_and_sums_to_one():
    logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    for t in (0.5, 1.0, 4.0):
        p = apply_temperature(logits, t)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        assert p.argmax(axis=1).tolist() == [0, 1]
    assert apply_temperature(logits, 4.0).max() < apply_temperature(logits, 1.0).max()
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(logits, 0.0)


# ---- parity with the official scorer -----------------------------------------------------------


def _real_isic_labels(ham_root, n: int, seed: int) -> np.ndarray:
    truth = pd.read_csv(ham_root / "ISIC_2019_Training_GroundTruth.csv")
    labels = truth[CLASSES].to_numpy().argmax(axis=1)
    return np.random.default_rng(seed).choice(labels, size=n, replace=False)


def _predictions(kind: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    if kind == "random":
        return rng.dirichlet(np.ones(K), size=n)
    if kind == "coarse_ties":  # scores on a 0.1 grid: many exact ties within rows and within columns
        return np.round(rng.dirichlet(np.ones(K), size=n), 1)
    if kind == "all_tied_rows":  # a third of the rows are uniform, i.e. undecided
        probs = rng.dirichlet(np.ones(K), size=n)
        probs[: n // 3] = 1.0 / K
        return probs
    if kind == "dominant_class":  # NV always wins; the other columns carry a weak signal
        probs = 0.02 * rng.random((n, K)) + 0.05 * (labels[:, None] == np.arange(K))
        probs[:, CLASSES.index("NV")] = 0.9
        return probs
    if kind == "informative":  # a decent model: the true class gets a boost
        logits = rng.normal(size=(n, K)) + 2.0 * (labels[:, None] == np.arange(K))
        return apply_temperature(logits, 1.0)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "coarse_ties", "all_tied_rows", "dominant_class", "informative"])
def test_parity_with_official_isic_scorer(ham_root, kind):
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    labels = _real_isic_labels(ham_root, 1500, seed=4)
    probs = _predictions(kind, labels, rng)
    truth_df = pd.DataFrame(np.eye(K)[labels], columns=CLASSES)
    pred_df = pd.DataFrame(probs, columns=CLASSES)
    weights = pd.Series(np.ones(len(labels)))

    ours = m.balanced_accuracy(labels, m.decide(probs), K, CLASSES)
    assert ours == pytest.approx(isic.balanced_multiclass_accuracy(truth_df, pred_df, weights), abs=1e-6)
    for c, name in enumerate(CLASSES):
        y = labels == c
        assert m.roc_auc(y, probs[:, c]) == pytest.approx(
            isic.auc(truth_df[name], pred_df[name], weights), abs=1e-6
        )
        assert m.auc_above_sensitivity(y, probs[:, c], 0.8) == pytest.approx(
            isic.auc_above_sensitivity(truth_df[name], pred_df[name], weights, 0.8), abs=1e-6
        )
        assert m.average_precision(y, probs[:, c]) == pytest.approx(
            isic.average_precision(truth_df[name], pred_df[name], weights), abs=1e-6
        )


def test_every_key_of_the_report_matches_its_definition(ham_root):
    """`classification_metrics` on real ISIC labels with tied rows: each headline and per-class value equals
    the official scorer's (AUC, AUC above 80% sensitivity, AP, BMA), scikit-learn's (P/R/F1) or its
    definition computed here (accuracy, support, one-vs-rest rates, ECE over the default 15 bins)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = _real_isic_labels(ham_root, 1500, seed=7)
    probs = _predictions("coarse_ties", labels, np.random.default_rng(11))
    truth_df, pred_df = pd.DataFrame(np.eye(K)[labels], columns=CLASSES), pd.DataFrame(probs, columns=CLASSES)
    weights = pd.Series(np.ones(len(labels)))
    preds = m.decide(probs)
    assert (preds == m.UNDECIDED).sum() > 20  # the tie rule is exercised

    out = m.classification_metrics(probs, labels, CLASSES)
    head, per_class = out["headline"], out["per_class"]
    assert head["balanced_accuracy"] == pytest.approx(isic.balanced_multiclass_accuracy(truth_df, pred_df, weights))
    assert head["accuracy"] == pytest.approx(np.mean(preds == labels))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=list(range(K)), zero_division=0)
    for avg, w in (("macro", np.ones(K) / K), ("weighted", support / support.sum())):
        for key, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            assert head[f"{avg}_{key}"] == pytest.approx(float(w @ values)), f"{avg}_{key}"
    official = {"auc": isic.auc, "auc_sens_80": lambda t, p, w: isic.auc_above_sensitivity(t, p, w, 0.8),
                "average_precision": isic.average_precision}
    for key, fn in official.items():
        values = [fn(truth_df[name], pred_df[name], weights) for name in CLASSES]
        assert [per_class[name][key] for name in CLASSES] == pytest.approx(values, abs=1e-6), key
        headline_key = {"auc": "macro_auc", "auc_sens_80": "macro_auc_sens_80",
                        "average_precision": "macro_average_precision"}[key]
        assert head[headline_key] == pytest.approx(np.mean(values), abs=1e-6), headline_key
    for c, name in enumerate(CLASSES):
        tp = np.sum((preds == c) & (labels == c))
        fn, fp = np.sum((preds != c) & (labels == c)), np.sum((preds == c) & (labels != c))
        tn = len(labels) - tp - fn - fp
        expected = {"support": int(np.sum(labels == c)), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                    "ppv": tp / (tp + fp), "npv": tn / (tn + fn), "f1": f1[c]}
        assert {k: per_class[name][k] for k in expected} == pytest.approx(expected), name
    confidence, correct = probs.max(axis=1), (preds == labels)
    bin_of = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)  # (b/15, (b+1)/15]
    ece = sum(np.sum(bin_of == b) / len(labels) * abs(correct[bin_of == b].mean() - confidence[bin_of == b].mean())
              for b in range(15) if np.any(bin_of == b))
    assert head["ece"] == pytest.approx(ece)
    assert out["confusion_matrix"]["undecided"] == np.bincount(labels[preds == m.UNDECIDED], minlength=K).tolist()
    assert out["confusion_matrix"]["counts"] == m.confusion_matrix(labels, preds, K).tolist()
    assert (out["classes"], out["num_samples"], out["undecided"]) == (CLASSES, 1500, int(np.sum(preds == m.UNDECIDED)))
    assert out["complete"] and out["absent_classes"] == []
    assert out["cancer"] == m.cancer_view(probs, labels, CLASSES) and out["cancer"]["auc"] > 0
    assert out["notes"] == [
        f"{int(np.sum(preds == m.UNDECIDED))} row(s) with a tied top score count as wrong (ISIC 'undecided')"]
    with_unk = m.classification_metrics(np.hstack([probs, np.full((1500, 1), 0.01)]), labels, [*CLASSES, "UNK"])
    assert with_unk["notes"][-1] == "cancer view: the 0 UNK image(s) and the UNK score are left out (UNK is no diagnosis)"
    np.testing.assert_equal(out["reliability"], {k: v.tolist() for k, v in m.reliability_bins(probs, labels).items()})
    # n_bins reaches ECE and the reliability table (scores of a decent model: ECE depends on the bins)
    probs = _predictions("informative", labels, np.random.default_rng(12))
    fifteen, two = (m.classification_metrics(probs, labels, CLASSES, **kw) for kw in ({}, {"n_bins": 2}))
    assert two["headline"]["ece"] == pytest.approx(m.expected_calibration_error(probs, labels, 2))
    assert fifteen["headline"]["ece"] == pytest.approx(m.expected_calibration_error(probs, labels, 15))
    assert abs(two["headline"]["ece"] - fifteen["headline"]["ece"]) > 1e-3 and len(two["reliability"]["count"]) == 2


def test_macro_means_are_nan_when_no_class_defines_them():
    labels = np.zeros(20, dtype=int)  # one class only: no class has both positives and negatives
    probs = np.random.default_rng(3).dirichlet(np.ones(3), size=20)
    with pytest.warns(m.AbsentClassWarning):
        out = m.classification_metrics(probs, labels, ["a", "b", "c"])
    head = out["headline"]
    for key in ("macro_auc", "macro_auc_sens_80"):
        assert isinstance(head[key], float) and np.isnan(head[key]), key
    # AP is defined for "a" alone (every sample positive: 1), undefined for the absent classes
    assert [out["per_class"][c]["average_precision"] for c in "a"] == pytest.approx([1.0])
    assert head["macro_average_precision"] == pytest.approx(1.0) and not out["complete"]
    assert head["balanced_accuracy"] == pytest.approx(np.mean(m.decide(probs) == 0))


def test_parity_dominant_class_is_not_trivial(ham_root):
    # Guard against a parity test that passes vacuously: the adversarial cases really contain ties
    # and a single winning class.
    labels = _real_isic_labels(ham_root, 1500, seed=4)
    rng = np.random.default_rng(0)
    assert (m.decide(_predictions("all_tied_rows", labels, rng)) == m.UNDECIDED).sum() == 500
    assert set(m.decide(_predictions("dominant_class", labels, rng)).tolist()) == {CLASSES.index("NV")}


def test_absent_class_official_scorer_fails_where_we_give_defined_results():
    rng = np.random.default_rng(5)
    labels = rng.choice([0, 1], size=300)
    probs = rng.dirichlet(np.ones(K), size=300)
    truth_df = pd.DataFrame(np.eye(K)[labels], columns=CLASSES)
    pred_df = pd.DataFrame(probs, columns=CLASSES)
    weights = pd.Series(np.ones(300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The official scorer crashes on the AUC above 80% sensitivity of a class with no sample
        # (and its AUC is scikit-learn's NaN with an UndefinedMetricWarning).
        with pytest.raises(ValueError):
            isic.auc_above_sensitivity(truth_df["BCC"], pred_df["BCC"], weights, 0.8)
        assert np.isnan(isic.auc(truth_df["BCC"], pred_df["BCC"], weights))
    with pytest.warns(m.AbsentClassWarning, match="BCC"):
        ours = m.balanced_accuracy(labels, m.decide(probs), K, CLASSES)
    # The official BMA skips the 0/0 recalls of absent classes: the same definition as ours.
    assert ours == pytest.approx(isic.balanced_multiclass_accuracy(truth_df, pred_df, weights), abs=1e-6)
    assert np.isnan(m.roc_auc(labels == 2, probs[:, 2]))
    assert np.isnan(m.auc_above_sensitivity(labels == 2, probs[:, 2]))
