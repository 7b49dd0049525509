"""Distillation runs: SkinDistilViT, FCViT, FCViTProbs, `full`, and the cascade family."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from skindistil.config import DistillConfig
from skindistil.errors import ConfigError
from skindistil.models import DepthViT, extract_student, load_model
from skindistil.models.artifact import resolve_model_dir
from skindistil.training.distiller import METHODS, DistillerModule
from skindistil.training.teacher import TrainResult, finish_run, loss_class_weights, start_run
from skindistil.training.trainer import build_trainer, fit, resume_checkpoint

ALL_METHODS = (*METHODS, "cascade")


def distill(cfg: DistillConfig, *, resume: bool = False, resume_from: str | Path | None = None) -> list[TrainResult]:
    """Run `cfg.method` from the teacher artifact `cfg.teacher`; returns one result per trained model.

    `resume`: continue each run from its checkpoints/last.ckpt when it exists; `resume_from`: continue
    the (single, non-cascade) run from that checkpoint.
    """
    if cfg.method not in ALL_METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(ALL_METHODS)}")
    if resume_from is not None and cfg.method == "cascade":
        raise ConfigError("--resume-from: a cascade has one checkpoint per member; use --resume (each member "
                          "continues from its own last.ckpt)")
    if not cfg.teacher:
        raise ConfigError("teacher: give the teacher's model/ or run directory (--teacher DIR)")
    teacher = load_model(cfg.teacher)
    run_dir = cfg.run_dir
    datamodule = start_run(cfg, teacher.preprocess)
    if datamodule.vocab.to_list() != teacher.classes:
        raise ConfigError(
            f"data.dir: the dataset's classes {datamodule.vocab.to_list()} differ from the teacher's {teacher.classes}"
        )
    provenance = {"teacher": str(resolve_model_dir(cfg.teacher)), "method": cfg.method,
                  "loss": cfg.to_dict()["loss"], "data": str(cfg.data.dir)}
    if cfg.method == "cascade":
        return _cascade(cfg, teacher, datamodule, provenance, resume)
    student, extra = _initial_student(cfg, teacher.model)
    ckpt_path = resume_checkpoint(run_dir, resume=resume, resume_from=resume_from)
    result = _train_one(cfg, student, teacher.model, cfg.method, datamodule, run_dir, teacher,
                        {**provenance, **extra}, ckpt_path)
    return [result]


def _initial_student(cfg: DistillConfig, teacher_vit):
    """The student the method starts from, initialised from the teacher (which stays untouched)."""
    if cfg.method == "distilvit":
        student, kept = extract_student(teacher_vit, cfg.keep, cfg.strategy)
        return student, {"kept_blocks": list(kept)}
    depth_model = DepthViT(copy.deepcopy(teacher_vit), exits="all", shared_head=cfg.method == "fcvit-probs")
    return depth_model, {"kept_blocks": list(range(len(teacher_vit.blocks)))}


def _train_one(cfg, student, teacher_vit, method, datamodule, run_dir: Path, teacher, provenance, ckpt_path):
    module = DistillerModule(student, teacher_vit, method, teacher.classes, cfg.optim, cfg.loss,
                             class_weights=loss_class_weights(cfg, datamodule))
    trainer = build_trainer(cfg.trainer, run_dir, resume_from=ckpt_path)
    with warnings.catch_warnings():
        # Lightning warns about modules in eval mode at the start of training: the frozen teacher's, on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        fit(trainer, module, datamodule, ckpt_path)
    arch = {"name": teacher.config["architecture"]["name"]} if "architecture" in teacher.config else None
    return finish_run(trainer, module, run_dir, arch=arch, classes=teacher.classes, preprocess=teacher.preprocess,
                      extra={"role": "student", **provenance}, net_attr="student")


def _cascade(cfg: DistillConfig, teacher, datamodule, provenance, resume) -> list[TrainResult]:
    """Depth N-1 from the teacher, then each depth k from the trained depth k+1, down to min_depth.

    Members already written (their model/ exists) are loaded and skipped, so an interrupted cascade
    continues where it stopped.
    """
    depth = len(teacher.model.blocks)
    if not 1 <= cfg.min_depth < depth:
        raise ConfigError(f"min_depth: {cfg.min_depth} must be in 1..{depth - 1} for a {depth}-block teacher")
    results = []
    previous = teacher.model
    for k in range(depth - 1, cfg.min_depth - 1, -1):
        member_dir = cfg.run_dir / "cascade" / f"depth-{k:02d}"
        if (member_dir / "model" / "config.json").is_file():
            previous = load_model(member_dir).model
            continue
        student, kept = extract_student(previous, k, "first")
        extra = {**provenance, "kept_blocks": list(kept), "cascade_depth": k}
        ckpt_path = resume_checkpoint(member_dir, resume=resume)
        results.append(_train_one(cfg, student, previous, "distilvit", datamodule, member_dir, teacher, extra, ckpt_path))
        previous = student
    return results
