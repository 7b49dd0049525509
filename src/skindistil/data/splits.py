"""Train/val/test and k-fold assignment: stratified by class, grouped by lesion, seeded.

Pure functions over arrays. `labels` are integer class indices; `groups` are lesion ids (any
hashable; None/NaN/"" means "no group": the item is a group of its own). Images of one group always
receive the same split or fold, so a lesion photographed twice never sits on both sides.

The assignment (`assign_grouped_stratified`) is greedy. Definitions:

- target[b, c] = fractions[b] * (number of items of class c): how many items of class c bin b
  should hold;
- filled[b, c]: how many it holds so far;
- deficit of bin b for a group g with class counts n[g, c]:
  sum_c n[g, c] * (target[b, c] - filled[b, c]) / target[b, c],
  i.e. how far below target (relative to target, so small bins count as much as large ones) the bin
  is on exactly the classes the group brings.

Groups are visited largest first (big groups are the hard ones to place; small ones then even out
the remainder), with a seeded shuffle among groups of equal size; each group goes to the bin with
the largest deficit (ties: the bin furthest below its total size target, then the lower bin index).
On HAM10000 (5,251 lesions) every class share per split stays well within 2 points of the whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from skindistil.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def check_trainable(train_counts: dict[str, int], where: str) -> None:
    """Refuse a training set no classifier should be trained on; `train_counts` is {class: images} in
    the vocabulary's order, `where` names the dataset in the error.

    Raises DataError when fewer than two classes exist, or when a class of the vocabulary has no
    training image (its output could never be learnt, yet it would be predicted and scored).
    """
    if len(train_counts) < 2:
        raise DataError(where, f"only {len(train_counts)} class ({', '.join(train_counts)}): a classifier needs at "
                               "least two; is a split folder (train/test) or the wrong folder taken as the class?")
    missing = [name for name, count in train_counts.items() if count == 0]
    if len(train_counts) - len(missing) < 2:
        present = [name for name in train_counts if name not in missing]
        raise DataError(where, f"the train split holds images of {len(present)} class(es) only "
                               f"({', '.join(present) or 'none'}); a classifier needs at least two")
    if missing:
        raise DataError(where, f"the train split has no image of class(es) {', '.join(missing)}: their outputs "
                               "could never be learnt; add images or prepare without those classes")


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Validate split fractions: non-negative, at least one positive, summing to 1 (within 1e-6)."""
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not np.isfinite(f) or f < 0 for f in fractions):
        raise ConfigError(f"split fractions must be non-negative numbers, got {list(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {list(fractions)} (sum {sum(fractions):g})")
    return fractions


def group_codes(groups: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    """Integer group code per item; items without a group (None, NaN, "") get codes of their own.

    Codes of named groups follow the sorted group names, so they do not depend on item order.
    """
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} labels")
    names = [None if _is_missing(g) else str(g) for g in groups]
    named = sorted({g for g in names if g is not None})
    code_of = {g: i for i, g in enumerate(named)}
    codes = np.empty(n, dtype=np.int64)
    next_code = len(named)
    for i, g in enumerate(names):
        if g is None:
            codes[i] = next_code
            next_code += 1
        else:
            codes[i] = code_of[g]
    return codes


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def assign_grouped_stratified(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray | None,
    fractions: Sequence[float],
    seed: int = 42,
) -> np.ndarray:
    """Bin index (0..len(fractions)-1) per item; see the module docstring for the algorithm.

    Bins with fraction 0 receive nothing. Deterministic for a given (labels, groups, fractions, seed).
    """
    fractions = check_fractions(fractions)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if labels.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    codes = group_codes(groups, n)
    num_groups = int(codes.max()) + 1
    num_classes = int(labels.max()) + 1

    # Class counts per group, and every group's size.
    group_class = np.zeros((num_groups, num_classes), dtype=np.int64)
    np.add.at(group_class, (codes, labels), 1)
    group_size = group_class.sum(axis=1)

    frac = np.asarray(fractions)
    target = frac[:, None] * group_class.sum(axis=0)[None, :]
    # Classes absent from a bin's target (fraction 0 or no items) cannot be "below target".
    safe_target = np.where(target > 0, target, np.inf)
    total_target = frac * n
    usable = frac > 0

    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(num_groups)
    order = np.lexsort((tie_break, -group_size))

    filled = np.zeros_like(target)
    bin_of_group = np.empty(num_groups, dtype=np.int64)
    for g in order:
        if group_size[g] == 0:
            continue
        counts = group_class[g]
        deficit = ((target - filled) / safe_target) @ counts
        size_deficit = total_target - filled.sum(axis=1)
        # lexsort keys: last is primary. Unusable bins sort last via -inf.
        primary = np.where(usable, deficit, -np.inf)
        ranking = np.lexsort((np.arange(len(frac)), -size_deficit, -primary))
        b = ranking[0]
        bin_of_group[g] = b
        filled[b] += counts
    return bin_of_group[codes]


def split_train_val_test(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 42,
    names: Sequence[str] = SPLIT_NAMES,
) -> np.ndarray:
    """Split name per item (train/val/test by default), grouped and stratified."""
    fractions = check_fractions(fractions)
    if len(names) != len(fractions):
        raise ConfigError(f"{len(fractions)} split fractions for {len(names)} split names {list(names)}")
    bins = assign_grouped_stratified(labels, groups, fractions, seed)
    return np.asarray(names, dtype=object)[bins]


def kfold_assign(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    folds: int = 5,
    seed: int = 42,
) -> np.ndarray:
    """Fold id (0..folds-1) per item: `folds` equal grouped-stratified parts."""
    if int(folds) < 2:
        raise ConfigError(f"k-fold needs at least 2 folds, got {folds}")
    folds = int(folds)
    return assign_grouped_stratified(labels, groups, [1.0 / folds] * folds, seed)


def stratified_subset(labels: Sequence[int] | np.ndarray, size: int, seed: int = 42) -> np.ndarray:
    """Sorted indices of a deterministic class-stratified subset of `size` items.

    Each class gets its share of `size` by largest remainder, at least one item per class while
    `size` allows (rarest classes served first), never more than it has; items within a class are
    drawn by a seeded permutation. `size` >= len(labels) returns every index.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if size < 1:
        raise ConfigError(f"subset size must be at least 1, got {size}")
    if size >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _allocate(counts, size)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, take in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        chosen.append(members[rng.permutation(len(members))[:take]])
    return np.sort(np.concatenate(chosen))


def _allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Split `size` items over classes in proportion to `counts` (largest remainder), at least one
    per class while `size` allows (rarest classes first), never more than a class has."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * size / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(counts, kind="stable"):
        if quota.sum() >= size:
            break
        quota[i] = max(quota[i], 1)
    remainder = exact - quota
    while quota.sum() < size:
        i = int(np.argmax(np.where(quota < counts, remainder, -np.inf)))
        quota[i] += 1
        remainder[i] -= 1
    return quota
