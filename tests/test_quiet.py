"""A Lightning fit through skindistil's trainer factory prints none of Lightning's noise, but keeps real warnings."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from skindistil.config import TrainerConfig
from skindistil.training.trainer import build_trainer

NOISE = ("LeafSpec", "litlogger", "to estimate number of stepping batches", "smaller than the logging interval")


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train/loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        self.log("val/balanced_accuracy", 0.5)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        # asking for the step count makes Lightning announce that it reads the train loader
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=steps)}

    def on_train_end(self):
        warnings.warn("the user's own warning stays visible", UserWarning, stacklevel=1)


def test_fit_is_quiet_but_keeps_real_warnings(tmp_path, caplog):
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    loader = DataLoader(data, batch_size=4)  # 2 batches, under the logging interval of 10
    cfg = TrainerConfig(max_epochs=1, accelerator="cpu", devices=1, precision="32-true", progress=False)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(cfg, tmp_path)
        trainer.fit(_Tiny(), train_dataloaders=loader, val_dataloaders=loader)
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [line for line in shown if any(noise in line for noise in NOISE)], shown
    assert "the user's own warning stays visible" in shown
    assert any("max_epochs=1" in line for line in shown), shown  # Lightning's other info is untouched
