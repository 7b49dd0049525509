"""Callbacks: exact resume of random state and of the epoch's mean loss, and training throughput without validation."""

from __future__ import annotations

import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from skindistil.files import write_json


class RNGStateCallback(L.Callback):
    """Store Python, NumPy and torch CPU/CUDA generator states in every checkpoint and restore them on
    resume, so dropout and any other global randomness continue exactly where the checkpoint was taken."""

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            # plain lists, so checkpoints load with torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class EpochMeanLoss(L.Callback):
    """Logs `train/loss_epoch`, the batch-size-weighted mean training loss of the epoch, from sums kept in
    every checkpoint: an epoch resumed mid-way still averages over all its batches (Lightning's own
    `on_epoch` aggregate is not checkpointed and would restart empty, logging a wrong mean).

    The sums stay on the device during the epoch (no synchronisation per step). Rank-local under DDP,
    like Lightning's unsynchronised default.
    """

    NAME = "train/loss_epoch"

    def __init__(self):
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.total, self.count = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        size = len(batch[1])
        self.total = self.total + loss.detach().float() * size
        self.count += size

    def on_train_epoch_end(self, trainer, pl_module):
        if self.count:
            pl_module.log(self.NAME, self.total / self.count, on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict:
        return {"total": float(self.total), "count": self.count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total, self.count = float(state_dict["total"]), int(state_dict["count"])


def _numpy_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


class TrainThroughput(L.Callback):
    """Training images per second, data loading included, validation and the first batches excluded.

    Timed over stretches of consecutive training batches: a stretch starts at the end of a batch
    (after `warmup_batches` batches of the run, or the first batch of a later epoch) and ends when
    validation starts or the epoch ends, so it covers waiting for data, forward, backward and the
    optimiser step of every batch inside it. The device is synchronised only at stretch ends, never
    per batch, so timing does not stall the CPU/GPU overlap it measures. Written to `path` (JSON).
    """

    def __init__(self, path: str | Path | None = None, warmup_batches: int = 5):
        self.path = Path(path) if path else None
        self.warmup_batches = warmup_batches
        self.images = 0
        self.seconds = 0.0
        self._seen = 0
        self._start: float | None = None
        self._count = 0

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        if self._start is not None:
            self._count += len(batch[1]) * trainer.world_size
        elif self._seen >= self.warmup_batches:
            self._start, self._count = self._now(trainer), 0

    def _close(self, trainer):
        if self._start is not None:
            self.seconds += self._now(trainer) - self._start
            self.images += self._count
            self._start = None

    def on_validation_start(self, trainer, pl_module):
        self._close(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._close(trainer)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def on_fit_end(self, trainer, pl_module):
        self._close(trainer)
        if self.path is not None and trainer.is_global_zero:
            write_json(self.path, {"images": self.images, "seconds": self.seconds,
                                   "images_per_second": self.images_per_second}, indent=None)
