"""Balanced accuracy under one key, and files written by earlier versions (`bma` keys) read through one function."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from skindistil.bench.summary import find_bma
from skindistil.config import PreprocessConfig, TrainerConfig
from skindistil.errors import DataError, ModelError
from skindistil.experiments.run_report import epoch_history
from skindistil.metric_keys import current_key, current_state_key, with_current_keys
from skindistil.models import create_teacher, load_model, save_artifact, update_metrics
from skindistil.training.trainer import MONITOR, build_trainer, upgrade_callback_states

# metrics.json of a teacher trained by an earlier version (training/teacher.py wrote {"val": {"bma": x}})
OLD_MODEL_METRICS = {"val": {"bma": 0.6125}, "training": {"images_per_second": 12.5, "epochs": 3, "monitor": "val/bma"}}


def test_current_key_renames_the_keys_earlier_versions_wrote_only():
    assert current_key("bma") == "balanced_accuracy"
    assert current_key("val/bma") == "val/balanced_accuracy"
    assert current_key("per_exit_bma") == "per_exit_balanced_accuracy"
    assert current_key("bma_interval") == "balanced_accuracy_interval"
    assert current_key("delta_test_bma") == "delta_test_balanced_accuracy"
    # keys that are data (a run label, a class or subgroup name) keep their names
    for key in ("balanced_accuracy", "val/balanced_accuracy", "accuracy", "bmax", "abma", "bma2", "macro_f1",
                "bma-student", "runs/bma", "BMA"):
        assert current_key(key) == key
    assert with_current_keys({"runs": {"bma-student": 3}}, "x.json") == {"runs": {"bma-student": 3}}
    old_state = ModelCheckpoint(monitor="val/bma", mode="max").state_key
    assert current_state_key(old_state) == ModelCheckpoint(monitor=MONITOR, mode="max").state_key


def test_with_current_keys_renames_keys_at_every_depth_and_refuses_a_clash():
    family = {"families": [{"rows": [{"depth": 2, "bma": 0.4, "comparison": {"bma": {"difference": {"value": -0.1}}}}]}],
              "teachers": [{"model": "runs/bma/model", "bma": 0.5}]}
    assert with_current_keys(family, "family.json") == {
        "families": [{"rows": [{"depth": 2, "balanced_accuracy": 0.4,
                                "comparison": {"balanced_accuracy": {"difference": {"value": -0.1}}}}]}],
        "teachers": [{"model": "runs/bma/model", "balanced_accuracy": 0.5}]}  # values are left alone
    with pytest.raises(DataError, match=r"old/metrics.json: keys 'balanced_accuracy' and 'bma' both mean 'balanced_accuracy'"):
        with_current_keys({"val": {"balanced_accuracy": 0.5, "bma": 0.4}}, "old/metrics.json")


def _old_artifact(tmp_path):
    torch.manual_seed(0)
    model = create_teacher(num_classes=2, embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8).eval()
    model_dir = save_artifact(model, tmp_path / "run" / "model", classes=["MEL", "NV"],
                              preprocess=PreprocessConfig(image_size=32))
    (model_dir / "metrics.json").write_text(json.dumps(OLD_MODEL_METRICS))
    return model_dir


def test_an_old_artifacts_val_bma_is_read_as_balanced_accuracy(tmp_path):
    model_dir = _old_artifact(tmp_path)
    metrics = load_model(model_dir).metrics
    assert metrics["val"] == {"balanced_accuracy": 0.6125}
    assert metrics["training"]["monitor"] == "val/bma"  # a value: the record of what was monitored then
    assert find_bma(metrics) == (0.6125, "val")  # what `benchmark` reads of it
    merged = update_metrics(model_dir, {"test": {"balanced_accuracy": 0.55}})
    assert merged["val"] == {"balanced_accuracy": 0.6125}
    assert json.loads((model_dir / "metrics.json").read_text())["val"] == {"balanced_accuracy": 0.6125}  # rewritten
    (model_dir / "metrics.json").write_text(json.dumps({"val": {"bma": 0.6, "balanced_accuracy": 0.7}}))
    with pytest.raises(DataError, match=r"metrics.json: keys 'bma' and 'balanced_accuracy' both mean"):
        load_model(model_dir)


def test_an_old_metrics_csv_gives_the_validation_curve(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text("epoch,step,train/loss_epoch,val/bma\n0,4,1.5,\n0,4,,0.25\n1,9,1.25,\n1,9,,0.375\n")
    assert epoch_history(tmp_path) == {"epoch": [0, 1], "train_loss": [1.5, 1.25],
                                       "val_balanced_accuracy": [0.25, 0.375]}
    (logs / "metrics.csv").write_text("epoch,step,train/loss_epoch\n0,4,1.5\n")
    assert epoch_history(tmp_path) is None  # no validation column: no curves, as before


class _Scored(L.LightningModule):
    """Logs a given validation score per epoch under `name`."""

    def __init__(self, name: str, scores: list[float]):
        super().__init__()
        self.layer, self.name, self.scores = torch.nn.Linear(4, 2), name, scores

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, _):
        self.log(self.name, self.scores[self.current_epoch], on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resuming_a_checkpoint_that_monitored_val_bma_keeps_the_best_score(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    cfg = TrainerConfig(max_epochs=2, accelerator="cpu", devices=1, progress=False, early_stopping_patience=5)
    # an earlier version: val/bma logged and monitored, best 0.9 at epoch 0
    old = build_trainer(cfg, tmp_path, monitor="val/bma")
    old.fit(_Scored("val/bma", [0.9, 0.5]), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    # resumed today for two more epochs that score lower: best.ckpt must stay the epoch-0 model
    cfg.max_epochs = 4
    new = build_trainer(cfg, tmp_path)
    with warnings.catch_warnings():
        # Lightning warns about callback states it cannot place (the old monitor's, without the upgrade)
        warnings.filterwarnings("error", message=".*callbacks used to create the checkpoint")
        new.fit(_Scored(MONITOR, [0.9, 0.5, 0.3, 0.2]), DataLoader(data, batch_size=4),
                DataLoader(data, batch_size=4), ckpt_path=tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    best = new.checkpoint_callback
    assert best.monitor == MONITOR and float(best.best_model_score) == pytest.approx(0.9)
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] == 0
    assert next(cb for cb in new.callbacks if isinstance(cb, EarlyStopping)).wait_count == 3

    clash = {"callbacks": {"ModelCheckpoint{'monitor': 'val/bma'}": {}, "ModelCheckpoint{'monitor': 'val/balanced_accuracy'}": {}}}
    with pytest.raises(ModelError, match="old.ckpt: callback states saved under both"):
        upgrade_callback_states(clash, "old.ckpt")


def test_a_run_directory_moved_before_its_resume_keeps_its_best_score(tmp_path):
    """Checkpoints record their folder as an absolute path; a run resumed after it was moved (another disk,
    another machine) keeps its best score and best.ckpt instead of replacing them with a worse epoch."""
    import shutil

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    cfg = TrainerConfig(max_epochs=2, accelerator="cpu", devices=1, progress=False, early_stopping_patience=5)
    first = build_trainer(cfg, tmp_path / "run")
    first.fit(_Scored(MONITOR, [0.9, 0.5]), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    cfg.max_epochs = 4
    resumed = build_trainer(cfg, tmp_path / "moved")
    with warnings.catch_warnings():
        # Lightning's word for a checkpoint state it does not restore (best.ckpt's, or last.ckpt's writer's)
        warnings.filterwarnings("error", message=".*dirpath has changed")
        resumed.fit(_Scored(MONITOR, [0.9, 0.5, 0.3, 0.2]), DataLoader(data, batch_size=4),
                    DataLoader(data, batch_size=4), ckpt_path=tmp_path / "moved" / "checkpoints" / "last.ckpt",
                    weights_only=True)
    best = resumed.checkpoint_callback
    assert float(best.best_model_score) == pytest.approx(0.9)
    assert best.best_model_path == str((tmp_path / "moved" / "checkpoints" / "best.ckpt").resolve())
    assert torch.load(best.best_model_path, weights_only=True)["epoch"] == 0
