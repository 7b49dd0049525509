"""The schema of an artifact's config.json: checked on every save and every load, in one place.

A config.json is only a promise about the weights beside it, and it is often edited by hand. Every
field that decides a number the model reports is checked here before anything is built: the timm
architecture (for kinds vit and depth_vit a ViT of timm's `vision_transformer` or `deit` module, only
the constructor arguments listed in `VitKwargs`, each within a sane range; for kind timm any timm
model with the arguments of `TimmKwargs`), the class names (unique, one per output), the preprocessing
(finite mean, finite positive std, bounded sizes: `skindistil.config.PreprocessConfig`), the
calibration temperature (finite, positive), the exits of a per-depth model and the stored operating
points (`skindistil.models.operating_points`). The parameter count
is then computed on PyTorch's meta device (no memory) and bounded by `MAX_PARAMETERS` before the
network is allocated (`skindistil.models.artifact.build_model`).

`validate_config(data, where)` is the entry point; it raises ModelError naming the file and the
field, e.g. "model/config.json: architecture.kwargs.num_heads: 0 is not >= 1".
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationError,
    field_validator,
    model_validator,
)

from skindistil.config import MAX_IMAGE_SIZE, PreprocessConfig
from skindistil.errors import ConfigError, ModelError
from skindistil.models.operating_points import parse_operating_points

# format 2: config.json in timm's hub format (architecture = timm name, model_args, pretrained_cfg, ...)
# with skindistil's fields beside them; format 1 (architecture = {name, kwargs}) still loads.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# timm's fields of a format 2 config.json (`skindistil.models.artifact.hub_config`)
HUB_FIELDS = ("num_classes", "num_features", "label_names", "model_args", "pretrained_cfg", "global_pool")
# vit: a timm VisionTransformer (DeiT's distilled ViT included); depth_vit: a MultiExitViT (per-depth
# heads); timm: any other timm classifier (ResNet, ConvNeXt, EfficientNet, RegNet, ...)
KINDS = ("vit", "depth_vit", "timm")
# timm modules whose ViTs `vit_architecture` describes and `load_model` rebuilds (deit: the distilled ViT).
TIMM_MODULES = ("vision_transformer", "deit")
# Bounds that stop a config.json from allocating until memory runs out. They sit well above every
# ViT in use (ViT-B/16: 12 blocks of width 768, 86 M parameters; ViT-G/14: 48 blocks, 1.8 G).
MAX_DEPTH = 64
MAX_EMBED_DIM = 8192
MAX_MLP_RATIO = 16.0
MAX_REG_TOKENS = 64
# Patches per image: attention costs grow with its square (a 64 x 64 grid = 1024 px at patch 16).
MAX_PATCHES = 4096
MAX_PARAMETERS = 2_000_000_000

Strict = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]


def _check_size(value: int | list[int]) -> int | list[int]:
    sides = [value] if isinstance(value, int) else value
    if len(sides) not in (1, 2) or not all(1 <= s <= MAX_IMAGE_SIZE for s in sides):
        raise ValueError(f"expected a side or [height, width] of 1..{MAX_IMAGE_SIZE} pixels")
    return value


# timm takes one side or [height, width]
Size = Annotated[int | list[int], AfterValidator(_check_size)]


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


class VitKwargs(BaseModel):
    """The `timm.create_model` arguments an artifact may carry (those `vit_architecture` writes, plus
    the training-time regularisers, which do nothing in eval mode). Any other key is refused: it
    would reach timm's constructor unchecked (e.g. `checkpoint_path`, which timm obeys)."""

    model_config = Strict

    img_size: Size
    patch_size: Size
    in_chans: Literal[3] = 3
    num_classes: Annotated[int, Field(ge=1)]
    global_pool: Literal["token", "avg", "avgmax", "max", "map", ""] = "token"
    embed_dim: Annotated[int, Field(ge=1, le=MAX_EMBED_DIM)]
    depth: Annotated[int, Field(ge=1, le=MAX_DEPTH)]
    num_heads: Annotated[int, Field(ge=1)]
    mlp_ratio: Annotated[float, Field(gt=0.0, le=MAX_MLP_RATIO)] = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    class_token: bool = True
    reg_tokens: Annotated[int, Field(ge=0, le=MAX_REG_TOKENS)] = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None
    init_values: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    drop_rate: Rate = 0.0
    pos_drop_rate: Rate = 0.0
    patch_drop_rate: Rate = 0.0
    proj_drop_rate: Rate = 0.0
    attn_drop_rate: Rate = 0.0
    drop_path_rate: Rate = 0.0

    @model_validator(mode="after")
    def _shapes(self) -> VitKwargs:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        (h, w), (ph, pw) = _pair(self.img_size), _pair(self.patch_size)
        if ph > h or pw > w:
            raise ValueError(f"patch_size {self.patch_size} is larger than img_size {self.img_size}")
        patches = (h // ph) * (w // pw)
        if patches > MAX_PATCHES:
            raise ValueError(f"img_size {self.img_size} / patch_size {self.patch_size} gives {patches:,} patches, over {MAX_PATCHES:,}")
        return self


class Architecture(BaseModel):
    model_config = Strict

    name: str
    kwargs: VitKwargs

    @field_validator("name")
    @classmethod
    def _timm_vit(cls, name: str) -> str:
        from timm.models import is_model_in_modules

        if not is_model_in_modules(name, list(TIMM_MODULES)):
            raise ValueError(f"{name!r} is not a timm model of module(s) {', '.join(TIMM_MODULES)}")
        return name


# `timm.create_model` arguments that load files, fetch weights or change what the model returns: a
# config.json must not carry them (timm obeys `checkpoint_path` and `pretrained` on construction).
TIMM_FORBIDDEN_KWARGS = frozenset({
    "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
    "cache_dir", "features_only", "out_indices", "feature_cls", "feature_cfg", "scriptable", "exportable",
    "no_jit", "device", "dtype",
})


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


class TimmKwargs(BaseModel):
    """The `timm.create_model` arguments of a non-ViT artifact (kind "timm"). Convnets take
    architecture-specific options (a ResNet's `layers`, `channels`, `stem_width`, ...), so other keys
    are allowed, as plain numbers, strings, booleans or lists of them; the keys of
    `TIMM_FORBIDDEN_KWARGS` (file paths, pretrained downloads, feature-extraction modes) are refused.
    The network's size is bounded afterwards by the parameter count on the meta device."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    num_classes: Annotated[int, Field(ge=1)]
    in_chans: Literal[3] = 3
    img_size: Size | None = None
    drop_rate: Rate = 0.0
    drop_path_rate: Rate = 0.0

    @model_validator(mode="after")
    def _safe_extras(self) -> TimmKwargs:
        for key, value in (self.model_extra or {}).items():
            if key in TIMM_FORBIDDEN_KWARGS:
                raise ValueError(f"{key}: not allowed in an artifact (it loads files or weights, or changes the outputs)")
            if not _plain(value):
                raise ValueError(f"{key}: expected a number, string, boolean or a list of them, got {_short(value)}")
        return self


class TimmArchitecture(BaseModel):
    model_config = Strict

    name: str
    kwargs: TimmKwargs

    @field_validator("name")
    @classmethod
    def _timm_model(cls, name: str) -> str:
        from timm import is_model

        if not is_model(name):
            raise ValueError(f"{name!r} is not a timm model name")
        return name


class Calibration(BaseModel):
    model_config = Strict

    temperature: Annotated[float, Field(gt=0.0)]
    fitted_on: str


class ArtifactConfig(BaseModel):
    """config.json, checked. `preprocess` is built (and checked) as a PreprocessConfig."""

    model_config = Strict

    format: Literal[1, 2]
    skindistil_version: str
    kind: Literal["vit", "depth_vit"]
    architecture: Architecture
    classes: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    preprocess: InstanceOf[PreprocessConfig]
    num_parameters: Annotated[int, Field(ge=1, le=MAX_PARAMETERS)]
    provenance: dict[str, Any] = Field(default_factory=dict)
    exits: Literal["all"] | list[int] | None = None
    shared_head: bool | None = None
    calibration: Calibration | None = None
    # checked whole, against the classes and the temperature, by `operating_points.parse_operating_points`
    operating_points: dict[str, Any] | None = None

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess(cls, value: Any) -> PreprocessConfig:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {type(value).__name__}")
        try:
            return PreprocessConfig.from_dict(value)
        except (ConfigError, TypeError) as exc:
            raise ValueError(str(exc)) from None

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str]) -> list[str]:
        seen: set[str] = set()
        duplicates = [c for c in classes if c in seen or seen.add(c)]
        if duplicates:
            raise ValueError(f"duplicate class name(s) {', '.join(sorted(set(duplicates)))}")
        return classes

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactConfig:
        kwargs = self.architecture.kwargs
        if kwargs.num_classes != len(self.classes):
            raise ValueError(
                f"architecture.kwargs.num_classes is {kwargs.num_classes} but {len(self.classes)} class names are listed"
            )
        if kwargs.img_size is not None and _pair(kwargs.img_size) != (self.preprocess.image_size,) * 2:
            raise ValueError(
                f"architecture.kwargs.img_size {kwargs.img_size} differs from preprocess.image_size "
                f"{self.preprocess.image_size} (the model's input)"
            )
        if self.kind != "depth_vit" and (self.exits is not None or self.shared_head is not None):
            raise ValueError("exits and shared_head belong to kind 'depth_vit' only")
        return self


class TimmArtifactConfig(ArtifactConfig):
    """config.json of a non-ViT timm classifier (kind "timm"): its architecture is any timm model; the
    consistency checks are `ArtifactConfig`'s (a convnet's img_size, when it takes one, is optional)."""

    kind: Literal["timm"]
    architecture: TimmArchitecture


def validate_config(data: dict, where: str) -> ArtifactConfig:
    """The checked config.json `data`, or ModelError naming `where` and every field at fault."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a JSON object")
    if data.get("format") not in READABLE_FORMATS:
        raise ModelError(f"{where}: unsupported artifact format {data.get('format')!r} "
                         f"(this skindistil reads {', '.join(map(str, READABLE_FORMATS))})")
    schema = TimmArtifactConfig if data.get("kind") == "timm" else ArtifactConfig
    try:
        checked = schema.model_validate(_format1_view(data, where))
    except ValidationError as exc:
        raise ModelError(f"{where}: invalid model config: {describe_errors(exc)}") from None
    check_hub_fields(data, where)
    parse_operating_points(data, where)
    return checked


def _format1_view(data: dict, where: str) -> dict:
    """A format 2 config as the schema reads it: architecture {name: architecture, kwargs: model_args},
    without timm's other fields (which `check_hub_fields` compares with skindistil's)."""
    if data.get("format") == 1:
        return data
    arch, args = data.get("architecture"), data.get("model_args", {})
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{where}: architecture: expected a timm model name (format 2), got {_short(arch)}")
    if not isinstance(args, dict):
        raise ModelError(f"{where}: model_args: expected an object, got {type(args).__name__}")
    view = {k: v for k, v in data.items() if k not in HUB_FIELDS}
    view["architecture"] = {"name": arch, "kwargs": args}
    return view


def check_hub_fields(config: dict, where: str) -> None:
    """Refuse a format 2 config whose timm fields disagree with skindistil's (a hand edit of one
    side): label_names vs classes, num_classes, and pretrained_cfg's input size, mean, std and
    interpolation vs preprocess. ModelError naming the field."""
    if config.get("format") != 2:
        return
    classes = list(config.get("classes", []))
    pre = config.get("preprocess", {})
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: missing field 'pretrained_cfg'")
    size = pre.get("image_size")
    checks = {
        "label_names": (config.get("label_names"), classes),
        "num_classes": (config.get("num_classes"), len(classes)),
        "pretrained_cfg.input_size": (list(cfg.get("input_size", []))[1:], [size, size]),
        "pretrained_cfg.mean": (list(cfg.get("mean", [])), list(pre.get("mean", []))),
        "pretrained_cfg.std": (list(cfg.get("std", [])), list(pre.get("std", []))),
        "pretrained_cfg.interpolation": (cfg.get("interpolation"), pre.get("interpolation")),
    }
    for field_name, (found, expected) in checks.items():
        if found != expected:
            raise ModelError(f"{where}: {field_name} is {found!r} but the skindistil fields (classes, preprocess) "
                             f"say {expected!r}; the two must agree")


def describe_errors(exc: ValidationError) -> str:
    """'field.path: what is wrong (got VALUE)' for each error, joined by '; '."""
    parts = []
    for error in exc.errors(include_url=False):
        # a union reports each branch; the path without the branch's type tag names the field
        loc = ".".join(str(x) for x in error["loc"] if not _is_union_tag(x))
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if not loc or message.startswith(f"{loc}."):  # the message names the field itself
            parts.append(message)
            continue
        shown = "" if isinstance(value, (dict, BaseModel)) or error["type"] == "missing" else f" (got {_short(value)})"
        parts.append(f"{loc}: {message}{shown}")
    return "; ".join(dict.fromkeys(parts))


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part.startswith(("list[", "literal[", "function-", "constrained-")) or part in ("int", "str", "bool", "float"))


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
