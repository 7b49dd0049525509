"""Shared fixtures. Real images are read from ../shared/data (override with SKINDISTIL_SHARED_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SKINDISTIL_SHARED_DATA", REPO.parent / "shared" / "data"))
HAM_ROOT = SHARED_DATA / "ham10000"
UDA_ROOT = SHARED_DATA / "isic2019_uda1"


@pytest.fixture(scope="session")
def ham_root() -> Path:
    if not (HAM_ROOT / "HAM10000_metadata.csv").is_file():
        pytest.fail(f"real data missing: {HAM_ROOT} (tests need ../shared/data)")
    return HAM_ROOT


@pytest.fixture(scope="session")
def uda_root() -> Path:
    if not (UDA_ROOT / "ISIC_2019_Training_GroundTruth.csv").is_file():
        pytest.fail(f"real data missing: {UDA_ROOT} (tests need ../shared/data)")
    return UDA_ROOT


@pytest.fixture(scope="session")
def ham_small(ham_root, tmp_path_factory) -> Path:
    """400 real HAM10000 images prepared (lesion-grouped 70/15/15 splits), cached at a shorter side of 80 px."""
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source

    out = tmp_path_factory.mktemp("ham400")
    prepare_dataset(build_source("ham10000", ham_root), out, limit=400, short_side=80, workers=2, progress=False)
    return out


def serving_artifact(out_dir: Path) -> Path:
    """The tiny model the serving tests use: a random 2-block ViT at 32 px with the ISIC 2019 classes;
    a large head makes its probabilities clearly non-uniform."""
    import torch

    from skindistil.config import PreprocessConfig
    from skindistil.data.vocab import ISIC2019
    from skindistil.models import create_teacher, save_artifact

    torch.manual_seed(0)
    model = create_teacher(
        "vit_base_patch16_224", num_classes=8, embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32
    )
    torch.nn.init.normal_(model.head.weight, std=1.0)
    return save_artifact(
        model,
        out_dir / "lesions" / "model",
        classes=list(ISIC2019.names),
        preprocess=PreprocessConfig(image_size=32),
        metrics={"test": {"balanced_accuracy": 0.5}},
        extra={"role": "student"},
    )


def tiny_train_config(data_dir, out_dir, name="teacher", **trainer):
    """A tiny ViT teacher recipe for 64 px images that trains in seconds on 2 CPU cores."""
    from skindistil.config import TrainConfig

    return TrainConfig.from_dict({
        "name": name,
        "out_dir": str(out_dir),
        "data": {"dir": str(data_dir), "batch_size": 32, "num_workers": 0, "imbalance": "weighted-loss"},
        "model": {"name": "vit_base_patch16_224",
                  "kwargs": {"embed_dim": 48, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 16}},
        "preprocess": {"image_size": 64},
        "optim": {"lr": 2e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1},
        "trainer": {"max_epochs": 6, "precision": "32-true", "accelerator": "cpu", "devices": 1,
                    "progress": False, "log_every_n_steps": 1, **trainer},
    })
