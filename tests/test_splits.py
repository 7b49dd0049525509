"""Grouped, stratified, seeded splits: pure functions, checked on the real HAM10000 labels and lesions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skindistil.data.splits import (
    SPLIT_NAMES,
    assign_grouped_stratified,
    group_codes,
    kfold_assign,
    split_train_val_test,
    stratified_subset,
)
from skindistil.data.vocab import HAM10000
from skindistil.errors import ConfigError


@pytest.fixture(scope="module")
def ham_arrays(ham_root):
    table = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    labels = np.array([HAM10000.index(dx) for dx in table["dx"]])
    return labels, table["lesion_id"].to_numpy()


def _leaks(assignment, groups) -> int:
    """Number of groups that appear under more than one assignment value."""
    frame = pd.DataFrame({"group": groups, "part": assignment})
    return int((frame.groupby("group")["part"].nunique() > 1).sum())


def _worst_share_gap(labels, assignment, parts) -> float:
    """Largest |class share in a part - class share overall|, in percentage points."""
    whole = np.bincount(labels, minlength=labels.max() + 1) / len(labels)
    gaps = []
    for part in parts:
        member = labels[assignment == part]
        gaps.append(np.abs(np.bincount(member, minlength=len(whole)) / len(member) - whole).max())
    return 100 * max(gaps)


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_ham_split_grouped_and_stratified(ham_arrays, seed):
    labels, groups = ham_arrays
    split = split_train_val_test(labels, groups, (0.7, 0.15, 0.15), seed=seed)
    assert set(split) == set(SPLIT_NAMES)
    assert _leaks(split, groups) == 0
    assert _worst_share_gap(labels, split, SPLIT_NAMES) < 2.0
    sizes = [np.mean(split == name) for name in SPLIT_NAMES]
    np.testing.assert_allclose(sizes, [0.7, 0.15, 0.15], atol=0.01)
    # Every class, even DF (81 images, 70-odd lesions), lands in every split.
    for name in SPLIT_NAMES:
        assert set(labels[split == name]) == set(range(len(HAM10000)))


def test_split_is_deterministic_and_seeded(ham_arrays):
    labels, groups = ham_arrays
    first = split_train_val_test(labels, groups, seed=42)
    again = split_train_val_test(labels, groups, seed=42)
    other = split_train_val_test(labels, groups, seed=43)
    assert (first == again).all()
    assert (first != other).mean() > 0.1


def test_split_does_not_depend_on_item_order(ham_arrays):
    labels, groups = ham_arrays
    order = np.random.default_rng(0).permutation(len(labels))
    split = split_train_val_test(labels, groups, seed=5)
    shuffled = split_train_val_test(labels[order], groups[order], seed=5)
    assert (shuffled == split[order]).all()


def test_ham_kfold(ham_arrays):
    labels, groups = ham_arrays
    fold = kfold_assign(labels, groups, folds=5, seed=42)
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    assert _leaks(fold, groups) == 0
    assert _worst_share_gap(labels, fold, range(5)) < 2.0
    np.testing.assert_allclose(np.bincount(fold) / len(fold), 0.2, atol=0.01)


def test_ungrouped_items_are_their_own_groups():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    split = split_train_val_test(labels, None, (0.6, 0.2, 0.2), seed=1)
    for name, share in zip(SPLIT_NAMES, (0.6, 0.2, 0.2), strict=True):
        np.testing.assert_array_equal(np.bincount(labels[split == name], minlength=3), np.round(share * np.array([50, 30, 20])))
    # Missing group ids (None, NaN, "") are singletons too, never merged with each other.
    codes = group_codes(["a", None, float("nan"), "", "a", "b"], 6)
    assert codes[0] == codes[4]
    assert len({codes[1], codes[2], codes[3], codes[0], codes[5]}) == 5


def test_a_large_group_stays_whole():
    labels = np.zeros(40, dtype=int)
    groups = np.array(["big"] * 12 + [f"g{i}" for i in range(28)], dtype=object)
    split = split_train_val_test(labels, groups, (0.7, 0.15, 0.15), seed=3)
    assert len(set(split[:12])) == 1
    assert _leaks(split, groups) == 0


def test_zero_fraction_split_gets_nothing():
    labels = np.arange(30) % 3
    split = split_train_val_test(labels, None, (0.8, 0.2, 0.0), seed=0)
    assert "test" not in set(split)
    assert (split == "val").sum() == 6


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.9, 0.2, -0.1), (0.5, float("nan"), 0.5)])
def test_invalid_fractions_are_rejected(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        assign_grouped_stratified([0, 1], None, fractions)


def test_kfold_needs_two_folds():
    with pytest.raises(ConfigError, match="2 folds"):
        kfold_assign([0, 1, 0], folds=1)


def test_stratified_subset(ham_arrays):
    labels, _ = ham_arrays
    subset = stratified_subset(labels, 60, seed=42)
    assert len(subset) == 60 and len(set(subset)) == 60
    assert (subset == stratified_subset(labels, 60, seed=42)).all()
    counts = np.bincount(labels[subset], minlength=len(HAM10000))
    assert (counts >= 1).all()  # every class, even with 81 DF among 7,005
    assert counts[HAM10000.index("nv")] == pytest.approx(60 * 4693 / 7005, abs=3)
    assert len(stratified_subset(labels, 10**6)) == len(labels)
