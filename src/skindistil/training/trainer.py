"""Trainer factory: precision, devices/strategy, checkpoints (best by validation BMA + last), logs, progress.

Checkpoints are written atomically and verified before they replace the previous file
(`AtomicCheckpointIO`); the last.ckpt before the current one is kept as last-prev.ckpt, so a
checkpoint damaged later still leaves one to resume from (`--resume-from`).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from skindistil.config import TrainerConfig
from skindistil.data.datamodule import SkinDataModule
from skindistil.errors import ConfigError, ModelError
from skindistil.files import save_torch
from skindistil.metric_keys import current_state_key
from skindistil.quiet import silence_third_party_noise
from skindistil.training.callbacks import EpochMeanLoss, RNGStateCallback, TrainThroughput
from skindistil.training.logs import HistoryCSVLogger

MONITOR = "val/balanced_accuracy"
LAST = "last.ckpt"
PREVIOUS = "last-prev.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file in the same folder, fsync'ed, checked
    (`check_checkpoint`) and renamed over the target: a full disk or a kill never leaves a truncated
    checkpoint. Keep-last-good: once the new last.ckpt is complete and verified, the current one (if
    complete) is renamed to last-prev.ckpt just before the new one takes its place.

    Loading (a resume) reads the callback states of a checkpoint an earlier version wrote under
    today's keys (`upgrade_callback_states`).
    """

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        checkpoint = upgrade_callback_states(super().load_checkpoint(path, *args, **kwargs), str(path))
        return relocate_checkpoint_states(checkpoint, Path(path).parent)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        keep = path.name == LAST and _complete_zip(path)

        def verify_then_keep_previous(tmp: Path) -> None:
            check_checkpoint(tmp)
            if keep:
                os.replace(path, path.with_name(PREVIOUS))

        save_torch(checkpoint, path, verify=verify_then_keep_previous)


def upgrade_callback_states(checkpoint: dict, where: str) -> dict:
    """`checkpoint` with its callback states keyed as today's callbacks name them.

    Lightning restores a callback's state (ModelCheckpoint: the best score and path; EarlyStopping: its
    patience count) from the entry keyed by the callback's `state_key`, which holds the monitored
    metric: "ModelCheckpoint{'monitor': 'val/bma', ...}" in checkpoints of earlier versions. Under a new
    monitor name that entry would be skipped, and the first validation after the resume would replace
    best.ckpt whatever its score; the keys go through `metric_keys.current_state_key` instead (only the keys:
    the states hold checkpoint paths, which are not metric names). ModelError naming the file when two
    states would share a key.
    """
    states = checkpoint.get("callbacks")
    if isinstance(states, dict):
        renamed = {current_state_key(key) if isinstance(key, str) else key: state for key, state in states.items()}
        if len(renamed) != len(states):
            raise ModelError(f"{where}: callback states saved under both the old and the new name of a metric "
                             f"({', '.join(map(str, states))}); resume from another checkpoint")
        checkpoint["callbacks"] = renamed
    return checkpoint


def relocate_checkpoint_states(checkpoint: dict, folder: Path) -> dict:
    """`checkpoint`, read from `folder`, with its ModelCheckpoint states placed in `folder`.

    A ModelCheckpoint state records its folder as an absolute path, and Lightning restores the best score
    only when that path is the resumed trainer's folder. A run directory that was copied or moved
    (another disk, another machine) would therefore resume without its best score, and the first
    validation after the resume would replace best.ckpt and the artifact, however much worse it scored.
    The states are set to the folder the checkpoint was actually read from, with the checkpoint paths
    that lay directly in the recorded folder moved with it; a checkpoint of another run's folder still
    restores no best score into this run (its folder is not this run's).
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return checkpoint
    here = os.path.realpath(folder)
    for state in states.values():
        # every ModelCheckpoint, whatever its class is called (LastCheckpoint's key starts with its own name)
        if not (isinstance(state, dict) and "dirpath" in state and "best_model_path" in state):
            continue
        recorded = state.get("dirpath")
        if not isinstance(recorded, str) or recorded == here:
            continue

        def moved(path, recorded=recorded):
            if isinstance(path, str) and path and os.path.dirname(path) == recorded:
                return os.path.join(here, os.path.basename(path))
            return path

        state["dirpath"] = here
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if name in state:
                state[name] = moved(state[name])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}
    return checkpoint


class LastCheckpoint(ModelCheckpoint):
    """The one writer of last.ckpt: at the end of every epoch (after validation) and, with
    `every_n_train_steps`, every N optimiser steps within an epoch, except on its last batch (the
    epoch-end save follows, with the validation's results and the best checkpoint's new state).

    ModelCheckpoint alone takes steps or epochs, not both, and with `save_last` it writes last.ckpt
    only when it also writes a top-k checkpoint (for `best`: only when validation BMA improves).
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True)
        self.every_n_steps = int(every_n_train_steps) if every_n_train_steps else None

    def _save_last(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
                and batch_idx + 1 < trainer.num_training_batches):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)


def _complete_zip(path: Path) -> bool:
    """`path` exists and its zip central directory (at the end of the file) is readable: not cut short."""
    try:
        zipfile.ZipFile(path).close()
    except (OSError, zipfile.BadZipFile):
        return False
    return True


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """`auto`: bf16 mixed precision on a CUDA GPU that supports it, full fp32 on the CPU."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: TrainerConfig, run_dir: Path, *, resume_from: Path | None = None, extra_callbacks=(),
                  monitor: str = MONITOR) -> L.Trainer:
    """The Trainer of a run in `run_dir`. `resume_from`: the checkpoint `fit` will continue from (its
    step tells the metrics log which rows to keep). `cfg.checkpoint_every_n_steps` adds mid-epoch
    saves of last.ckpt, from which a resume is exact too."""
    silence_third_party_noise()
    run_dir = Path(run_dir)
    every = cfg.checkpoint_every_n_steps
    if every is not None and int(every) < 1:
        raise ConfigError(f"trainer.checkpoint_every_n_steps: must be at least 1, got {every}")
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    # best first: Lightning runs checkpoint callbacks last and in order, so last.ckpt holds best's new state
    callbacks = [best, LastCheckpoint(run_dir / "checkpoints", every_n_train_steps=every),
                 RNGStateCallback(), EpochMeanLoss(), TrainThroughput(run_dir / "logs" / "throughput.json")]
    callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience))
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    callbacks.extend(extra_callbacks)
    resume_step = checkpoint_step(resume_from) if resume_from is not None else None
    loggers = [
        HistoryCSVLogger(run_dir, name="logs", resume_step=resume_step),
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
        plugins=[AtomicCheckpointIO()],
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
        raise ModelError(f"{path}: checkpoint is truncated or corrupt ({exc}); {_other_checkpoint(path)}") from None
    if bad is not None:
        raise ModelError(f"{path}: checkpoint is corrupt (member {bad} fails its CRC check); {_other_checkpoint(path)}")
    return path


def _other_checkpoint(path: Path) -> str:
    previous = path.with_name(PREVIOUS)
    if path.name == LAST and previous.is_file():
        return f"resume from the one before it with --resume-from {previous}, or delete it to restart"
    return "delete it to restart, or resume from another with --resume-from PATH"


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was saved at. ModelError naming the file when the
    checkpoint is unusable or lacks the training loop's state, including the data loader's position
    (written by an older skindistil: a resume would replay the wrong samples)."""
    path = check_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        position = state.get(SkinDataModule.__qualname__, {}).get("train_position")
        step = int(state["global_step"])
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not a Lightning training checkpoint ({type(exc).__name__}: {exc})") from None
    if position is None:
        raise ModelError(f"{path}: the checkpoint does not record the data loader's position (written by an older "
                         "skindistil); a resume would not be exact: train again without --resume")
    return step


def resume_checkpoint(run_dir: str | Path, *, resume: bool = False, resume_from: str | Path | None = None
                      ) -> Path | None:
    """The checkpoint a run continues from: `resume_from` when given, RUN/checkpoints/last.ckpt with
    `resume` when it exists, else None (a fresh start). ModelError naming the file when it is
    missing, truncated or corrupt."""
    if resume_from is not None:
        return check_checkpoint(resume_from)
    if not resume:
        return None
    last = Path(run_dir) / "checkpoints" / LAST
    if last.exists():
        return check_checkpoint(last)
    previous = last.with_name(PREVIOUS)
    if previous.is_file():
        raise ModelError(f"{last}: missing, but {previous} exists; resume from it with --resume-from {previous}")
    return None


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


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule, ckpt_path: Path | None) -> None:
    """`trainer.fit`, continuing from `ckpt_path` (see `resume_checkpoint`) when given and trained on the
    module's classes (`check_resume_classes`)."""
    if ckpt_path is not None:
        check_resume_classes(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True),
                             module.class_names, ckpt_path)
    with warnings.catch_warnings():
        # Lightning only knows resumable loaders through its own protocol; SkinDataModule restores the
        # training position itself (its state_dict), so a mid-epoch resume is exact despite the warning
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
