"""Synthetic dermoscopy-like dataset: determinism, ISIC-like imbalance, separable classes, vignette, demo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skindistil import cli
from skindistil.data.imageio import border_crop_box
from skindistil.data.records import Record
from skindistil.data.sources import build_source
from skindistil.data.synthetic import (
    DEFAULT_NUM_IMAGES,
    MIN_PER_CLASS,
    SyntheticSource,
    class_counts_for,
)
from skindistil.data.vocab import ISIC2019
from skindistil.errors import DataError, ImageError


@pytest.fixture(scope="module")
def builtin() -> SyntheticSource:
    return build_source("synthetic", "builtin")


@pytest.fixture(scope="module")
def records(builtin) -> list[Record]:
    return builtin.records()


def test_builtin_is_isic2019_vocab_and_imbalanced_like_isic(builtin, records):
    assert builtin.vocab == ISIC2019
    assert len(records) == DEFAULT_NUM_IMAGES
    counts = np.bincount([r.label for r in records], minlength=len(ISIC2019))
    share = dict(zip(ISIC2019.names, counts / counts.sum(), strict=True))
    assert 0.45 <= share["NV"] <= 0.55
    assert counts.argmax() == ISIC2019.index("NV")
    for rare in ("DF", "VASC"):
        assert 0.005 <= share[rare] <= 0.02
    assert counts.min() >= MIN_PER_CLASS
    assert len({r.image_id for r in records}) == len(records)


def test_small_datasets_still_have_every_class():
    counts = class_counts_for(40)
    assert counts.sum() == 40 and counts.min() >= 1
    assert SyntheticSource("40").num_images == 40
    with pytest.raises(DataError, match="at least 8"):
        class_counts_for(5)


def test_lesions_with_two_views_keep_one_label(records):
    by_group: dict[str, set[int]] = {}
    for r in records:
        by_group.setdefault(r.group, set()).add(r.label)
    assert all(len(labels) == 1 for labels in by_group.values())
    sizes = np.bincount(np.unique([r.group for r in records], return_counts=True)[1])
    assert sizes[2] > 0.1 * len(by_group)  # some lesions photographed twice, as in HAM10000


def test_open_regenerates_the_same_image(builtin, records):
    again = build_source("synthetic", "builtin")
    for record in records[:5]:
        first = np.asarray(builtin.open(record))
        assert first.shape == (256, 341, 3) and first.dtype == np.uint8
        np.testing.assert_array_equal(first, np.asarray(again.open(record)))
    other_seed = SyntheticSource(seed=7).records()[0]
    assert not np.array_equal(np.asarray(builtin.open(records[0])), np.asarray(builtin.open(other_seed)))


def test_two_views_of_a_lesion_differ(builtin, records):
    group = next(g for g in {r.group for r in records} if sum(r.group == g for r in records) == 2)
    first, second = (np.asarray(builtin.open(r)) for r in records if r.group == group)
    assert not np.array_equal(first, second)


def test_root_spec_and_options():
    assert SyntheticSource("600").num_images == 600
    assert SyntheticSource("builtin", num_images=100, image_size=64).records()[-1].image_id == "SYN_00099"
    image = SyntheticSource("builtin", image_size=64).open(SyntheticSource("builtin").records()[0])
    assert image.size == (85, 64)
    with pytest.raises(DataError, match="number of images"):
        SyntheticSource("somewhere")
    with pytest.raises(DataError, match="num_images"):
        SyntheticSource("600", num_images=100)
    with pytest.raises(ImageError, match="not a synthetic image"):
        SyntheticSource().open(Record("x", "/tmp/x.jpg", 0))


def test_some_images_have_a_vignette_the_border_crop_removes(builtin, records):
    boxes = [border_crop_box(np.asarray(builtin.open(r))) for r in records[:60]]
    cropped = [box for box in boxes if box != (0, 0, 341, 256)]
    assert 0.15 * len(boxes) <= len(cropped) <= 0.6 * len(boxes)
    # The field of view is narrower than the image: the crop removes the side bands.
    assert all(x1 - x0 < 341 - 20 for x0, _, x1, _ in cropped)


def _colour_features(image: np.ndarray) -> np.ndarray:
    """Joint 4x4x4 RGB histogram and per-channel mean/std of the image centre."""
    height, width, _ = image.shape
    centre = image[height // 4: 3 * height // 4, width // 4: 3 * width // 4].reshape(-1, 3) / 255.0
    hist = np.histogramdd(centre, bins=(4, 4, 4), range=[(0, 1)] * 3)[0].ravel() / len(centre)
    return np.concatenate([hist, centre.mean(0), centre.std(0)])


def test_classes_are_separable_by_colour_but_not_trivially():
    """A nearest-centroid classifier on colour histograms (no texture, no shape) scores far above
    chance (1/8) on held-out lesions, yet is not perfect: the classes overlap."""
    source = SyntheticSource("builtin", image_size=64, seed=5)
    per_class = 24
    features, labels = [], []
    for label in range(len(ISIC2019)):
        for i in range(per_class):
            index = label * per_class + i
            record = Record(f"s{index}", f"synthetic://5/{index}/{index}", label)
            features.append(_colour_features(np.asarray(source.open(record))))
            labels.append(label)
    features, labels = np.asarray(features), np.asarray(labels)
    train = np.arange(len(labels)) % 2 == 0
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    z = (features - mean) / std
    centroids = np.stack([z[train & (labels == c)].mean(0) for c in range(len(ISIC2019))])
    predicted = np.argmin(((z[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    recalls = [(predicted[labels[~train] == c] == c).mean() for c in range(len(ISIC2019))]
    balanced_accuracy = float(np.mean(recalls))
    assert 0.4 < balanced_accuracy < 0.99


def test_prepare_cli_builds_the_synthetic_dataset(tmp_path, capsys):
    out = tmp_path / "demo-data"
    assert cli.main(["prepare", "--source", "synthetic", "--root", "48", "--out", str(out), "--workers", "0",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MEL" in printed and "train" in printed
    info = json.loads((out / "dataset.json").read_text())
    assert info["source"] == "synthetic" and info["num_images"] == 48
    assert info["classes"] == list(ISIC2019.names)
    assert sum(sum(split.values()) for split in info["counts"].values()) == 48
