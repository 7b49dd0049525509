"""Train one classifier end to end: data module, model, Lightning fit (or resume), artifact."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from skindistil.config import DistillConfig, PreprocessConfig, TrainConfig, dump_yaml
from skindistil.data.datamodule import SkinDataModule
from skindistil.data.sampling import inverse_frequency_weights
from skindistil.data.splits import check_trainable
from skindistil.errors import ConfigError
from skindistil.models import create_teacher, save_artifact
from skindistil.models.teacher import accepts_img_size
from skindistil.training.classifier import ClassifierModule
from skindistil.training.trainer import MONITOR, build_trainer, fit, load_checkpoint_state, resume_checkpoint

IMBALANCE_MODES = ("none", "weighted-loss", "balanced-sampler")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    best_val_bma: float | None
    best_checkpoint: Path | None
    images_per_second: float


def build_datamodule(cfg: TrainConfig | DistillConfig, preprocess: PreprocessConfig) -> SkinDataModule:
    if not cfg.data.dir:
        raise ConfigError("data.dir: no prepared dataset given (use --data DATA_DIR from `skindistil prepare`)")
    if cfg.data.imbalance not in IMBALANCE_MODES:
        raise ConfigError(f"data.imbalance: {cfg.data.imbalance!r} is not one of {', '.join(IMBALANCE_MODES)}")
    return SkinDataModule(
        cfg.data.dir,
        preprocess=preprocess,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        augment_on=cfg.data.augment_on,
        sampler="balanced" if cfg.data.imbalance == "balanced-sampler" else "none",
        fold=cfg.data.fold,
        seed=cfg.trainer.seed,
    )


def loss_class_weights(cfg: TrainConfig | DistillConfig, datamodule: SkinDataModule) -> torch.Tensor | None:
    """Inverse-frequency class weights for the loss when `data.imbalance` is weighted-loss."""
    if cfg.data.imbalance != "weighted-loss":
        return None
    weights = inverse_frequency_weights(datamodule.class_counts("train"))
    return torch.as_tensor(weights, dtype=torch.float32)


def architecture(cfg: TrainConfig, num_classes: int) -> dict:
    """The timm architecture the artifact records: enough to rebuild the network without a download.

    Models with a fixed input grid (ViTs) get `img_size` = preprocess.image_size unless the kwargs set
    it; convnets (ResNet, ConvNeXt, ...) take no `img_size` and run at whatever size preprocessing gives.
    """
    kwargs = dict(cfg.model.kwargs)
    if "img_size" not in kwargs and accepts_img_size(cfg.model.name):
        kwargs["img_size"] = cfg.preprocess.image_size
    return {"name": cfg.model.name, "kwargs": {**kwargs, "num_classes": num_classes}}


def start_run(cfg: TrainConfig | DistillConfig, preprocess: PreprocessConfig) -> SkinDataModule:
    """Create the run directory, record the resolved config, seed everything, set up the data, and
    refuse a training set with fewer than two classes or a class without images (`check_trainable`)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg.to_dict(), cfg.run_dir / "config.yaml")
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, preprocess)
    datamodule.setup("fit")
    names = datamodule.vocab.names
    check_trainable(dict(zip(names, datamodule.class_counts("train").tolist(), strict=True)), str(cfg.data.dir))
    val_counts = datamodule.class_counts("val")
    absent = [name for name, count in zip(names, val_counts, strict=True) if count == 0]
    if val_counts.sum() and absent:
        warnings.warn(f"{cfg.data.dir}: the val split has no image of {', '.join(absent)}: the validation BMA that "
                      f"selects the best checkpoint averages the other {len(names) - len(absent)} classes", stacklevel=2)
    return datamodule


def train_classifier(cfg: TrainConfig, *, resume: bool = False, resume_from: str | Path | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.data.dir`; select on validation BMA; write the run directory and model/.

    `resume`: continue from RUN/checkpoints/last.ckpt when it exists; `resume_from`: from that checkpoint.
    """
    run_dir = cfg.run_dir
    ckpt_path = resume_checkpoint(run_dir, resume=resume, resume_from=resume_from)
    datamodule = start_run(cfg, cfg.preprocess)
    classes = datamodule.vocab.to_list()
    arch = architecture(cfg, len(classes))
    model = create_teacher(arch["name"], num_classes=len(classes), pretrained=cfg.model.pretrained,
                           ema=cfg.model.pretrained_ema,
                           **{k: v for k, v in arch["kwargs"].items() if k != "num_classes"})
    module = ClassifierModule(model, classes, cfg.optim, class_weights=loss_class_weights(cfg, datamodule))

    trainer = build_trainer(cfg.trainer, run_dir, resume_from=ckpt_path)
    fit(trainer, module, datamodule, ckpt_path)
    return finish_run(trainer, module, run_dir, arch=arch, classes=classes, preprocess=cfg.preprocess,
                      extra={"role": "teacher", "train_config": cfg.to_dict()})


def finish_run(trainer: L.Trainer, module, run_dir: Path, *, arch: dict, classes, preprocess, extra: dict,
               net_attr: str = "model") -> TrainResult:
    """Load the best-by-val-BMA weights into the module and write the artifact (rank 0 only)."""
    checkpoint_cb = trainer.checkpoint_callback
    best_path = Path(checkpoint_cb.best_model_path) if checkpoint_cb and checkpoint_cb.best_model_path else None
    best_score = checkpoint_cb.best_model_score if checkpoint_cb else None
    if best_path is not None and best_path.is_file():
        state = load_checkpoint_state(best_path)["state_dict"]
        module.load_state_dict(state, strict=False)
    throughput = next((c.images_per_second for c in trainer.callbacks if hasattr(c, "images_per_second")),
                      float("nan"))
    model_dir = None
    if trainer.is_global_zero:
        model_dir = run_dir / "model"
        metrics = {"val": {"balanced_accuracy": float(best_score) if best_score is not None else None},
                   "training": {"images_per_second": throughput, "epochs": trainer.current_epoch,
                                "monitor": MONITOR}}
        save_artifact(getattr(module, net_attr).cpu().eval(), model_dir, arch=arch, classes=list(classes),
                      preprocess=preprocess, metrics=metrics, extra=extra)
    return TrainResult(run_dir, model_dir, float(best_score) if best_score is not None else None, best_path,
                       throughput)
