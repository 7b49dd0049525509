"""Distillation runs: SkinDistilViT, FCViT, FCViTProbs, `full`, and the cascade family.

With `cfg.teacher_store` (`skindistil store-teacher`) the teacher's outputs come from the store instead
of a teacher forward pass; the store must match the run (seed, teacher, preprocessing, augmentation,
training split, epochs) or it is refused by name. In a cascade only the first member (depth N-1)
distils from the teacher and reads the store; every later member distils from the previous member,
online.
"""

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
from skindistil.training.teacher_store import TeacherStore, needed_hidden, store_identity
from skindistil.training.trainer import build_trainer, fit

ALL_METHODS = (*METHODS, "cascade")


def distill(cfg: DistillConfig, *, resume: bool = False) -> list[TrainResult]:
    """Run `cfg.method` from the teacher artifact `cfg.teacher`; returns one result per trained model."""
    if cfg.method not in ALL_METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(ALL_METHODS)}")
    if not cfg.teacher:
        raise ConfigError("teacher: give the teacher's model/ or run directory (--teacher DIR)")
    if cfg.teacher_store and cfg.method in ("fcvit", "fcvit-probs"):
        raise ConfigError(f"teacher_store: method {cfg.method} has no teacher term, so stored teacher outputs "
                          "would go unused; drop --teacher-store")
    teacher = load_model(cfg.teacher)
    run_dir = cfg.run_dir
    datamodule = start_run(cfg, teacher.preprocess)
    if datamodule.vocab.to_list() != teacher.classes:
        raise ConfigError(
            f"data.dir: the dataset's classes {datamodule.vocab.to_list()} differ from the teacher's {teacher.classes}"
        )
    store = open_teacher_store(cfg, teacher, datamodule) if cfg.teacher_store else None
    provenance = {"teacher": str(resolve_model_dir(cfg.teacher)), "method": cfg.method,
                  "loss": cfg.to_dict()["loss"], "data": str(cfg.data.dir)}
    if cfg.method == "cascade":
        return _cascade(cfg, teacher, datamodule, provenance, resume, store)
    student, extra = _initial_student(cfg, teacher.model)
    if store is not None:
        extra["teacher_store"] = str(store.path)
    result = _train_one(cfg, student, teacher.model, cfg.method, datamodule, run_dir, teacher,
                        {**provenance, **extra}, resume, store)
    return [result]


def open_teacher_store(cfg: DistillConfig, teacher, datamodule) -> TeacherStore:
    """The store `cfg.teacher_store`, checked against this run (ConfigError naming what differs), with
    the data module switched to training batches that carry sample keys."""
    if cfg.data.augment_on != "cpu":
        raise ConfigError(f"teacher_store: data.augment_on={cfg.data.augment_on!r} is not replayable; stored teacher "
                          "outputs need data.augment_on=cpu (augmentation seeded per (seed, epoch, sample))")
    hidden = needed_hidden(cfg.method, cfg.loss.a_cos, cfg.loss.cos_tokens)
    store = TeacherStore.open(cfg.teacher_store, store_identity(cfg, teacher, datamodule),
                              epochs=cfg.trainer.max_epochs, hidden=hidden)
    datamodule.train_keys = True
    return store


def _initial_student(cfg: DistillConfig, teacher_vit):
    """The student the method starts from, initialised from the teacher (which stays untouched)."""
    if cfg.method == "distilvit":
        student, kept = extract_student(teacher_vit, cfg.keep, cfg.strategy)
        return student, {"kept_blocks": list(kept)}
    depth_model = DepthViT(copy.deepcopy(teacher_vit), exits="all", shared_head=cfg.method == "fcvit-probs")
    return depth_model, {"kept_blocks": list(range(len(teacher_vit.blocks)))}


def _train_one(cfg, student, teacher_vit, method, datamodule, run_dir: Path, teacher, provenance, resume,
               store=None):
    # with a store the teacher never runs: it stays off the module (and off the accelerator)
    module = DistillerModule(student, None if store is not None else teacher_vit, method, teacher.classes,
                             cfg.optim, cfg.loss, class_weights=loss_class_weights(cfg, datamodule),
                             teacher_store=store)
    trainer = build_trainer(cfg.trainer, run_dir)
    with warnings.catch_warnings():
        # Lightning warns about modules in eval mode at the start of training: the frozen teacher's, on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        fit(trainer, module, datamodule, run_dir, resume=resume)
    arch = {"name": teacher.architecture["name"]}
    return finish_run(trainer, module, run_dir, arch=arch, classes=teacher.classes, preprocess=teacher.preprocess,
                      extra={"role": "student", **provenance}, net_attr="student")


def _cascade(cfg: DistillConfig, teacher, datamodule, provenance, resume, store=None) -> list[TrainResult]:
    """Depth N-1 from the teacher, then each depth k from the trained depth k+1, down to min_depth.

    Members already written (their model/ exists) are loaded and skipped, so an interrupted cascade
    continues where it stopped. A teacher store serves the first member only (the others' teacher is
    the previous member).
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
        member_store = store if previous is teacher.model else None
        if member_store is not None:
            extra["teacher_store"] = str(store.path)
        datamodule.train_keys = member_store is not None
        results.append(_train_one(cfg, student, previous, "distilvit", datamodule, member_dir, teacher, extra, resume,
                                  member_store))
        previous = student
    return results
