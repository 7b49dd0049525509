"""Models named on the benchmark's command line: artifact directories or timm architecture specs.

Models are artifact directories or timm architecture specs (random weights, 8 classes):

    ARCH[@DEPTH][:KEY=VALUE[,KEY=VALUE...]]

ARCH is a timm model name; @DEPTH sets the number of blocks (timm's `depth`); KEY=VALUE pairs are more
`timm.create_model` arguments, values being integers, floats, true/false or words. Examples:
`vit_base_patch16_224` (the teacher), `vit_base_patch16_224@6` (the 6-block student at full size),
`vit_base_patch16_224@2:embed_dim=32,num_heads=2,img_size=32,patch_size=8` (a tiny ViT for tests).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from skindistil.bench.summary import tensor_bytes
from skindistil.errors import ConfigError
from skindistil.inference.backends import model_input_size
from skindistil.models.artifact import artifact_name, load_model, resolve_model_dir, weight_files
from skindistil.models.teacher import create_teacher

DEFAULT_NUM_CLASSES = 8

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:@(?P<depth>\d+))?(?::(?P<kwargs>.*))?$")
_KWARG = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^=]+)$")
SPEC_SYNTAX = "ARCH[@DEPTH][:KEY=VALUE,...] (e.g. vit_base_patch16_224@6 or vit_base_patch16_224@2:embed_dim=32,num_heads=2,img_size=32,patch_size=8)"


@dataclass(frozen=True)
class ArchSpec:
    """A timm architecture with an optional depth and extra constructor arguments (see module doc)."""

    name: str
    depth: int | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def timm_kwargs(self) -> dict:
        kwargs = {"num_classes": DEFAULT_NUM_CLASSES, **self.kwargs}
        if self.depth is not None:
            kwargs["depth"] = self.depth
        return kwargs


def parse_arch_spec(text: str) -> ArchSpec:
    """Parse `ARCH[@DEPTH][:KEY=VALUE,...]`; ConfigError naming the fault for anything else."""
    match = _SPEC.match(text.strip())
    if not match:
        raise ConfigError(f"model {text!r}: not an architecture spec; expected {SPEC_SYNTAX}")
    depth = match["depth"]
    if depth is not None and int(depth) < 1:
        raise ConfigError(f"model {text!r}: depth must be at least 1")
    kwargs = {}
    if match["kwargs"] is not None:
        for item in match["kwargs"].split(","):
            pair = _KWARG.match(item.strip())
            if not pair:
                raise ConfigError(f"model {text!r}: {item!r} is not KEY=VALUE; expected {SPEC_SYNTAX}")
            if pair["key"] == "depth":
                raise ConfigError(f"model {text!r}: give the depth as @DEPTH, not depth=")
            kwargs[pair["key"]] = _parse_value(pair["value"].strip())
    return ArchSpec(match["name"], int(depth) if depth is not None else None, kwargs)


def _parse_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line: an artifact directory or an architecture spec."""

    ref: str
    label: str
    path: Path | None = None
    spec: ArchSpec | None = None


def parse_model_ref(ref: str) -> ModelRef:
    """Check a model reference without building it: an existing path (or anything that looks like a
    path) is an artifact; anything else must be a spec naming a timm architecture."""
    import timm

    ref = str(ref)
    if Path(ref).expanduser().exists() or any(c in ref for c in "/\\") or ref.startswith((".", "~")):
        model_dir = resolve_model_dir(Path(ref).expanduser())
        return ModelRef(ref, artifact_name(model_dir), path=model_dir)
    spec = parse_arch_spec(ref)
    if not timm.is_model(spec.name):
        raise ConfigError(
            f"model {ref!r}: no such directory and {spec.name!r} is not a timm architecture "
            "(give an artifact directory or a spec " + SPEC_SYNTAX + ")"
        )
    label = spec.name if spec.depth is None else f"{spec.name}@{spec.depth}"
    return ModelRef(ref, label, spec=spec)


@dataclass
class BenchModel:
    """A model ready to measure, with what is known about it before any timing."""

    ref: ModelRef
    model: nn.Module
    architecture: str
    image_size: tuple[int, int]
    file_bytes: int
    file_bytes_kind: str
    metrics: dict


def load_bench_model(ref: ModelRef) -> BenchModel:
    """Load the artifact, or build the spec with random weights, in eval mode on the CPU."""
    if ref.path is not None:
        loaded = load_model(ref.path)
        size = loaded.preprocess.image_size
        return BenchModel(
            ref,
            loaded.model,
            loaded.architecture["name"],
            (size, size),
            sum(path.stat().st_size for path in weight_files(ref.path)),
            " + ".join(path.name for path in weight_files(ref.path)),
            loaded.metrics,
        )
    kwargs = ref.spec.timm_kwargs()
    try:
        model = create_teacher(ref.spec.name, kwargs.pop("num_classes"), pretrained=None, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:  # timm's checks on inconsistent arguments
        raise ConfigError(f"model {ref.ref!r}: timm cannot build it ({type(exc).__name__}: {exc})") from None
    model.eval()
    return BenchModel(ref, model, ref.spec.name, model_input_size(model), tensor_bytes(model), "tensor bytes", {})
