"""Class-imbalance helpers: per-class loss weights and a class-balanced sampler.

The paper uses neither (SPEC.md); they are options for imbalanced data such as ISIC 2019, where NV is
half of the images and DF under 1%.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from skindistil.errors import DataError


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Number of samples of each class 0..num_classes-1 (int64 [num_classes])."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError("labels", f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    return np.bincount(labels, minlength=num_classes)


def _normalise_present(raw: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Scale weights of the classes present to mean 1; absent classes get weight 0 (nothing to weigh)."""
    present = counts > 0
    if not present.any():
        raise DataError("labels", "no samples: class weights are undefined")
    weights = np.zeros(len(counts), dtype=np.float64)
    weights[present] = raw[present] / raw[present].mean()
    return weights


def inverse_frequency_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """w_c proportional to 1 / n_c, normalised to mean 1 over the classes present (float64 [C])."""
    counts = np.asarray(counts, dtype=np.float64)
    raw = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return _normalise_present(raw, counts)


def effective_number_weights(counts: Sequence[int] | np.ndarray, beta: float = 0.999) -> np.ndarray:
    """Class-balanced weights of Cui et al. (CVPR 2019): w_c proportional to 1 / E_c with the effective
    number of samples E_c = (1 - beta^n_c) / (1 - beta), normalised to mean 1 over the classes present.

    beta -> 0 gives equal weights; beta -> 1 approaches inverse frequency.
    """
    if not 0 <= beta < 1:
        raise DataError("beta", f"must lie in [0, 1), got {beta}")
    counts = np.asarray(counts, dtype=np.float64)
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    raw = np.divide(1.0, effective, out=np.zeros_like(counts), where=counts > 0)
    return _normalise_present(raw, counts)


class EpochSampler(Sampler[int]):
    """Per-epoch sample order that is a pure function of (seed, epoch), sharded over DDP ranks.

    The order is a shuffled permutation (`shuffle`), class-weighted draws with replacement
    (`weights`, one per sample), or the natural order. With `world_size` > 1 it is padded, by
    repeating its start, to a multiple of `world_size`, and rank r takes every world_size-th item
    from r: every rank runs the same number of steps (DDP needs that) and together they cover every
    sample. Lightning calls `set_epoch` at each epoch start, so a resumed run replays the same order.

    With `tag_epoch`, items are `epoch * num_samples + index`: the dataset recovers the epoch and seeds
    that sample's augmentation from (seed, epoch, index), which makes augmentation independent of the
    number of loader workers and identical after a resume.

    `resume_at(epoch, skip)` continues an epoch in the middle: the next iteration of that epoch starts
    at item `skip` of this rank's shard (a resume from a mid-epoch checkpoint).
    """

    def __init__(self, num_samples: int, *, shuffle: bool = False, weights: Sequence[float] | np.ndarray | None = None,
                 seed: int = 42, rank: int = 0, world_size: int = 1, tag_epoch: bool = False):
        if num_samples <= 0:
            raise DataError("sampler", "cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise DataError("sampler", f"rank {rank} outside 0..{world_size - 1}")
        self.num_samples = int(num_samples)
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.double)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.tag_epoch = tag_epoch
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != int(epoch):
            self._resume = None
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Make the next iteration the rest of epoch `epoch`, from item `skip` of this rank's shard."""
        if not 0 <= skip <= len(self):
            raise DataError("sampler", f"cannot resume at item {skip} of an epoch of {len(self)} items")
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(skip))

    def order(self) -> torch.Tensor:
        """This epoch's full order (all ranks), before padding and sharding."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self):
        order = self.order()
        total = len(self) * self.world_size
        if total > len(order):
            order = torch.cat([order, order[: total - len(order)]])
        offset = self.epoch * self.num_samples if self.tag_epoch else 0
        shard = order[self.rank :: self.world_size] + offset
        if self._resume is not None:
            shard = shard[self._resume[1]:]
            self._resume = None
        return iter(shard.tolist())


def resume_position(epoch: int, batches_done: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batches to skip) at which training continues after `batches_done` batches of `epoch`:
    the rest of this epoch, or the start of the next one when the epoch is complete."""
    if batches_done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, max(0, int(batches_done))


def class_balanced_sampler(labels: Sequence[int] | np.ndarray, num_classes: int, seed: int = 42, **kwargs) -> EpochSampler:
    """Sampler drawing len(labels) indices with replacement, each class equally likely.

    Sample i has weight 1 / n_{y_i}; each epoch's draws are a function of (seed, epoch).
    Extra keyword arguments (rank, world_size, tag_epoch) go to `EpochSampler`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise DataError("labels", "cannot build a sampler over an empty dataset")
    counts = class_counts(labels, num_classes)
    return EpochSampler(len(labels), weights=1.0 / counts[labels], seed=seed, **kwargs)
