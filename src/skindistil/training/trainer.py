"""Trainer factory: precision, devices/strategy, checkpoints (best by validation BMA + last), logs, progress."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from skindistil.config import TrainerConfig
from skindistil.errors import ConfigError, ModelError
from skindistil.quiet import silence_third_party_noise
from skindistil.training.callbacks import RNGStateCallback, TrainThroughput

MONITOR = "val/bma"


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """`auto`: bf16 mixed precision on a CUDA GPU that supports it, full fp32 on the CPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: TrainerConfig, run_dir: Path, *, extra_callbacks=(), monitor: str = MONITOR) -> L.Trainer:
    silence_third_party_noise()
    run_dir = Path(run_dir)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    callbacks = [checkpoint, RNGStateCallback(), TrainThroughput(run_dir / "logs" / "throughput.json")]
    callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience))
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    callbacks.extend(extra_callbacks)
    loggers = [
        CSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir, name="logs", version="tb", default_hp_metric=False),
    ]
    limits = {}
    if cfg.limit_train_batches is not None:
        limits["limit_train_batches"] = cfg.limit_train_batches
    if cfg.limit_val_batches is not None:
        limits["limit_val_batches"] = cfg.limit_val_batches
    return L.Trainer(
        max_epochs=cfg.max_epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        log_every_n_steps=cfg.log_every_n_steps,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        # the data module shards by rank itself, with epoch-seeded order that survives a resume
        use_distributed_sampler=False,
        deterministic=False,
        num_sanity_val_steps=0,
        **limits,
    )


def check_checkpoint(path: str | Path) -> Path:
    """Fail early, with the file named, on a missing, truncated or corrupt Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found (nothing to resume from)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelError(
            f"{path}: checkpoint is truncated or corrupt ({exc}); delete it to restart, or resume from another"
        ) from None
    if bad is not None:
        raise ModelError(f"{path}: checkpoint is corrupt (member {bad} fails its CRC check)")
    return path


def load_checkpoint_state(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint's dict with torch.load(weights_only=True): tensors and plain data only, no pickle code."""
    path = check_checkpoint(path)
    return torch.load(path, map_location=map_location, weights_only=True)


# Checkpoint key under which the modules record their class names (see `check_resume_classes`).
CLASSES_KEY = "skindistil_classes"


def check_resume_classes(checkpoint: dict, classes, path: str | Path) -> None:
    """Refuse to resume a checkpoint trained on other classes (names or order) than the data's.

    Checkpoints written before the classes were recorded pass (their head shape is still checked by
    the state-dict load)."""
    recorded = checkpoint.get(CLASSES_KEY)
    if recorded is not None and list(recorded) != list(classes):
        raise ConfigError(f"{path}: checkpoint was trained on classes {list(recorded)}, the data has {list(classes)}; "
                          "resume with the dataset it was trained on, or start a new run")


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule, run_dir: Path, *, resume: bool) -> None:
    """`trainer.fit`, continuing from RUN/checkpoints/last.ckpt when `resume` and it exists (and was
    trained on the module's classes)."""
    ckpt_path = None
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if resume and last.exists():
        ckpt_path = check_checkpoint(last)
        check_resume_classes(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True),
                             module.class_names, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
