"""The ViT a student starts from (`student_start`), before a method cuts it or adds exits.

The teacher is any timm classifier artifact (a ViT, or a convnet such as ResNet or ConvNeXt). The
student starts from:

- the teacher's own blocks when the teacher is a ViT and `student_init` is not set (the paper);
- `student_init`: a ViT artifact (model/ or run directory) or a timm ViT name (random weights;
  NAME.TAG loads timm's pretrained weights of that tag) built with `student_kwargs`. A teacher that
  is not a ViT has no blocks to copy and needs one.

The student's preprocessing is the artifact's (student_init) or the teacher's, with the fields of
`student_preprocess` on top. What a method then keeps of the start is `methods.initial_student`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from skindistil.config import DistillConfig, PreprocessConfig
from skindistil.errors import ConfigError
from skindistil.models.artifact import LoadedModel, load_model
from skindistil.models.student import is_vit
from skindistil.models.teacher import accepts_img_size, create_teacher


@dataclass
class StudentStart:
    """The ViT a student starts from (all its blocks), how the artifact names it, and its preprocessing."""

    model: nn.Module
    name: str  # timm architecture name recorded in the student's artifact
    preprocess: PreprocessConfig
    source: str  # "teacher", an artifact directory or a timm name (provenance)


def student_start(cfg: DistillConfig, teacher: LoadedModel) -> StudentStart:
    """The ViT the student of `cfg` starts from (see the module docstring), `teacher` left untouched.

    Raises ConfigError naming the field when there is none, it is not a ViT, its classes are not the
    teacher's, `student_kwargs` / `student_preprocess` do not apply, or the ViT's input size is not
    the one its preprocessing gives; ModelError from loading a `student_init` artifact.
    """
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
