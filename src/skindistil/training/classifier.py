"""LightningModule for training one classifier (the teacher, or any single model) with cross-entropy."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from skindistil.config import OptimConfig
from skindistil.training.collect import PredictionCollector
from skindistil.training.optim import configure_optimizers
from skindistil.training.trainer import CLASSES_KEY
from skindistil.training.validation import log_validation_metrics


class ClassifierModule(L.LightningModule):
    """Cross-entropy training; validation metrics over the whole validation set (selection on BMA)."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        optim: OptimConfig,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.optim_cfg = optim
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.val_predictions = PredictionCollector()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch[0], batch[1]
        logits = self.model(images)
        loss = F.cross_entropy(
            logits, targets, weight=self.class_weights, label_smoothing=self.optim_cfg.label_smoothing
        )
        # the epoch mean is EpochMeanLoss's (it survives a mid-epoch resume)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets, indices = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), targets)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(targets))
        self.val_predictions.update(logits.float().softmax(dim=-1), targets, indices)

    def on_validation_epoch_end(self):
        log_validation_metrics(self, self.val_predictions, self.class_names)

    def on_save_checkpoint(self, checkpoint):
        checkpoint[CLASSES_KEY] = list(self.class_names)  # a resume on other classes is refused

    def configure_optimizers(self):
        return configure_optimizers(self, self.model, self.optim_cfg)
