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

    Timed from the end of one training batch to the end of the next, so the interval covers waiting
    for data, forward, backward and the optimiser step; intervals that contain a validation run or an
    epoch boundary are dropped. Written to `path` (JSON) at the end of fit.
    """

    def __init__(self, path: str | Path | None = None, warmup_batches: int = 5):
        self.path = Path(path) if path else None
        self.warmup_batches = warmup_batches
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None
        self._seen = 0

    def _sync(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None

    def on_validation_start(self, trainer, pl_module):
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(trainer)
        now = time.perf_counter()
        self._seen += 1
        if self._last is not None and self._seen > self.warmup_batches:
            self.seconds += now - self._last
            self.images += len(batch[1]) * trainer.world_size
        self._last = now

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def on_fit_end(self, trainer, pl_module):
        if self.path is not None and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(
                json.dumps({"images": self.images, "seconds": self.seconds, "images_per_second": self.images_per_second})
            )
