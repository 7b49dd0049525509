"""Class weights (inverse frequency, effective number of samples) and the class-balanced sampler."""

from __future__ import annotations

import numpy as np
import pytest

from skindistil.data.sampling import (
    EpochSampler,
    class_balanced_sampler,
    class_counts,
    effective_number_weights,
    inverse_frequency_weights,
    resume_position,
)
from skindistil.data.synthetic import ISIC2019_COUNTS
from skindistil.errors import DataError


def test_class_counts():
    np.testing.assert_array_equal(class_counts([0, 2, 2, 1, 2], 4), [1, 1, 3, 0])
    with pytest.raises(DataError, match="0..2"):
        class_counts([0, 3], 3)


def test_inverse_frequency_weights_values():
    # 1/n = [0.1, 1/30, 1/60], mean 0.05 -> [2, 2/3, 1/3]
    np.testing.assert_allclose(inverse_frequency_weights([10, 30, 60]), [2.0, 2 / 3, 1 / 3])
    weights = inverse_frequency_weights(ISIC2019_COUNTS)
    assert weights.mean() == pytest.approx(1.0)
    # Weight ratios are inverse count ratios: DF (239) vs NV (12875).
    assert weights[5] / weights[1] == pytest.approx(12875 / 239)


def test_absent_classes_get_zero_weight_and_the_rest_mean_one():
    weights = inverse_frequency_weights([5, 0, 20])
    assert weights[1] == 0
    np.testing.assert_allclose(weights[[0, 2]], [1.6, 0.4])
    with pytest.raises(DataError, match="no samples"):
        inverse_frequency_weights([0, 0])


def test_effective_number_weights_values():
    # Cui et al.: E_n = (1 - beta^n) / (1 - beta); E_1 = 1, E_1000 = (1 - 0.999^1000) / 0.001
    effective = (1 - 0.999**1000) / 0.001
    raw = np.array([1.0, 1 / effective])
    np.testing.assert_allclose(effective_number_weights([1, 1000], beta=0.999), raw / raw.mean())
    # beta = 0: every class counts as one sample -> equal weights.
    np.testing.assert_allclose(effective_number_weights([3, 300, 30], beta=0.0), [1.0, 1.0, 1.0])
    # beta -> 1 approaches inverse frequency.
    np.testing.assert_allclose(effective_number_weights([10, 30, 60], beta=1 - 1e-9),
                               inverse_frequency_weights([10, 30, 60]), rtol=1e-5)
    # Default beta softens the ISIC imbalance relative to inverse frequency.
    isic = effective_number_weights(ISIC2019_COUNTS)
    assert isic.mean() == pytest.approx(1.0)
    assert 1 < isic[5] / isic[1] < 12875 / 239
    with pytest.raises(DataError, match="beta"):
        effective_number_weights([1, 2], beta=1.0)


def test_balanced_sampler_evens_out_classes_and_is_seeded():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    sampler = class_balanced_sampler(labels, num_classes=3, seed=1)
    assert len(sampler) == len(labels)
    drawn = np.array(list(sampler))
    shares = np.bincount(labels[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.06)
    np.testing.assert_array_equal(drawn, list(class_balanced_sampler(labels, 3, seed=1)))
    assert not np.array_equal(drawn, list(class_balanced_sampler(labels, 3, seed=2)))
    # Successive epochs draw different indices; an epoch replays exactly (resume).
    sampler.set_epoch(1)
    assert not np.array_equal(drawn, list(sampler))
    sampler.set_epoch(0)
    np.testing.assert_array_equal(drawn, list(sampler))
    with pytest.raises(DataError, match="empty"):
        class_balanced_sampler([], 3)


def test_epoch_sampler_shards_cover_every_sample_with_equal_lengths():
    shards = [list(EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(range(10))
    single = list(EpochSampler(10, shuffle=True, seed=3))
    assert sorted(single) == list(range(10)) and single != list(range(10))


def test_epoch_sampler_tags_items_with_the_epoch():
    sampler = EpochSampler(5, tag_epoch=True)
    sampler.set_epoch(2)
    assert list(sampler) == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("world_size", [1, 2])
def test_epoch_sampler_resumes_mid_epoch_with_the_rest_of_that_epoch(world_size):
    for rank in range(world_size):
        reference = EpochSampler(50, shuffle=True, seed=3, rank=rank, world_size=world_size, tag_epoch=True)
        reference.set_epoch(4)
        whole = list(reference)
        resumed = EpochSampler(50, shuffle=True, seed=3, rank=rank, world_size=world_size, tag_epoch=True)
        resumed.resume_at(4, 16)
        resumed.set_epoch(4)  # Lightning sets the same epoch again before iterating: the skip survives
        assert list(resumed) == whole[16:]
        assert list(resumed) == whole  # the skip applies once; the epoch replays in full afterwards
        resumed.resume_at(4, 8)
        resumed.set_epoch(5)  # another epoch: the pending skip is dropped
        reference.set_epoch(5)
        assert list(resumed) == list(reference)
    with pytest.raises(DataError, match="cannot resume at item 60"):
        EpochSampler(50).resume_at(0, 60)


def test_resume_position_continues_the_epoch_or_starts_the_next():
    assert resume_position(2, 5, 9) == (2, 5)
    assert resume_position(2, 0, 9) == (2, 0)
    assert resume_position(2, 9, 9) == (3, 0)  # checkpoint at the epoch's end
    assert resume_position(2, 4, 4) == (3, 0)  # limit_train_batches reached
