"""Configuration shared by every layer: the preprocessing a model needs, and YAML helpers."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from skindistil.errors import ConfigError

# The paper trains on a shorter side of 450 and random 400 px crops resized to 224: the crop keeps
# 400/450 of the shorter side. Evaluation uses the same scale with a centre crop.
PAPER_CROP_FRACTION = 400 / 450
# Bounds on the model input side and on the shorter side images are resized to before the crop: a
# model artifact naming more would make every prediction allocate gigabytes (a 100,000 px input is
# 120 GB of float32 per image).
MAX_IMAGE_SIZE = 1024
MAX_RESIZE_SIZE = 4096
# Modes every resize and warp path supports (torchvision's tensor resize and F.grid_sample).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Which of the teacher's blocks a number of blocks to keep selects (models.student.select_blocks).
BLOCK_SELECTIONS = ("first", "uniform")


class DeprecatedKeyWarning(FutureWarning):
    """A configuration key given by its old name and read under its current one (FutureWarning: shown
    to the user by default, unlike DeprecationWarning)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn a decoded RGB image into the model's input tensor."""

    image_size: int = 224
    crop_fraction: float = PAPER_CROP_FRACTION
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    border_crop: bool = True
    border_threshold: int = 20
    interpolation: str = "bilinear"

    def __post_init__(self):
        """ConfigError naming the field for values that would give NaN inputs or absurd allocations:
        std must be finite and positive, mean finite, sizes within MAX_IMAGE_SIZE / MAX_RESIZE_SIZE."""
        if not _is_int(self.image_size) or not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"preprocess.image_size: expected an integer 1..{MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if not _is_number(self.crop_fraction) or not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"preprocess.crop_fraction: expected a number in (0, 1], got {self.crop_fraction!r}")
        if self.resize_size > MAX_RESIZE_SIZE:
            raise ConfigError(
                f"preprocess.crop_fraction: image_size {self.image_size} / crop_fraction {self.crop_fraction} "
                f"resizes images to {self.resize_size} px, over the limit of {MAX_RESIZE_SIZE}"
            )
        for name, positive in (("mean", False), ("std", True)):
            value = getattr(self, name)
            ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(_is_number(v) for v in value)
            if not ok or (positive and not all(v > 0 for v in value)):
                wanted = "3 finite numbers > 0" if positive else "3 finite numbers"
                raise ConfigError(f"preprocess.{name}: expected {wanted} (one per RGB channel), got {value!r}")
        if not isinstance(self.border_crop, bool):
            raise ConfigError(f"preprocess.border_crop: expected true or false, got {self.border_crop!r}")
        if not _is_int(self.border_threshold) or not 0 <= self.border_threshold <= 255:
            raise ConfigError(f"preprocess.border_threshold: expected an integer 0..255, got {self.border_threshold!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess.interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    @property
    def resize_size(self) -> int:
        """Shorter side an image is resized to before the centre crop (eval) or random crop (train)."""
        return int(round(self.image_size / self.crop_fraction))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return from_dict(cls, data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def from_dict(cls, data: dict[str, Any]):
    """Build dataclass `cls` from a dict, rejecting unknown keys by name; nested dataclasses recurse.
    Deprecated key names are read under their current ones first (`upgrade_keys`)."""
    return _build(cls, upgrade_keys(cls, data))


def _build(cls, data: dict[str, Any] | None):
    if data is None:
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        ftype = known[name].type
        target = _resolve_dataclass(cls, ftype)
        if target is not None and isinstance(value, dict):
            value = _build(target, value)
        elif isinstance(value, list) and str(ftype).startswith("tuple"):
            value = tuple(value)
        elif isinstance(value, str) and str(ftype).split(" ")[0] == "float":
            # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{cls.__name__}.{name}: expected a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def upgrade_keys(cls, data: dict[str, Any] | None, origin: str | None = None, where: str = ""):
    """`data`, a mapping for dataclass `cls`, with every deprecated key (a class's `RENAMED_KEYS`, old
    name -> current name), in it and in its nested sections, renamed to the current one.

    Each rename warns (DeprecatedKeyWarning naming the old and the current key, and `origin`, the file
    the mapping came from, when given). A section that gives both names raises ConfigError naming both.
    Unknown keys are left for `from_dict` to refuse. Returns a new dict; `data` is not modified.
    """
    if not isinstance(data, dict):
        return data
    prefix = f"{origin}: " if origin else ""
    out = dict(data)
    for old, new in getattr(cls, "RENAMED_KEYS", {}).items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{prefix}{where}{old} and {where}{new} are both given: {old} is the old name of "
                              f"{new}; remove {where}{old}")
        warnings.warn(f"{prefix}{where}{old} is deprecated: read as {where}{new}={out[old]!r}; rename the key "
                      f"to {new}", DeprecatedKeyWarning, stacklevel=2)
        out[new] = out.pop(old)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in out.items():
        target = _resolve_dataclass(cls, fields[name].type) if name in fields else None
        if target is not None and isinstance(value, dict):
            out[name] = upgrade_keys(target, value, origin, f"{where}{name}.")
    return out


def upgrade_key(cls, key: str) -> str:
    """The dotted key `key` (e.g. distill.keep) of dataclass `cls` with deprecated names replaced by
    their current ones (distill.keep_blocks), warning (DeprecatedKeyWarning) for each; other keys as given."""
    parts, owner = key.split("."), cls
    for i, part in enumerate(parts):
        if owner is None:
            break
        new = getattr(owner, "RENAMED_KEYS", {}).get(part)
        if new is not None:
            where = ".".join(parts[:i] + [""])
            warnings.warn(f"override {where}{part}=...: {where}{part} is deprecated: read as {where}{new}; "
                          f"override {where}{new} instead", DeprecatedKeyWarning, stacklevel=3)
            parts[i] = part = new
        field = {f.name: f for f in dataclasses.fields(owner)}.get(part)
        owner = _resolve_dataclass(owner, field.type) if field is not None else None
    return ".".join(parts)


def _resolve_dataclass(owner, ftype):
    if isinstance(ftype, str):
        import sys

        module = sys.modules[owner.__module__]
        ftype = getattr(module, ftype, None)
    return ftype if dataclasses.is_dataclass(ftype) else None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def dump_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write `data` as YAML, atomically (WriteError naming the file when it cannot be written)."""
    from skindistil.files import write_text

    write_text(path, yaml.safe_dump(data, sort_keys=False))


def apply_overrides(data: dict[str, Any], overrides: list[str], config_cls=None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, returning a new dict.
    With `config_cls` (the dataclass the dict is for), deprecated key names are read as the current
    ones (`upgrade_key`), so an override by either name replaces the value. ConfigError naming both
    when one list overrides a key under its old and its current name (`distill.keep=2
    distill.keep_blocks=3`): which value is meant cannot be told, as for a recipe giving both."""
    import copy

    out = copy.deepcopy(data)
    given: dict[str, str] = {}  # current key -> the spelling this list first overrode it by
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        if config_cls is not None:
            spelled, key = key, upgrade_key(config_cls, key)
            first = given.setdefault(key, spelled)
            if first != spelled:
                raise ConfigError(f"overrides {first}=... and {spelled}=... both set {key}: one is the old name of "
                                  f"the other; give {key} once")
        value = yaml.safe_load(raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return out



class RunSection:
    """Shared by the configs of runs: the run directory, and dict (YAML) conversion both ways."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return from_dict(cls, data)


@dataclass
class DataConfig:
    dir: str | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int | None = None  # None: all cores (capped at 8)
    augment_on: str = "cpu"  # cpu: torchvision v2 per sample in workers; device: batched on the GPU
    imbalance: str = "none"  # none | weighted-loss | balanced-sampler
    fold: int | None = None


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    pretrained: str | None = None
    pretrained_ema: bool = False  # load the EMA weights of the `pretrained` checkpoint (timm train.py, Lightning)
    kwargs: dict = dataclasses.field(default_factory=dict)  # timm architecture kwargs (depth, embed_dim, ...)


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"  # linear | cosine | constant
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    layer_decay: float | None = None  # layer-wise lr decay factor, e.g. 0.75
    label_smoothing: float = 0.0


@dataclass
class TrainerConfig:
    max_epochs: int = 57
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    early_stopping_patience: int | None = None
    seed: int = 42
    log_every_n_steps: int = 10
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None
    progress: bool = True
    checkpoint_every_n_steps: int | None = None  # also save last.ckpt every N optimiser steps (mid-epoch)

    def __post_init__(self):
        """ConfigError for a block selection given as Lightning's strategy (`distill --strategy` chose
        the student's blocks before it meant Lightning's strategy, as on `train`)."""
        if self.strategy in BLOCK_SELECTIONS:
            raise ConfigError(
                f"trainer.strategy: {self.strategy!r} is not a Lightning strategy (auto, ddp, ...) but a choice of "
                f"the student's blocks: use --block-selection {self.strategy} (config key block_selection); "
                "distill --strategy sets Lightning's strategy, as on train"
            )


@dataclass
class TrainConfig(RunSection):
    """A teacher (or any single classifier) training run. YAML in, YAML out."""

    name: str = "teacher"
    out_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)


def _plain(value):
    """Tuples -> lists so the YAML stays readable and round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class LossConfig:
    """Distillation loss weights (SPEC.md; defaults are the authors' code).

    a_cos (hidden-state cosine) stays 0.0, the authors' code value, by the loss ablation
    (`skindistil ablate`) on real HAM10000 (lesion-grouped splits, 8-block from-scratch teacher at
    48 px on CPU, 4-block student): removing a_cos = 0.1 changed BMA by -0.0014 (val) and -0.0006
    (test), far inside the split's noise (dropping kd or mse cost 0.005-0.008 test BMA). Nothing
    measured for the extra term, so the default keeps parity with the code behind the paper's numbers.
    """

    a_task: float = 1.0
    a_kd: float = 0.5
    temperature: float = 2.0
    a_mse: float = 0.25
    a_cos: float = 0.0
    cos_tokens: str = "all"  # all | cls
    a_chain: float = 50.0  # fcvit-probs: weight of the chained per-depth KL
    chain_warmup_steps: int = 100  # fcvit-probs: steps with only the last depth
    chain_every_steps: int = 50  # fcvit-probs: one more depth enabled every this many steps
    # DeiT distillation token (distilvit, full, cascade): none | soft (KL at `temperature`, DeiT's
    # normalisation) | hard (CE on the teacher's top class), weighted by a_dist, on the token's own head
    distillation_token: str = "none"
    a_dist: float = 1.0


@dataclass
class DistillConfig(RunSection):
    """A distillation run: a teacher artifact -> student(s) by one method."""

    name: str = "student"
    out_dir: str = "runs"
    teacher: str | None = None  # teacher model/ or run directory
    teacher_store: str | None = None  # stored teacher outputs (`skindistil store-teacher`): no teacher forward
    method: str = "distilvit"  # distilvit | fcvit | fcvit-probs | cascade | full
    keep_blocks: int | list = 6  # distilvit: how many of the start's blocks, or their indices [0, 2, 4]
    block_selection: str = "first"  # first | uniform: which blocks a number of keep_blocks keeps
    min_depth: int = 1  # cascade: last member's depth
    # retention gate: class -> minimum student recall / teacher recall, e.g. {MEL: 0.97} (also "MEL=0.97,BCC=0.95")
    min_class_retention: dict | list | str = dataclasses.field(default_factory=dict)
    # the ViT the student starts from when not the teacher's own blocks (a must for a non-ViT teacher):
    # a ViT model/ or run directory, or a timm ViT name (random weights; NAME.TAG: timm's pretrained tag)
    student_init: str | None = None
    student_kwargs: dict = dataclasses.field(default_factory=dict)  # timm kwargs for a student_init name
    # PreprocessConfig fields overriding the student's preprocessing (default: student_init's, else the teacher's)
    student_preprocess: dict = dataclasses.field(default_factory=dict)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=lambda: TrainerConfig(max_epochs=20))

    # old key -> current key: read with a DeprecatedKeyWarning (`upgrade_keys`); the run's config.yaml
    # writes the current one
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"keep": "keep_blocks", "strategy": "block_selection"}

    def __post_init__(self):
        """ConfigError naming block_selection unless it is one of BLOCK_SELECTIONS."""
        if self.block_selection not in BLOCK_SELECTIONS:
            raise ConfigError(
                f"block_selection: expected {' or '.join(BLOCK_SELECTIONS)}, got {self.block_selection!r} "
                "(Lightning's strategy is trainer.strategy)"
            )


@dataclass
class SourceConfig:
    """Where the pipeline's images come from and how `prepare` caches them."""

    source: str = "synthetic"  # isic2019 | ham10000 | dermamnist | csv | folder | synthetic | prepared
    root: str = "builtin"
    options: dict = dataclasses.field(default_factory=dict)  # source options, e.g. {labels: isic2019}
    short_side: int = 256
    limit: int | None = None
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    workers: int | None = None
    masks: str | None = None  # lesion masks (folder or {stem} pattern): `prepare --masks`, localization in the report


@dataclass
class BenchConfig:
    device: str = "auto"  # auto: cuda when available, else cpu
    batch_sizes: tuple[int, ...] = (1, 32)
    backends: tuple[str, ...] = ("eager",)
    seconds: float = 3.0


@dataclass
class RunConfig(RunSection):
    """`skindistil run`: prepare -> teacher -> students -> evaluate -> benchmark -> report."""

    name: str = "run"
    out_dir: str = "runs"
    data: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    teacher: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    methods: tuple[str, ...] = ("distilvit",)  # distilvit plus any of fcvit, fcvit-probs, cascade, full
    cascade_epochs: int | None = None  # epochs per cascade member (default: distill.trainer.max_epochs)
    split: str = "test"
    bootstrap: int = 1000  # resamples behind every interval of the evaluation (0: none)
    subgroup_min_size: int = 30  # subgroups with fewer images are reported as too small, not scored
    benchmark: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    explain_images: int = 4
    localization_images: int = 300  # masked split images whose explanations the report scores (0: none)
    sized_for: str = "any"  # "gpu": a recipe meant for a GPU warns, with the measured duration, when run on a CPU
