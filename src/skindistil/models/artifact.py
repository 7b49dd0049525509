"""The model artifact: a directory that rebuilds the exact model and its preprocessing anywhere.

    model/
      config.json        timm's hub format (architecture, num_classes, num_features, label_names,
                         model_args, pretrained_cfg: input size, crop, mean, std, interpolation) with
                         skindistil's own fields beside them (format, kind "vit" | "depth_vit" | "timm", classes,
                         preprocess, exits,
                         calibration, provenance); see `hub_config`
      model.safetensors  the weights (no pickle) in timm's own names: for a MultiExitViT, the wrapped ViT
                         (its last exit)
      exits.safetensors  MultiExitViT with a head per exit only: the norms and heads of the other exits
      metrics.json       whatever metrics the producer recorded
      model_card.md      a short human summary generated from the two JSON files

`load_model` rebuilds the network from config.json alone (no download) and returns a `LoadedModel`
that predicts class probabilities from image files, PIL images or uint8 arrays. Plain timm reads the
same folder: `timm.create_model("local-dir:DIR", pretrained=True)` builds the ViT with its weights and
`timm.data.resolve_data_config(model=...)` its preprocessing (except the dermoscope black-border crop,
which timm has no transform for); for a MultiExitViT timm gets the last exit, a plain ViT. Format 1
artifacts (architecture as {name, kwargs}, MultiExitViT weights under "vit.") still load.
config.json is checked against `skindistil.models.schema` on every save and load, and its parameter
count is bounded before anything is allocated; weights must be finite, and so must every probability
the model reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skindistil.config import PreprocessConfig
from skindistil.errors import ModelError
from skindistil.files import file_sha256, jsonable, save_safetensors, write_json, write_text
from skindistil.markdown import markdown_table
from skindistil.metric_keys import with_current_keys
from skindistil.models.distilled import is_distilled_name
from skindistil.models.multi_exit import MultiExitViT
from skindistil.models.operating_points import CONFIG_KEY as OPERATING_POINTS_KEY
from skindistil.models.operating_points import OperatingPoints, parse_operating_points
from skindistil.models.schema import FORMAT_VERSION, MAX_PARAMETERS, ArtifactConfig, validate_config
from skindistil.models.student import is_vit, vit_architecture
from skindistil.models.weights import read_json_object
from skindistil.version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXITS_FILE = "exits.safetensors"
METRICS_FILE = "metrics.json"
CARD_FILE = "model_card.md"


def model_kind(model: nn.Module) -> str:
    """The artifact kind of `model`: "depth_vit", "vit" (a timm ViT) or "timm" (any other timm classifier)."""
    if isinstance(model, MultiExitViT):
        return "depth_vit"
    return "vit" if is_vit(model) else "timm"


def model_architecture(model: nn.Module, arch: dict | None = None) -> dict[str, Any]:
    """{'name': timm model name, 'kwargs': {...}} for `model` (a timm ViT, a MultiExitViT, or any timm model).

    For ViTs the structural kwargs are read from the model itself (so a student's depth is always its
    own); other kwargs given in `arch` (e.g. drop_path_rate) are kept. Other timm models (convnets)
    are recorded by name and the kwargs in `arch` (num_classes is always the model's own).
    """
    vit = model.vit if isinstance(model, MultiExitViT) else model
    name = (arch or {}).get("name") or getattr(vit, "pretrained_cfg", {}).get("architecture")
    if not name:
        raise ModelError(f"{type(vit).__name__}: no timm architecture name; pass arch={{'name': ..., 'kwargs': ...}}")
    kwargs = dict((arch or {}).get("kwargs", {}))
    if is_vit(vit):
        kwargs.update(vit_architecture(vit))
    elif isinstance(getattr(vit, "num_classes", None), int):
        kwargs["num_classes"] = vit.num_classes
    return {"name": str(name).split(".", 1)[0], "kwargs": kwargs}


def save_artifact(
    model: nn.Module,
    out_dir: str | Path,
    *,
    arch: dict | None = None,
    classes: Sequence[str],
    preprocess: PreprocessConfig,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the artifact directory `out_dir` (conventionally runs/<name>/model) and return it.

    model: a timm model or a MultiExitViT. arch: {'name': timm name, 'kwargs': {...}}; optional for timm
    models (their structure is read from the model, see `model_architecture`). extra: provenance
    recorded under config["provenance"] (e.g. role, kept_blocks, teacher, method, data).
    Raises ModelError, naming the field, when the config.json it would write does not pass
    `skindistil.models.schema` (so every artifact written can be loaded).
    """
    classes = [str(c) for c in classes]
    num_classes = model.num_classes if isinstance(model, MultiExitViT) else getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise ModelError(f"model has {num_classes} outputs but {len(classes)} class names were given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hub_config(model, arch=arch, classes=classes, preprocess=preprocess, extra=extra)
    validate_config(config, str(out_dir / CONFIG_FILE))  # nothing is written for a config that would not load
    # config.json last: it marks a complete artifact (runs skip stages whose model/config.json exists),
    # so a write that fails midway never leaves an artifact that looks finished
    _save_weights(model, out_dir)
    _write_json(out_dir / METRICS_FILE, metrics or {})
    write_text(out_dir / CARD_FILE, model_card(config, metrics or {}))
    _write_json(out_dir / CONFIG_FILE, config)
    return out_dir


# ------------------------------------------------------------------------------------ config.json


def hub_config(model: nn.Module, *, arch: dict | None, classes: Sequence[str], preprocess: PreprocessConfig,
               extra: dict | None = None) -> dict[str, Any]:
    """config.json of an artifact: timm's hub format, which `timm.create_model("local-dir:DIR")` and
    the Hugging Face hub read as they are, with skindistil's own fields beside it.

    timm's fields: architecture (timm model name), num_classes, num_features, global_pool,
    label_names (= classes), model_args (the constructor kwargs that fix every shape; see
    `model_architecture`), pretrained_cfg (`timm_pretrained_cfg`: input_size, crop_pct, crop_mode,
    mean, std, interpolation, num_classes, label_names, ...). skindistil's: format, skindistil_version,
    kind ("vit" | "depth_vit"), classes, preprocess (`PreprocessConfig`, the authority on inputs),
    num_parameters, provenance, and for a MultiExitViT exits and shared_head. Read back with
    `architecture_of`. For a MultiExitViT, timm's fields describe the wrapped ViT (its last exit).
    """
    classes = [str(c) for c in classes]
    architecture = model_architecture(model, arch)
    net = model.vit if isinstance(model, MultiExitViT) else model
    config: dict[str, Any] = {
        "architecture": architecture["name"],
        "num_classes": len(classes),
        "num_features": int(getattr(net, "num_features", 0)) or None,
        "label_names": classes,
        "model_args": jsonable(architecture["kwargs"]),
        "pretrained_cfg": timm_pretrained_cfg(net, preprocess, classes, architecture["name"]),
        "format": FORMAT_VERSION,
        "skindistil_version": __version__,
        "kind": model_kind(model),
        "classes": classes,
        "preprocess": preprocess.to_dict(),
        "num_parameters": count_parameters(model),
        "provenance": jsonable(extra or {}),
    }
    if isinstance(getattr(net, "global_pool", None), str) and net.global_pool:
        config["global_pool"] = net.global_pool
    if isinstance(model, MultiExitViT):
        config["exits"] = list(model.exits)
        config["shared_head"] = model.shared_head
    return config


def timm_crop_pct(preprocess: PreprocessConfig) -> float:
    """timm's crop_pct for `preprocess`: timm resizes the shorter side to floor(image_size / crop_pct),
    so the fraction is nudged (by float ulps) until that is exactly `preprocess.resize_size`."""
    size, target = preprocess.image_size, preprocess.resize_size
    pct = size / target
    for _ in range(64):
        scaled = math.floor(size / pct)
        if scaled == target:
            return pct
        pct = math.nextafter(pct, 0.0 if scaled < target else 2.0)
    raise ModelError(f"preprocess: no timm crop_pct gives a resize to {target} px for a {size} px input")


def timm_pretrained_cfg(net: nn.Module, preprocess: PreprocessConfig, classes: Sequence[str], name: str) -> dict:
    """timm's pretrained_cfg for the artifact's weights and preprocessing (eval: shorter side to
    `resize_size`, centre crop `image_size`, mean/std normalisation, `interpolation`)."""
    own = getattr(net, "pretrained_cfg", None) or {}
    size = preprocess.image_size
    return {
        "architecture": name,
        "input_size": [3, size, size],
        "fixed_input_size": bool(own.get("fixed_input_size", True)),
        "interpolation": preprocess.interpolation,
        "crop_pct": timm_crop_pct(preprocess),
        "crop_mode": "center",
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "num_classes": len(classes),
        "label_names": [str(c) for c in classes],
        "pool_size": None,
        "first_conv": own.get("first_conv", "patch_embed.proj"),
        "classifier": own.get("classifier", "head"),
    }


def architecture_of(config: dict, where: str = CONFIG_FILE) -> dict[str, Any]:
    """{'name': timm model name, 'kwargs': constructor kwargs} from an artifact config of any format
    (format 2: architecture + model_args; format 1: architecture {name, kwargs})."""
    arch = config.get("architecture")
    if isinstance(arch, str) and arch:
        kwargs = config.get("model_args", {})
    elif isinstance(arch, dict) and isinstance(arch.get("name"), str):
        arch, kwargs = arch["name"], arch.get("kwargs", {})
    else:
        raise ModelError(f"{where}: missing or malformed field 'architecture'")
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}: field 'model_args' must be an object, got {type(kwargs).__name__}")
    return {"name": arch, "kwargs": dict(kwargs)}


def _read_metrics(model_dir: Path) -> dict:
    """model_dir/metrics.json ({} when absent), keys of earlier versions read as today's
    (`metric_keys.with_current_keys`: {"val": {"bma": x}} -> {"val": {"balanced_accuracy": x}})."""
    path = model_dir / METRICS_FILE
    return with_current_keys(read_json_object(path), str(path)) if path.is_file() else {}


def update_metrics(model_dir: str | Path, metrics: dict) -> dict:
    """Merge `metrics` into model_dir/metrics.json (top-level keys replaced; keys an earlier version wrote
    are rewritten as today's) and refresh the card."""
    model_dir = resolve_model_dir(model_dir)
    merged = {**_read_metrics(model_dir), **jsonable(metrics)}
    _write_json(model_dir / METRICS_FILE, merged)
    write_text(model_dir / CARD_FILE, model_card(read_json_object(model_dir / CONFIG_FILE), merged))
    return merged


def set_calibration(model_dir: str | Path, temperature: float, fitted_on: str) -> bool:
    """Record a fitted softmax temperature in config.json; `LoadedModel` applies it from then on.

    Stored operating points chosen at another temperature no longer mean what they say: they are
    removed. Returns True when that happened. ModelError when the temperature is not finite and
    positive (nothing is written then).
    """
    model_dir = resolve_model_dir(model_dir)
    config = read_json_object(model_dir / CONFIG_FILE)
    config["calibration"] = {"temperature": float(temperature), "fitted_on": fitted_on}
    points = config.get(OPERATING_POINTS_KEY)
    stale = isinstance(points, dict) and points.get("temperature") != float(temperature)
    if stale:
        del config[OPERATING_POINTS_KEY]
    validate_config(config, str(model_dir / CONFIG_FILE))
    _write_json(model_dir / CONFIG_FILE, config)
    return stale


def set_operating_points(model_dir: str | Path, points: dict, *, fitted_on: str, default: str) -> OperatingPoints:
    """Store operating points ({name: point}, from `evaluation.operating_points.fit_operating_points`)
    in config.json with the artifact's current temperature, replacing any stored before; `default`
    names the point predict and serve report. Validated before writing (ModelError)."""
    model_dir = resolve_model_dir(model_dir)
    config = read_json_object(model_dir / CONFIG_FILE)
    temperature = float(config.get("calibration", {}).get("temperature", 1.0))
    config[OPERATING_POINTS_KEY] = jsonable(
        {"fitted_on": fitted_on, "temperature": temperature, "default": default, "points": points})
    stored = parse_operating_points(config, str(model_dir / CONFIG_FILE))
    _write_json(model_dir / CONFIG_FILE, config)
    return stored


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements of every parameter tensor) of `model`, shared tensors once:
    what config.json records as num_parameters and what benchmarks and reports print."""
    return sum(p.numel() for p in model.parameters())


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 (hex) of an artifact's model.safetensors: the identity of its weights."""
    return file_sha256(resolve_model_dir(model_dir) / WEIGHTS_FILE)


def artifact_name(model_dir: str | Path) -> str:
    """What a model directory is called in tables and answers: runs/<name>/model is <name>, any other
    folder its own name (resolved first, so `.` or `model` given from inside a run still has one)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def weight_files(model_dir: str | Path) -> list[Path]:
    """The artifact's weight files present (model.safetensors, and exits.safetensors for a MultiExitViT)."""
    model_dir = Path(model_dir)
    return [model_dir / name for name in (WEIGHTS_FILE, EXITS_FILE) if (model_dir / name).is_file()]


def _save_weights(model: nn.Module, out_dir: Path) -> None:
    """model.safetensors in timm's own key names (a MultiExitViT's wrapped ViT), exits.safetensors with a
    MultiExitViT's per-exit norms and heads (when it has any)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, MultiExitViT):
        exits = {k: v for k, v in state.items() if not k.startswith("vit.")}
        _write_safetensors({k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}, out_dir / WEIGHTS_FILE)
        if exits:
            _write_safetensors(exits, out_dir / EXITS_FILE)
        else:
            (out_dir / EXITS_FILE).unlink(missing_ok=True)
    else:
        _write_safetensors(state, out_dir / WEIGHTS_FILE)
        (out_dir / EXITS_FILE).unlink(missing_ok=True)


def _write_safetensors(state: dict, path: Path) -> None:
    save_safetensors(state, path, metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    # default=str: an exotic provenance value must not lose a finished training run's artifact
    write_json(path, data, default=str)


# --------------------------------------------------------------------------------------------- card


def model_card(config: dict, metrics: dict) -> str:
    """A short Markdown model card generated from config.json and metrics.json."""
    arch = architecture_of(config)
    kw = arch["kwargs"]
    pre = PreprocessConfig.from_dict(config["preprocess"])
    prov = config.get("provenance", {})
    if config["kind"] == "timm":
        described = f"- Architecture: timm `{arch['name']}` (not a ViT), input {pre.image_size} px"
    else:
        described = (f"- Architecture: timm `{arch['name']}`, {kw.get('depth', '?')} blocks, width "
                     f"{kw.get('embed_dim', '?')}, {kw.get('num_heads', '?')} heads, patch "
                     f"{_size(kw.get('patch_size'))}, input {_size(kw.get('img_size'))}")
    lines = [f"# skindistil model: {prov.get('role', config['kind'])}", "", described,
             f"- Parameters: {config.get('num_parameters', 0):,}"]
    if is_distilled_name(arch["name"]):
        lines.append("- DeiT distillation token: the prediction is the mean of the class-token head and the "
                     "distillation-token head")
    if config["kind"] == "depth_vit":
        head = "one shared head" if config.get("shared_head") else "one head per exit"
        lines.append(f"- Exits after blocks {', '.join(map(str, config['exits']))} ({head})")
    if "kept_blocks" in prov:
        source = prov.get("student_init", "teacher")
        owner = "teacher" if source == "teacher" else f"`{source}`"
        lines.append(f"- Kept {owner} blocks: {', '.join(map(str, prov['kept_blocks']))}")
    lines += [
        f"- Classes ({len(config['classes'])}): {', '.join(config['classes'])}",
        f"- Preprocessing: {'black-border crop, ' if pre.border_crop else ''}shorter side to {pre.resize_size}, "
        f"centre crop {pre.image_size}, scale to [0, 1], normalise mean {list(pre.mean)} std {list(pre.std)}",
        "",
        "## Intended use",
        "",
        "Research and teaching on dermoscopic image classification (ISIC 2019 classes). This is not a "
        "medical device and must not be used to diagnose, triage or reassure patients: it was not "
        "clinically validated, and its errors on under-represented classes and skin types are unknown.",
        "",
        "## Data",
        "",
    ]
    data = prov.get("data")
    lines.append(f"{data}" if data else "See `provenance` in config.json for the training data and settings.")
    lines += ["", "## Metrics", ""]
    rows = list(_metric_rows(metrics))
    if rows:
        lines.append(markdown_table(["metric", "value"], rows))
    else:
        lines.append("No metrics recorded.")
    return "\n".join(lines) + "\n"


def _metric_rows(metrics: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _metric_rows(value, f"{name}.")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            yield name, str(value)
        elif isinstance(value, float) and math.isfinite(value):
            yield name, f"{value:.4f}"


def _size(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value)) if len(set(value)) > 1 else str(value[0])
    return str(value)


# --------------------------------------------------------------------------------------------- load


def resolve_model_dir(path: str | Path) -> Path:
    """The artifact directory for a model/ dir, a run dir holding model/, or a config.json path."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        return path.parent
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    if not path.exists():
        raise ModelError(f"{path}: no such model directory")
    members = cascade_members(path)
    if members:
        listed = ", ".join(str(m) for m in members)
        raise ModelError(
            f"{path} is a cascade run of {len(members)} models, one per depth: pass one of them ({listed}), "
            f"or score them all with `skindistil evaluate --family {path}`"
        )
    raise ModelError(f"{path}: no {CONFIG_FILE} here or in {path / 'model'} (expected a model/ or run directory)")


def cascade_members(path: str | Path) -> list[Path]:
    """The member run directories of a cascade run (RUN/cascade/depth-XX holding model/config.json),
    deepest first; empty for any other directory."""
    found = [d for d in Path(path).glob("cascade/depth-*") if (d / "model" / CONFIG_FILE).is_file()]
    return sorted(found, key=lambda d: d.name, reverse=True)


def build_model(config: dict | ArtifactConfig, where: str = CONFIG_FILE) -> nn.Module:
    """The network described by an artifact config, randomly initialised (no download).

    The config is checked first (`skindistil.models.schema`), then the network is built on PyTorch's
    meta device (no memory) to count its parameters: over `MAX_PARAMETERS`, or not the
    `num_parameters` config.json records, is a ModelError naming `where`; only then is it allocated.
    """
    checked = config if isinstance(config, ArtifactConfig) else validate_config(config, where)
    with torch.device("meta"):
        count = count_parameters(_instantiate(checked, where))
    if count > MAX_PARAMETERS:
        raise ModelError(f"{where}: architecture has {count:,} parameters, over the limit of {MAX_PARAMETERS:,}")
    if count != checked.num_parameters:
        raise ModelError(
            f"{where}: num_parameters: config.json records {checked.num_parameters:,} parameters but its "
            f"architecture has {count:,}"
        )
    return _instantiate(checked, where)


def _instantiate(checked: ArtifactConfig, where: str) -> nn.Module:
    import timm

    arch = checked.architecture
    try:
        # only the keys config.json holds: the others keep the timm entrypoint's defaults
        vit = timm.create_model(arch.name, pretrained=False, **arch.kwargs.model_dump(exclude_unset=True))
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ModelError(f"{where}: cannot build the architecture ({type(exc).__name__}: {exc})") from None
    if checked.kind == "depth_vit":
        try:
            return MultiExitViT(vit, exits=checked.exits or "all", shared_head=bool(checked.shared_head))
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None
    return vit


def _load_weights(model: nn.Module, model_dir: Path, fmt: int) -> None:
    """Load the artifact's weight files into `model`; every tensor name and shape must match."""
    path = model_dir / WEIGHTS_FILE
    state = _read_safetensors(path)
    if isinstance(model, MultiExitViT) and fmt >= 2:
        # format 2: model.safetensors is the wrapped ViT in timm's names, exits.safetensors the other exits
        state = {f"vit.{k}": v for k, v in state.items()}
        if (model_dir / EXITS_FILE).is_file():
            state.update(_read_safetensors(model_dir / EXITS_FILE))
        path = model_dir / f"{{{WEIGHTS_FILE},{EXITS_FILE}}}"
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ModelError(
            f"{path}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]})"
        )
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise ModelError(f"{path}: {len(non_finite)} tensor(s) hold NaN or infinite values: {', '.join(non_finite[:5])}")
    model.load_state_dict(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: weight file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read weights (truncated or corrupt safetensors file): {exc}") from None


@dataclass
class LoadedModel:
    """A rebuilt artifact: the network in eval mode plus everything needed to use it."""

    model: nn.Module
    config: dict
    classes: list[str]
    preprocess: PreprocessConfig
    metrics: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> LoadedModel:
        self.model.to(device)
        return self

    @property
    def operating_points(self) -> OperatingPoints | None:
        """The stored operating points (`evaluate --operating-point`), validated; None when none."""
        return parse_operating_points(self.config, str((self.path or Path(".")) / CONFIG_FILE))

    @property
    def architecture(self) -> dict[str, Any]:
        """{'name': timm model name, 'kwargs': constructor kwargs}, whatever the artifact's format."""
        return architecture_of(self.config)

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation data (`evaluate --calibrate`); 1.0 when uncalibrated."""
        return float(self.config.get("calibration", {}).get("temperature", 1.0))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for preprocessed images [B, 3, S, S] (moved to the model's device)."""
        with torch.inference_mode():
            return self.model(x.to(self.device))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities [B, C] (float32) from logits [B, C]: softmax(logits / temperature).

        Raises ModelError if any is NaN or infinite (see `require_finite`)."""
        return self.require_finite((logits.float() / self.temperature).softmax(dim=-1))

    def require_finite(self, probs: torch.Tensor) -> torch.Tensor:
        """`probs` [B, C] unchanged, or ModelError if any row holds NaN or infinity: such a row is no
        prediction (overflowing logits, a broken backend), and must never be reported as one."""
        bad = ~torch.isfinite(probs).all(dim=-1)
        if bad.any():
            raise ModelError(
                f"{self.path or 'model'}: the model gave non-finite probabilities (NaN or infinity) for "
                f"{int(bad.sum())} of {len(probs)} image(s); refusing to report them"
            )
        return probs

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """Raw images (paths, PIL images, arrays; see `predict`) -> the model's input batch [N, 3, S, S].

        Applies the artifact's eval policy: black-border crop (when the model was trained with it),
        shorter side to preprocess.resize_size, centre crop preprocess.image_size, scale, normalise
        (the values of `build_eval_transform`, bit for bit). In two halves for servers and loaders:
        `prepare_image` (per image, uint8) and `normalize` (per batch).
        """
        return self.normalize(torch.stack([self.prepare_image(img, f"image {i}") for i, img in enumerate(images)]))

    def prepare_image(self, image, where: str = "image") -> torch.Tensor:
        """One raw image -> uint8 [3, S, S]: decode (`skindistil.data.imageio.as_rgb_array`, the one
        decode path), border crop, resize, centre crop (no float work yet). ImageError names `where`
        (or the path) when the image cannot be decoded."""
        from skindistil.data.imageio import as_rgb_array
        from skindistil.data.transforms import eval_resize_crop

        return eval_resize_crop(self._crop(as_rgb_array(image, where)), self.preprocess)

    def prepare_image_and_mask(self, image, mask: np.ndarray, where: str = "image") -> tuple[torch.Tensor, np.ndarray]:
        """One raw image and its lesion mask -> (uint8 [3, S, S] exactly as `prepare_image`, bool [S, S]).

        `mask`: uint8 [H, W] of the image's size (`skindistil.data.masks.read_mask`). The mask goes
        through the same border crop (the box found on the image), resize and centre crop as the
        image, then a pixel is lesion where it is >= `MASK_THRESHOLD`. ImageError naming `where` when
        the sizes differ.
        """
        from skindistil.data.imageio import as_rgb_array
        from skindistil.data.masks import MASK_THRESHOLD
        from skindistil.data.transforms import eval_resize_crop
        from skindistil.errors import ImageError

        rgb = as_rgb_array(image, where)
        mask = np.asarray(mask)
        if mask.dtype != np.uint8 or mask.shape != rgb.shape[:2]:
            raise ImageError(where, f"mask is {mask.dtype} {list(mask.shape)}, expected uint8 of the image's size "
                                    f"{list(rgb.shape[:2])} (HxW)")
        x0, y0, x1, y1 = self.crop_box(rgb)
        lesion = eval_resize_crop(torch.from_numpy(np.array(mask[y0:y1, x0:x1], dtype=np.uint8))[None], self.preprocess)
        return eval_resize_crop(self._crop(rgb), self.preprocess), (lesion[0] >= MASK_THRESHOLD).numpy()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] from `prepare_image` -> the float32 model input, on the images' device."""
        from skindistil.data.transforms import normalize_uint8

        return normalize_uint8(images, self.preprocess)

    def crop_box(self, rgb: np.ndarray) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the eval policy's black-border crop of HxWx3 `rgb` (the whole image
        when the model was trained without it)."""
        from skindistil.data.imageio import border_crop_box

        if self.preprocess.border_crop:
            return border_crop_box(rgb, self.preprocess.border_threshold)
        return 0, 0, rgb.shape[1], rgb.shape[0]

    def _crop(self, rgb: np.ndarray) -> torch.Tensor:
        x0, y0, x1, y1 = self.crop_box(rgb)
        return torch.from_numpy(np.array(rgb[y0:y1, x0:x1], dtype=np.uint8)).permute(2, 0, 1)  # a writable copy

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        """Class probabilities [N, C] (float32, columns in `classes` order) for raw images.

        `images`: one image or a sequence of them; an image is a path, bytes, a PIL image (any mode)
        or an array (HxW, HxWxC; a 4-D NxHxWxC array is a batch). All decode by the rules of
        `skindistil.data.imageio.to_rgb`. Raises ImageError naming the image that cannot be used.
        """
        from skindistil.data.imageio import as_image_list

        images = as_image_list(images)
        out = [
            self.probabilities(self.logits(self.preprocess_images(images[i : i + batch_size]))).cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)


def upgrade_artifact(path: str | Path) -> Path:
    """Rewrite an artifact of an older format in place in the current one (timm's hub format), keeping
    its weights, classes, preprocessing, metrics, provenance and calibration; returns the folder.
    The rewritten artifact's logits are checked to equal the old one's before anything is replaced."""
    import shutil
    import tempfile

    loaded = load_model(path)
    model_dir = loaded.path
    if loaded.config.get("format") == FORMAT_VERSION:
        return model_dir
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        new_dir = save_artifact(loaded.model, Path(tmp) / "model", arch=loaded.architecture, classes=loaded.classes,
                                preprocess=loaded.preprocess, metrics=loaded.metrics,
                                extra=loaded.config.get("provenance", {}))
        if "calibration" in loaded.config:
            calibration = loaded.config["calibration"]
            set_calibration(new_dir, calibration["temperature"], calibration.get("fitted_on", ""))
        probe = torch.zeros(1, 3, loaded.preprocess.image_size, loaded.preprocess.image_size)
        if not torch.equal(load_model(new_dir).logits(probe), loaded.logits(probe)):
            raise ModelError(f"{model_dir}: the rewritten artifact does not reproduce the model; left unchanged")
        (model_dir / EXITS_FILE).unlink(missing_ok=True)
        for item in new_dir.iterdir():
            shutil.move(str(item), model_dir / item.name)
    return model_dir


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild an artifact (model/ dir, run dir or config.json) in eval mode on `device`.

    Raises ModelError naming the file and field: a config.json that fails `skindistil.models.schema`,
    an architecture over the parameter limit, weights that are missing, corrupt, of other shapes or
    not finite. `metrics` holds metrics.json with the keys of earlier versions read as today's
    (DataError naming the file when one metric is there under its old and its new key).
    """
    model_dir = resolve_model_dir(path)
    config_path = model_dir / CONFIG_FILE
    config = read_json_object(config_path)
    checked = validate_config(config, str(config_path))
    model = build_model(checked, str(config_path))
    _load_weights(model, model_dir, int(config["format"]))
    metrics = _read_metrics(model_dir)
    return LoadedModel(model.eval().to(device), config, list(checked.classes), checked.preprocess, metrics, model_dir)
