"""SkinDataModule over a small prepared real-HAM10000 DATA_DIR: batches, splits, folds, device path, errors."""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from skindistil.config import PreprocessConfig
from skindistil.data.datamodule import SkinDataModule
from skindistil.data.prepare import load_manifest, prepare_dataset
from skindistil.data.sources import build_source
from skindistil.data.vocab import HAM10000
from skindistil.errors import ConfigError, DataError

CFG = PreprocessConfig(image_size=32)
FOLDS = 3


@pytest.fixture(scope="module")
def data_dir(ham_root, tmp_path_factory):
    """60 real HAM10000 images prepared with 3 folds over train+val."""
    out = tmp_path_factory.mktemp("ham60")
    prepare_dataset(build_source("ham10000", ham_root), out, limit=60, folds=FOLDS, workers=0, progress=False)
    return out


def _module(data_dir, **kwargs) -> SkinDataModule:
    return SkinDataModule(data_dir, CFG, batch_size=8, num_workers=0, **kwargs)


def test_cpu_path_batches_for_every_split(data_dir):
    dm = _module(data_dir)
    assert dm.vocab == HAM10000 and dm.num_classes == 7
    manifest, _ = load_manifest(data_dir)
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
                          ("test", dm.test_dataloader())):
        images, labels, *indices = next(iter(loader))
        if split == "val":  # validation batches carry row indices (exact metrics under DDP)
            assert indices[0].tolist() == list(range(len(labels)))
        assert images.shape == (min(8, (manifest["split"] == split).sum()), 3, 32, 32)
        assert images.dtype == torch.float32 and images.min() >= -1.0 and images.max() <= 1.0
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 7
        assert dm.on_after_batch_transfer([images, labels], 0)[0] is images  # nothing left to do
    sizes = {split: len(dm.dataset(split)) for split in ("train", "val", "test")}
    assert sizes == manifest["split"].value_counts().to_dict()
    np.testing.assert_array_equal(dm.labels("val"), manifest.loc[manifest["split"] == "val", "label"])
    assert dm.class_counts("train").sum() == sizes["train"]


def test_predict_loader_yields_ids_in_manifest_order(data_dir):
    dm = _module(data_dir)
    ids, labels = [], []
    for images, batch_labels, batch_ids in dm.predict_dataloader():
        assert images.shape[1:] == (3, 32, 32)
        ids += list(batch_ids)
        labels += batch_labels.tolist()
    assert ids == dm.image_ids("test")
    assert labels == dm.labels("test").tolist()
    dataset = dm.dataset("test")
    assert dataset.image_ids == ids and dataset.vocab == HAM10000


def test_device_path_yields_uint8_squares_and_augments_after_transfer(data_dir):
    dm = _module(data_dir, augment_on="device")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 256, 256)
    # Outside a trainer the hook applies the eval-mode BatchAugment.
    evaluated, same_labels = dm.on_after_batch_transfer([images, labels], 0)
    assert evaluated.shape == (8, 3, 32, 32) and evaluated.dtype == torch.float32
    assert same_labels is labels
    torch.manual_seed(0)
    augmented = dm.device_transform(images, train=True)
    assert augmented.shape == (8, 3, 32, 32) and (augmented - evaluated).abs().mean() > 0.02
    # Evaluation on the device path agrees with the CPU eval transform.
    cpu_val, *_ = next(iter(_module(data_dir).val_dataloader()))
    device_val, *_ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert (cpu_val - device_val).abs().mean() < 0.03


def test_fold_mode_uses_fold_k_as_validation(data_dir):
    manifest, _ = load_manifest(data_dir)
    pool = manifest[manifest["split"] != "test"]
    seen_val = []
    for fold in range(FOLDS):
        dm = _module(data_dir, fold=fold)
        train_ids, val_ids = set(dm.image_ids("train")), set(dm.image_ids("val"))
        assert not train_ids & val_ids
        assert train_ids | val_ids == set(pool["image_id"])
        assert val_ids == set(pool.loc[pool["fold"] == fold, "image_id"])
        assert dm.image_ids("test") == manifest.loc[manifest["split"] == "test", "image_id"].tolist()
        images, *_ = next(iter(dm.val_dataloader()))
        assert images.shape[1:] == (3, 32, 32)
        seen_val += dm.image_ids("val")
    assert sorted(seen_val) == sorted(pool["image_id"])
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        _module(data_dir, fold=FOLDS).setup()


def test_fold_mode_needs_a_dataset_prepared_with_folds(data_dir, tmp_path):
    copy = tmp_path / "nofolds"
    shutil.copytree(data_dir, copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["splits"]["folds"] = None
    (copy / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="without k-folds"):
        _module(copy, fold=0).setup()


def test_balanced_sampler_draws_classes_evenly(data_dir):
    natural = _module(data_dir).labels("train")
    dm = _module(data_dir, sampler="balanced")
    loader = dm.train_dataloader()
    assert len(loader.sampler) == len(natural)
    drawn = np.concatenate([natural[list(loader.sampler)] for _ in range(30)])
    nv = HAM10000.index("nv")
    present = np.unique(natural)
    shares = np.bincount(drawn, minlength=7)[present] / len(drawn)
    assert (natural == nv).mean() > 0.5
    np.testing.assert_allclose(shares, 1 / len(present), atol=0.06)


def test_corrupt_or_missing_cache_file_names_the_file(data_dir, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(data_dir, copy)
    dm = _module(copy)
    dataset = dm.dataset("test")
    manifest, _ = load_manifest(copy)
    first, second = manifest.loc[manifest["split"] == "test", "cache_file"].tolist()[:2]
    (copy / first).write_bytes((copy / first).read_bytes()[:100])
    with pytest.raises(DataError, match=first.split("/")[-1]) as failure:
        dataset[0]
    assert "corrupt" in str(failure.value)
    (copy / second).unlink()
    with pytest.raises(DataError, match="missing"):
        dataset[1]


def test_invalid_settings_are_rejected(data_dir):
    with pytest.raises(ConfigError, match="augment_on"):
        SkinDataModule(data_dir, CFG, augment_on="gpu")
    with pytest.raises(ConfigError, match="sampler"):
        SkinDataModule(data_dir, CFG, sampler="oversample")
    with pytest.raises(DataError, match="not a prepared dataset"):
        SkinDataModule(data_dir.parent, CFG).setup()


class _TinyClassifier(L.LightningModule):
    """Records what reaches training_step / validation_step after the datamodule's hooks."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, 7)
        self.seen: list[tuple[str, torch.dtype, tuple]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        self.seen.append(("train", images.dtype, tuple(images.shape[1:])))
        return nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        images = batch[0]
        self.seen.append(("val", images.dtype, tuple(images.shape[1:])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_applies_batch_augment_on_the_device_path(data_dir):
    model = _TinyClassifier()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_module(data_dir, augment_on="device"))
    assert {stage for stage, _, _ in model.seen} == {"train", "val"}
    assert all(dtype == torch.float32 and shape == (3, 32, 32) for _, dtype, shape in model.seen)


def test_loaders_leave_the_global_rng_alone_and_resume_at_the_saved_position(data_dir):
    """Creating a loader's iterator (with workers: once per run when persistent) must not draw from the
    global RNG that dropout uses, or a resumed run's dropout would shift; and a restored training
    position makes the next training loader yield exactly the rest of that epoch."""
    module = SkinDataModule(data_dir, CFG, batch_size=8, num_workers=2)
    module.setup()
    reference = module.train_dataloader()
    reference.sampler.set_epoch(1)
    state = torch.get_rng_state()
    labels = [batch[1] for batch in reference]
    val_iter = iter(module.val_dataloader())
    next(val_iter)
    assert torch.equal(torch.get_rng_state(), state)

    resumed = SkinDataModule(data_dir, CFG, batch_size=8, num_workers=2)
    resumed.setup()
    resumed.load_state_dict({"train_position": {"epoch": 1, "batches": 3}})
    rest = [batch[1] for batch in resumed.train_dataloader()]
    assert len(rest) == len(labels) - 3
    for got, want in zip(rest, labels[3:], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="built before the checkpoint was restored"):
        resumed.load_state_dict({"train_position": {"epoch": 0, "batches": 0}})


def test_cached_masks_are_refused_by_name_when_missing_corrupt_or_of_another_size(tmp_path):
    from skindistil.data.datamodule import load_cached_mask

    good, wrong, corrupt = tmp_path / "good.mask.npy", tmp_path / "wrong.mask.npy", tmp_path / "corrupt.mask.npy"
    np.save(good, np.full((4, 6), 255, dtype=np.uint8))
    np.save(wrong, np.zeros((6, 4), dtype=np.uint8))
    corrupt.write_bytes(b"not numpy")
    assert load_cached_mask(good, (4, 6)).shape == (4, 6)
    with pytest.raises(DataError, match=r"wrong\.mask\.npy.*expected uint8 \[4, 6\]"):
        load_cached_mask(wrong, (4, 6))
    with pytest.raises(DataError, match=r"corrupt\.mask\.npy.*corrupt cached mask"):
        load_cached_mask(corrupt, (4, 6))
    with pytest.raises(DataError, match=r"absent\.mask\.npy.*cached mask missing"):
        load_cached_mask(tmp_path / "absent.mask.npy", (4, 6))
