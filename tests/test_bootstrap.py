"""Bootstrap intervals, the paired teacher-vs-student comparison and the retention gate, checked against
direct computation: a hand loop over the same seeded draws calling the plain metric functions."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy.special import comb

from skindistil.errors import ConfigError
from skindistil.evaluation import metrics as M
from skindistil.evaluation.bootstrap import (
    BootstrapSettings,
    WeightedScorer,
    headline_statistics,
    metric_intervals,
    resample,
    resampling_units,
    unit_index,
)
from skindistil.evaluation.retention import (
    check_retention_gate,
    compare_models,
    mcnemar,
    parse_retention_gate,
)

CLASSES = ["MEL", "NV", "BCC", "DF"]


def small_case(seed=0, n=60):
    """Scores with exact ties (rounded to 0.1, so some rows are undecided), four classes, DF rare (one
    lesion of two images), and lesion groups of one to three images."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, n, p=[0.3, 0.5, 0.2])
    labels[:2] = 3  # DF: a single lesion
    probs = np.round(rng.dirichlet(np.ones(4), n) + 0.3 * np.eye(4)[labels], 1)
    lesions = [f"L{i // 2}" if i < 2 else f"L{i // 3 + 100}" for i in range(n)]
    return probs, labels, lesions


def hand_loop(probs, labels, units, resamples, seed, statistic):
    """The reference: draw units with numpy's Generator exactly as documented, rebuild each resample by
    repeating the drawn units' images, and score it with the plain metric functions."""
    index = unit_index(units, len(labels))
    members = [np.flatnonzero(index == g) for g in range(index.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(resamples, len(members)))
    out = []
    for row in draws:
        rows = np.concatenate([members[g] for g in row])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.AbsentClassWarning)
            out.append(statistic(probs[rows], labels[rows]))
    return np.array(out)


def plain_headline(probs, labels):
    k = len(CLASSES)
    preds = M.decide(probs)
    onehot = labels[:, None] == np.arange(k)
    auc = np.array([M.roc_auc(onehot[:, c], probs[:, c]) for c in range(k)])
    auc80 = np.array([M.auc_above_sensitivity(onehot[:, c], probs[:, c]) for c in range(k)])
    recall = M.precision_recall_f1(labels, preds, k)["recall"]
    return [M.balanced_accuracy(labels, preds, k), M.accuracy(labels, preds),
            M.precision_recall_f1(labels, preds, k)["macro_f1"], np.nanmean(auc), np.nanmean(auc80),
            *recall, *auc]


def test_vectorised_resamples_equal_a_hand_loop_over_the_same_draws():
    probs, labels, lesions = small_case()
    settings = BootstrapSettings(resamples=60, seed=7)
    scorer = WeightedScorer(probs, labels, len(CLASSES))
    fast = resample(lambda w: headline_statistics(scorer, w), lesions, len(labels), settings)
    slow = hand_loop(probs, labels, lesions, 60, 7, plain_headline)
    got = np.column_stack([fast["balanced_accuracy"], fast["accuracy"], fast["macro_f1"], fast["macro_auc"],
                           fast["macro_auc_sens_80"], fast["sensitivity"], fast["auc"]])
    np.testing.assert_allclose(got, slow, rtol=1e-12, atol=1e-12, equal_nan=True)
    # the case exercises what it is meant to: resamples without DF, and undecided rows
    assert np.isnan(fast["sensitivity"][:, 3]).any() and not np.isnan(fast["sensitivity"][:, 3]).all()
    assert (M.decide(probs) == M.UNDECIDED).any()


def test_all_ones_weights_reproduce_classification_metrics_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 500)
    for probs in (rng.random((500, 4)), np.round(rng.random((500, 4)), 1)):
        expected = M.classification_metrics(probs, labels, CLASSES)
        got = headline_statistics(WeightedScorer(probs, labels, 4), np.ones((1, 500)))
        for key in ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "macro_auc_sens_80"):
            assert got[key][0] == pytest.approx(expected["headline"][key], abs=1e-12), key
        for c, name in enumerate(CLASSES):
            assert got["auc"][0, c] == pytest.approx(expected["per_class"][name]["auc"], abs=1e-12)


def test_intervals_are_the_percentiles_of_the_hand_loop():
    probs, labels, lesions = small_case(1)
    result = metric_intervals(probs, labels, CLASSES, lesions, BootstrapSettings(resamples=80, seed=3))
    slow = hand_loop(probs, labels, lesions, 80, 3, lambda p, y: M.balanced_accuracy(y, M.decide(p), 4))
    assert result["headline"]["balanced_accuracy"] == pytest.approx(list(np.percentile(slow, [2.5, 97.5])))
    assert result["units"] == len(set(lesions))
    lacking = hand_loop(probs, labels, lesions, 80, 3, lambda p, y: int(not np.isin(3, y)))
    assert result["resamples_missing_a_class"] == lacking.sum() > 0


def test_resampling_units_prefer_patient_then_lesion_then_image():
    units, counts = resampling_units(["a", "b", "c", "d"], ["L1", "L1", "", None], ["P1", "", "", "P1"])
    assert units == ["patient:P1", "lesion:L1", "image:c", "patient:P1"]
    assert counts == {"patient": 1, "lesion": 1, "image": 1}
    assert list(unit_index(units, 4)) == [0, 1, 2, 0]


def test_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="resamples"):
        BootstrapSettings(resamples=-1)
    with pytest.raises(ConfigError, match="confidence"):
        BootstrapSettings(confidence=1.0)


def test_a_thousand_resamples_of_a_thousand_images_take_little_cpu():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 1000)
    probs = rng.dirichlet(np.ones(8), 1000)
    start = time.process_time()
    metric_intervals(probs, labels, [str(i) for i in range(8)], settings=BootstrapSettings(resamples=1000))
    assert time.process_time() - start < 6.0  # about 0.5 s of CPU on the 2-core VM


# ----------------------------------------------------------------------------- paired comparison


def test_paired_difference_and_retention_follow_the_same_draws():
    probs, labels, lesions = small_case(2)
    rng = np.random.default_rng(5)
    student = np.where(rng.random(probs.shape) < 0.3, rng.random(probs.shape), probs)
    settings = BootstrapSettings(resamples=70, seed=11)
    result = compare_models(probs, student, labels, CLASSES, lesions, settings)

    def bma(p, y):
        return M.balanced_accuracy(y, M.decide(p), 4)

    both = np.hstack([probs, student])
    pairs = hand_loop(both, labels, lesions, 70, 11, lambda p, y: (bma(p[:, :4], y), bma(p[:, 4:], y)))
    diff = pairs[:, 1] - pairs[:, 0]
    assert result["balanced_accuracy"]["difference"]["interval"] == pytest.approx(list(np.percentile(diff, [2.5, 97.5])))
    ratio = pairs[:, 1] / pairs[:, 0]
    assert result["balanced_accuracy"]["retention"]["interval"] == pytest.approx(list(np.percentile(ratio, [2.5, 97.5])))
    assert result["balanced_accuracy"]["difference"]["value"] == pytest.approx(bma(student, labels) - bma(probs, labels))
    t_pred, s_pred = M.decide(probs), M.decide(student)
    assert result["agreement"]["top1"] == pytest.approx(np.mean(t_pred == s_pred))
    flagged = np.isin(t_pred, [0, 2]) | np.isin(s_pred, [0, 2])  # MEL, BCC
    assert result["agreement"]["cancer"] == pytest.approx(np.mean((t_pred == s_pred)[flagged]))
    t_recall = M.precision_recall_f1(labels, t_pred, 4)["recall"]
    s_recall = M.precision_recall_f1(labels, s_pred, 4)["recall"]
    assert result["per_class"]["NV"]["retention"] == pytest.approx(s_recall[1] / t_recall[1])


def test_verdict_says_whether_the_loss_is_distinguishable_from_zero():
    probs, labels, lesions = small_case(4, n=300)
    settings = BootstrapSettings(resamples=200)
    same = compare_models(probs, probs, labels, CLASSES, lesions, settings)
    assert same["distinguishable"] is False and "not distinguishable from zero" in same["verdict"]
    assert same["balanced_accuracy"]["difference"]["interval"] == [0.0, 0.0]
    assert same["mcnemar"] == {"teacher_only_correct": 0, "student_only_correct": 0, "p_value": 1.0}
    noise = np.random.default_rng(0).dirichlet(np.ones(4), len(labels))
    worse = compare_models(probs, noise, labels, CLASSES, lesions, settings)
    assert worse["distinguishable"] is True and "student's loss is distinguishable" in worse["verdict"]
    assert worse["balanced_accuracy"]["difference"]["interval"][1] < 0


def test_mcnemar_is_the_exact_binomial_test():
    teacher = np.array([1] * 8 + [0] * 2 + [1] * 5, bool)
    student = np.array([0] * 8 + [1] * 2 + [1] * 5, bool)
    result = mcnemar(teacher, student)
    expected = 2 * sum(comb(10, k) for k in range(3)) / 2**10
    assert result == {"teacher_only_correct": 8, "student_only_correct": 2, "p_value": pytest.approx(expected)}


# ----------------------------------------------------------------------------- retention gate


def test_parse_retention_gate_forms_and_errors():
    assert parse_retention_gate(["MEL=0.97", "BCC=0.9,SCC=1"]) == {"MEL": 0.97, "BCC": 0.9, "SCC": 1.0}
    assert parse_retention_gate({"MEL": 0.97}, CLASSES) == {"MEL": 0.97}
    assert parse_retention_gate(None) == {}
    with pytest.raises(ConfigError, match="'MEL' is not CLASS=RATIO"):
        parse_retention_gate("MEL")
    with pytest.raises(ConfigError, match="not a number"):
        parse_retention_gate("MEL=high")
    with pytest.raises(ConfigError, match="positive"):
        parse_retention_gate("MEL=-1")
    with pytest.raises(ConfigError, match="unknown class 'AK'"):
        parse_retention_gate("AK=0.9", CLASSES)


def test_gate_fails_below_the_minimum_and_when_undefined():
    comparison = {"per_class": {
        "MEL": {"retention": 0.95, "teacher_recall": 0.8, "student_recall": 0.76},
        "NV": {"retention": 1.01, "teacher_recall": 0.9, "student_recall": 0.909},
        "DF": {"retention": float("nan"), "teacher_recall": 0.0, "student_recall": 0.5}}}
    assert check_retention_gate(comparison, {"NV": 0.97}) == []
    failures = check_retention_gate(comparison, {"MEL": 0.97, "NV": 0.97, "DF": 0.5})
    assert len(failures) == 2
    assert failures[0].startswith("MEL: retention 0.9500 < minimum 0.97")
    assert failures[1].startswith("DF: retention undefined")
