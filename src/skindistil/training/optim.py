"""Optimiser and per-step learning-rate schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2

from skindistil.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings; optional layer-wise lr decay (timm)."""
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas),
        layer_decay=cfg.layer_decay,
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up, then decay to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.schedule: unknown schedule {schedule!r} (linear, cosine, constant)")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int, steps_per_epoch: int):
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio)
    )


def configure_optimizers(module, model: torch.nn.Module, cfg: OptimConfig) -> dict:
    """Lightning `configure_optimizers` result: AdamW over `model` with a per-step lr schedule."""
    optimizer = build_optimizer(model, cfg)
    total = int(module.trainer.estimated_stepping_batches)
    per_epoch = max(1, total // max(1, module.trainer.max_epochs))
    scheduler = build_scheduler(optimizer, cfg, total, per_epoch)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
