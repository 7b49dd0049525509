"""Distillation runs: SkinDistilViT, FCViT, FCViTProbs, `full`, and the cascade family.

The teacher is any timm classifier artifact (a ViT, or a convnet such as ResNet or ConvNeXt). The
student is a ViT that starts from the teacher's own blocks or from `student_init`, with its own
preprocessing (`distill.start.student_start`); the teacher sees each augmented batch through its own
preprocessing.

distilvit keeps `keep_blocks` of the start's blocks (chosen by `block_selection`), the per-depth
methods keep them all. With `loss.distillation_token` the ViT gets a DeiT distillation token and head
(`add_distillation_token`).

The hidden-state cosine (loss.a_cos) compares hidden states token by token: it needs a ViT teacher
of the student's width and, for cos_tokens=all, the same tokens (patch grid, class and register
tokens; a distillation token is left out of the comparison). Anything else is refused rather than
bridged by a learned projection: such a projection is a training-only module the artifact would not
carry, it changes what the term measures (SPEC: cosine of the hidden states themselves), and the term
measured no effect in the loss ablation (see `LossConfig`).

With `cfg.teacher_store` (`skindistil store-teacher`) the teacher's outputs come from the store instead
of a teacher forward pass; the store must match the run (seed, teacher, preprocessing, augmentation,
training split, epochs) or it is refused by name. In a cascade only the first member (depth N-1)
distills from the teacher and reads the store; every later member distills from the previous member,
online.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from skindistil.config import DistillConfig
from skindistil.distill.losses import DISTILLATION_TOKEN_MODES
from skindistil.distill.methods import REGISTRY, cascade_plan, initial_student, token_methods
from skindistil.distill.start import StudentStart, student_start
from skindistil.errors import ConfigError
from skindistil.models import load_model
from skindistil.models.artifact import LoadedModel, resolve_model_dir
from skindistil.models.distilled import DISTILLED_ARCH, is_distilled
from skindistil.models.student import is_vit
from skindistil.training.distiller import DistillerModule
from skindistil.training.teacher import TrainResult, finish_run, loss_class_weights, start_run
from skindistil.training.teacher_store import TeacherStore, needed_hidden, store_identity
from skindistil.training.trainer import build_trainer, fit, resume_checkpoint

ALL_METHODS = (*REGISTRY, "cascade")


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
    check_token_method(cfg)
    if cfg.teacher_store and cfg.method in ("fcvit", "fcvit-probs"):
        raise ConfigError(f"teacher_store: method {cfg.method} has no teacher term, so stored teacher outputs "
                          "would go unused; drop --teacher-store")
    teacher = load_model(cfg.teacher)
    if cfg.method == "cascade":
        check_cascade(cfg, teacher)
    start = student_start(cfg, teacher)
    check_hidden_pairing(cfg, start.model, teacher.model)
    datamodule = start_run(cfg, start.preprocess)
    if datamodule.vocab.to_list() != teacher.classes:
        raise ConfigError(
            f"data.dir: the dataset's classes {datamodule.vocab.to_list()} differ from the teacher's {teacher.classes}"
        )
    store = open_teacher_store(cfg, teacher, start, datamodule) if cfg.teacher_store else None
    provenance = {"teacher": str(resolve_model_dir(cfg.teacher)), "method": cfg.method,
                  "loss": cfg.to_dict()["loss"], "data": str(cfg.data.dir), "student_init": start.source}
    if cfg.method == "cascade":
        return _cascade(cfg, teacher, start, datamodule, provenance, resume, store)
    student, name, extra = _initial_student(cfg, start)
    if store is not None:
        extra["teacher_store"] = str(store.path)
    ckpt_path = resume_checkpoint(cfg.run_dir, resume=resume, resume_from=resume_from)
    result = _train_one(cfg, student, name, teacher.model, cfg.method, datamodule, cfg.run_dir, teacher,
                        start.preprocess, {**provenance, **extra}, ckpt_path, store)
    return [result]


def open_teacher_store(cfg: DistillConfig, teacher, start: StudentStart, datamodule) -> TeacherStore:
    """The store `cfg.teacher_store`, checked against this run (ConfigError naming what differs), with
    the data module switched to training batches that carry sample keys."""
    if cfg.data.augment_on != "cpu":
        raise ConfigError(f"teacher_store: data.augment_on={cfg.data.augment_on!r} is not replayable; stored teacher "
                          "outputs need data.augment_on=cpu (augmentation seeded per (seed, epoch, sample))")
    hidden = needed_hidden(cfg.method, cfg.loss.a_cos, cfg.loss.cos_tokens)
    store = TeacherStore.open(cfg.teacher_store, store_identity(cfg, teacher, datamodule, start.preprocess),
                              epochs=cfg.trainer.max_epochs, hidden=hidden)
    datamodule.train_keys = True
    return store


def check_token_method(cfg: DistillConfig) -> None:
    """ConfigError for an unknown loss.distillation_token, or one asked of a method without a teacher term."""
    mode = cfg.loss.distillation_token
    if mode not in DISTILLATION_TOKEN_MODES:
        raise ConfigError(f"loss.distillation_token: {mode!r} is not one of {', '.join(DISTILLATION_TOKEN_MODES)}")
    with_token = (*token_methods(), "cascade")
    if mode != "none" and cfg.method not in with_token:
        raise ConfigError(f"loss.distillation_token={mode}: method {cfg.method} trains without the teacher, so "
                          f"nothing would train the token; use it with {', '.join(with_token)}")


def check_cascade(cfg: DistillConfig, teacher: LoadedModel) -> None:
    """A cascade distills each member from the one a block deeper, starting with the teacher's own blocks:
    ConfigError for a teacher that is not a ViT and for a student_init or student_preprocess."""
    if not is_vit(teacher.model):
        raise ConfigError(f"method cascade: each member is the teacher cut one block shorter, and the teacher "
                          f"{teacher.path} ({type(teacher.model).__name__}) is not a ViT; use distilvit, or full, "
                          "with --student-init")
    for field in ("student_init", "student_kwargs", "student_preprocess"):
        if getattr(cfg, field):
            raise ConfigError(f"{field}: a cascade starts from the teacher's own blocks and preprocessing; leave it unset")


def check_hidden_pairing(cfg: DistillConfig, student_vit: nn.Module, teacher: nn.Module) -> None:
    """ConfigError when loss.a_cos > 0 but the student's and teacher's last hidden states do not pair
    token for token (see the module docstring)."""
    if not cfg.loss.a_cos:
        return
    if not is_vit(teacher):
        raise ConfigError(
            f"loss.a_cos={cfg.loss.a_cos:g}: the hidden-state cosine compares the student's and the teacher's "
            f"last hidden states token by token, and the teacher ({type(teacher).__name__}) is not a ViT; "
            "set --a-cos 0 (the logit terms and the distillation token work with any teacher)"
        )
    if student_vit.embed_dim != teacher.embed_dim:
        raise ConfigError(f"loss.a_cos={cfg.loss.a_cos:g}: the student's hidden states are {student_vit.embed_dim} "
                          f"wide, the teacher's {teacher.embed_dim}; set --a-cos 0")
    if cfg.loss.cos_tokens == "all":
        student_tokens, teacher_tokens = _compared_tokens(student_vit), _compared_tokens(teacher)
        if student_tokens != teacher_tokens:
            raise ConfigError(
                f"loss.a_cos={cfg.loss.a_cos:g} with cos_tokens=all: the student has {student_tokens[1]} patch "
                f"and {student_tokens[0]} prefix tokens, the teacher {teacher_tokens[1]} and {teacher_tokens[0]}; "
                "compare the class token only (loss.cos_tokens=cls) or set --a-cos 0"
            )


def _compared_tokens(vit: nn.Module) -> tuple[int, int]:
    """(prefix tokens other than a distillation token, patch tokens) of a timm ViT."""
    return vit.num_prefix_tokens - int(is_distilled(vit)), vit.patch_embed.num_patches


def _arch_name(student: nn.Module, start: nn.Module, name: str) -> str:
    """The timm architecture name of a student built from `start` (named `name`): timm's distilled ViT
    when the method added a distillation token, else the start's."""
    return DISTILLED_ARCH if is_distilled(student) and not is_distilled(start) else name


def _initial_student(cfg: DistillConfig, start: StudentStart):
    """The student the method starts from (`start.model` stays untouched), its arch name, provenance."""
    student, kept = initial_student(cfg.method, start.model, keep_blocks=cfg.keep_blocks,
                                    block_selection=cfg.block_selection,
                                    token=cfg.loss.distillation_token != "none")
    return student, _arch_name(student, start.model, start.name), {"kept_blocks": kept}


def _train_one(cfg, student, name, teacher_model, method, datamodule, run_dir: Path, teacher, preprocess,
               provenance, ckpt_path, store=None):
    # with a store the teacher never runs: it stays off the module (and off the accelerator)
    module = DistillerModule(student, None if store is not None else teacher_model, method, teacher.classes,
                             cfg.optim, cfg.loss, class_weights=loss_class_weights(cfg, datamodule),
                             teacher_preprocess=teacher.preprocess, student_preprocess=preprocess,
                             teacher_store=store)
    trainer = build_trainer(cfg.trainer, run_dir, resume_from=ckpt_path)
    with warnings.catch_warnings():
        # Lightning warns about modules in eval mode at the start of training: the frozen teacher's, on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        fit(trainer, module, datamodule, ckpt_path)
    return finish_run(trainer, module, run_dir, arch={"name": name}, classes=teacher.classes, preprocess=preprocess,
                      extra={"role": "student", **provenance}, net_attr="student")


def _cascade(cfg: DistillConfig, teacher, start: StudentStart, datamodule, provenance, resume,
             store=None) -> list[TrainResult]:
    """Depth N-1 from the teacher, then each depth k from the trained depth k+1, down to min_depth.

    Members already written (their model/ exists) are loaded and skipped, so an interrupted cascade
    continues where it stopped. A teacher store serves the first member only (the others' teacher is
    the previous member).
    """
    results = []
    previous, name = teacher.model, start.name
    for member in cascade_plan(len(teacher.model.blocks), cfg.min_depth):
        member_dir = cfg.run_dir / "cascade" / f"depth-{member.depth:02d}"
        if (member_dir / "model" / "config.json").is_file():
            loaded = load_model(member_dir)
            previous, name = loaded.model, loaded.architecture["name"]
            continue
        student, kept = initial_student("distilvit", previous, keep_blocks=member.kept_blocks,
                                        token=cfg.loss.distillation_token != "none")
        name = _arch_name(student, previous, name)
        extra = {**provenance, "kept_blocks": kept, "cascade_depth": member.depth}
        member_store = store if member.from_teacher else None
        if member_store is not None:
            extra["teacher_store"] = str(store.path)
        datamodule.train_keys = member_store is not None
        ckpt_path = resume_checkpoint(member_dir, resume=resume)
        results.append(_train_one(cfg, student, name, previous, "distilvit", datamodule, member_dir, teacher,
                                  start.preprocess, extra, ckpt_path, member_store))
        previous = student
    return results
