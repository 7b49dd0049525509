"""Distillation runs: SkinDistilViT, FCViT, FCViTProbs, `full`, and the cascade family.

The teacher is any timm classifier artifact (a ViT, or a convnet such as ResNet or ConvNeXt). The
student is a ViT that starts from (`student_start`):

- the teacher's own blocks when the teacher is a ViT and `student_init` is not set (the paper);
- `student_init`: a ViT artifact (model/ or run directory) or a timm ViT name (random weights;
  NAME.TAG loads timm's pretrained weights of that tag) built with `student_kwargs`. A teacher that
  is not a ViT has no blocks to copy and needs one.

distilvit keeps `keep` of the start's blocks (`strategy`), the per-depth methods keep them all. With
`loss.distillation_token` the ViT gets a DeiT distillation token and head (`add_distillation_token`).
The student's preprocessing is the artifact's (student_init) or the teacher's, with the fields of
`student_preprocess` on top; the teacher sees each augmented batch through its own preprocessing.

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

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from skindistil.config import DistillConfig, PreprocessConfig
from skindistil.distill.losses import DISTILLATION_TOKEN_MODES
from skindistil.distill.methods import REGISTRY, cascade_plan, initial_student, token_methods
from skindistil.errors import ConfigError
from skindistil.models import create_teacher, load_model
from skindistil.models.artifact import LoadedModel, resolve_model_dir
from skindistil.models.distilled import DISTILLED_ARCH, is_distilled
from skindistil.models.student import is_vit
from skindistil.models.teacher import accepts_img_size
from skindistil.training.distiller import DistillerModule
from skindistil.training.teacher import TrainResult, finish_run, loss_class_weights, start_run
from skindistil.training.teacher_store import TeacherStore, needed_hidden, store_identity
from skindistil.training.trainer import build_trainer, fit, resume_checkpoint

ALL_METHODS = (*REGISTRY, "cascade")


@dataclass
class StudentStart:
    """The ViT a student starts from (all its blocks), how the artifact names it, and its preprocessing."""

    model: nn.Module
    name: str  # timm architecture name recorded in the student's artifact
    preprocess: PreprocessConfig
    source: str  # "teacher", an artifact directory or a timm name (provenance)


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


def student_start(cfg: DistillConfig, teacher: LoadedModel) -> StudentStart:
    """The ViT the student starts from (see the module docstring); ConfigError naming the field when
    there is none, it is not a ViT, its classes are not the teacher's, or its input size is not the
    one its preprocessing gives."""
    init = cfg.student_init
    if init is None:
        if not is_vit(teacher.model):
            raise ConfigError(
                f"teacher: {teacher.path} is a timm {teacher.architecture['name']} "
                f"({type(teacher.model).__name__}), not a ViT, so the student cannot copy its blocks: give the "
                "ViT the student starts from with --student-init (a ViT model/ or run directory, or a timm ViT "
                "name such as vit_tiny_patch16_224)"
            )
        if cfg.student_kwargs:
            raise ConfigError("student_kwargs: apply to a timm name given as student_init; none is given")
        start = StudentStart(teacher.model, teacher.architecture["name"], teacher.preprocess, "teacher")
    elif Path(init).exists():
        if cfg.student_kwargs:
            raise ConfigError(f"student_kwargs: apply to a timm name given as student_init, not to the artifact {init}")
        loaded = load_model(init)
        if not is_vit(loaded.model):
            raise ConfigError(f"student_init: {loaded.path} holds a {loaded.config['kind']} model "
                              f"({type(loaded.model).__name__}); the student must start from a plain timm ViT")
        if loaded.classes != teacher.classes:
            raise ConfigError(f"student_init: {loaded.path} predicts {loaded.classes}, the teacher {teacher.classes}")
        start = StudentStart(loaded.model, loaded.architecture["name"], loaded.preprocess,
                             str(loaded.path))
    else:
        start = _student_from_timm(cfg, init, teacher)
    preprocess = _student_preprocess(cfg, start.preprocess)
    start = dataclasses.replace(start, preprocess=preprocess)
    _check_input_size(start)
    return start


def _student_from_timm(cfg: DistillConfig, init: str, teacher: LoadedModel) -> StudentStart:
    import timm

    arch = init.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ConfigError(f"student_init: {init!r} is neither an existing model directory nor a timm model name")
    preprocess = _student_preprocess(cfg, teacher.preprocess)
    kwargs = dict(cfg.student_kwargs)
    if "img_size" not in kwargs and accepts_img_size(arch):
        kwargs["img_size"] = preprocess.image_size
    model = create_teacher(arch, num_classes=len(teacher.classes), pretrained=init if "." in init else None,
                           **kwargs)
    if not is_vit(model):
        raise ConfigError(f"student_init: {init} is a timm {type(model).__name__}, not a ViT (VisionTransformer)")
    return StudentStart(model, arch, preprocess, init)


def _student_preprocess(cfg: DistillConfig, base: PreprocessConfig) -> PreprocessConfig:
    if not cfg.student_preprocess:
        return base
    try:
        return PreprocessConfig.from_dict({**base.to_dict(), **cfg.student_preprocess})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"student_preprocess: {exc}") from None


def _check_input_size(start: StudentStart) -> None:
    patch_embed = start.model.patch_embed
    size = tuple(patch_embed.img_size) if patch_embed.img_size is not None else None
    wanted = (start.preprocess.image_size,) * 2
    if size is not None and size != wanted and not getattr(patch_embed, "dynamic_img_size", False):
        raise ConfigError(
            f"student_preprocess: the student ViT ({start.source}) takes {size[0]}x{size[1]} inputs but its "
            f"preprocessing gives {wanted[0]}x{wanted[1]} (image_size {start.preprocess.image_size})"
        )


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
    student, kept = initial_student(cfg.method, start.model, keep=cfg.keep, strategy=cfg.strategy,
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
        student, kept = initial_student("distilvit", previous, keep=member.kept_blocks,
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
