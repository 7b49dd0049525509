"""How long a training run will take on the machine at hand, measured before it starts.

A few optimiser steps of the configured model at the configured batch and input size, on the device
Lightning would use, timed after one warm-up step; the estimate is that step time times the run's
steps. Data loading and validation are not included, so the real run takes somewhat longer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from skindistil.config import TrainConfig
from skindistil.models import create_teacher
from skindistil.training.trainer import resolve_precision


@dataclass(frozen=True)
class TrainingEstimate:
    """`seconds_per_step` (wall seconds, measured), `steps` (optimiser steps of the whole run),
    `device` ("cpu" or "cuda")."""

    seconds_per_step: float
    steps: int
    device: str

    @property
    def seconds(self) -> float:
        return self.seconds_per_step * self.steps


def resolve_accelerator(accelerator: str) -> str:
    """The device type Lightning picks for `accelerator` here: "cuda" or "cpu"."""
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def estimate_training(cfg: TrainConfig, num_train: int, num_classes: int, *, steps: int = 3) -> TrainingEstimate:
    """Time `steps` optimiser steps (after one warm-up) of `cfg`'s model on random images of its
    input size; `num_train` training images give the run's step count (epochs x batches)."""
    device = resolve_accelerator(cfg.trainer.accelerator)
    size = cfg.preprocess.image_size
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("img_size", size)
    model = create_teacher(cfg.model.name, num_classes=num_classes, **kwargs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(cfg.data.batch_size, 3, size, size, device=device)
    target = torch.randint(0, num_classes, (cfg.data.batch_size,), device=device)
    dtype = torch.bfloat16 if resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator).startswith("bf16") else None

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(batch), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / steps
    batches = math.ceil(num_train / cfg.data.batch_size)
    if cfg.trainer.limit_train_batches is not None:
        limit = cfg.trainer.limit_train_batches
        batches = min(batches, int(limit) if isinstance(limit, int) else math.ceil(batches * float(limit)))
    return TrainingEstimate(per_step, batches * cfg.trainer.max_epochs, device)


def format_duration(seconds: float) -> str:
    """Rounded for a person: '45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
