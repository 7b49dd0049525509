"""Callbacks: exact resume of random state, and training throughput without validation."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch


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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(
                json.dumps({"images": self.images, "seconds": self.seconds, "images_per_second": self.images_per_second})
            )
