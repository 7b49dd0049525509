"""Import ViT weights from local files: timm checkpoints and Hugging Face transformers ViT checkpoints.

Accepted sources (see `load_weights`):
- a timm-layout file: .safetensors, or a torch file (.pth, .pt, .bin, .ckpt, .pth.tar) read with
  `weights_only=True` and only `SAFE_GLOBALS` allowed besides tensors and plain data, never unpickling
  other objects. The weights may be wrapped as the training tools write them: timm's train.py
  (`model_best.pth.tar`: state_dict, state_dict_ema, optimizer, args as an argparse.Namespace),
  DeiT-style scripts (model, model_ema), Lightning (`trainer.save_checkpoint`: state_dict, with
  `current_model_state` when `EMAWeightAveraging` is on), and carry a module prefix ('module.' from
  DDP, 'model.' from a LightningModule, ...). `ema=True` picks the EMA weights (see `EMA_LAYOUTS`);
- a transformers ViT checkpoint (`ViTModel` or `ViTForImageClassification`, the
  google/vit-base-patch16-224-in21k layout): the directory holding config.json + model.safetensors
  (or pytorch_model.bin), or the weight file itself. Its keys are mapped to timm's names here.

The classification head is re-initialised unless asked otherwise: a checkpoint's head predicts its own
classes, not the dataset's.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skindistil.errors import ModelError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar", ".tar")  # timm's train.py writes .pth.tar
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# Files looked for, in order, inside a checkpoint directory.
DIRECTORY_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The only classes a torch checkpoint may hold besides tensors and plain data: timm's train.py, DeiT and
# MAE store their command-line arguments as an argparse.Namespace (rebuilding one runs no code of the file).
SAFE_GLOBALS = (argparse.Namespace,)
# Where the tools put the weights: (key of the EMA weights, key of the raw weights when EMA is present).
# timm train.py: state_dict_ema / state_dict; DeiT-style: model_ema / model; Lightning's
# EMAWeightAveraging saves the average under state_dict and the raw weights under current_model_state.
EMA_LAYOUTS = (("state_dict_ema", "state_dict"), ("model_ema", "model"), ("state_dict", "current_model_state"))
# Keys that wrap the raw weights, outermost first.
WRAPPER_KEYS = ("state_dict", "model", "module")

# A key that every ViT checkpoint of each layout has; the text before it is the wrapper prefix.
TIMM_ANCHOR = "patch_embed.proj.weight"
HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"

# transformers ViT name (after the 'vit.' prefix) -> timm name. Layer entries use {i}.
_HF_TO_TIMM = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER_TO_TIMM = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV = ("query", "key", "value")
# Present in some transformers checkpoints, absent from timm's ViT: the tanh "pooler" of ViTModel
# (timm's ViT has no pre-logits layer) and the masked-image-modelling token.
_HF_DROPPED_PREFIXES = ("pooler.", "embeddings.mask_token")


@dataclass(frozen=True)
class WeightReport:
    """What `load_weights` did: where from, which layout, what happened to the head."""

    source: str
    layout: str  # "timm" or "transformers"
    head: str  # "kept" or "reinitialised"
    resampled_pos_embed: bool
    dropped: tuple[str, ...] = ()
    entry: str = ""  # the checkpoint entry loaded, e.g. 'state_dict' or 'state_dict_ema' ('' for a bare state dict)
    ema: bool = False  # the EMA weights were loaded
    ema_entry: str | None = None  # the checkpoint's EMA weights, loaded or not

    def __str__(self) -> str:
        text = f"loaded {self.layout} weights from {self.source}"
        if self.entry:
            text += f" ({self.entry}{': EMA weights' if self.ema else ''})"
        text += f"; head {self.head}"
        if self.ema_entry and not self.ema:
            text += f"; the file also holds EMA weights ({self.ema_entry}), loaded with --ema"
        if self.resampled_pos_embed:
            text += "; position embedding resampled to the model's grid"
        if self.dropped:
            text += f"; ignored {len(self.dropped)} tensor(s) with no timm counterpart ({', '.join(self.dropped[:4])})"
        return text


def looks_like_weight_path(source: str | Path) -> bool:
    """True when `source` names a local file or directory rather than a timm hub tag."""
    text = str(source)
    return Path(text).exists() or text.endswith(WEIGHT_SUFFIXES) or "/" in text or "\\" in text or text.startswith(".")


def is_torch_file(path: Path) -> bool:
    return path.name.lower().endswith(TORCH_SUFFIXES)


def read_checkpoint(path: str | Path) -> dict:
    """The content of a weight file: a .safetensors file's tensors (no pickle), or a torch file's dict.

    Torch files are read with `torch.load(weights_only=True)`, allowing only `SAFE_GLOBALS` besides
    tensors and plain data: a file whose pickle holds any other object is refused, naming the objects,
    and none of its code runs. Raises ModelError naming the file when it is missing, corrupt, holds other
    objects, is not a dict or has an unknown suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if not is_torch_file(path):
        raise ModelError(f"{path}: unknown weight file type; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and RuntimeError variants for bad files
        unsafe = _unsafe_globals(path, str(exc))
        if unsafe:
            raise ModelError(
                f"{path}: holds Python objects besides tensors and plain data ({', '.join(unsafe)}); "
                "rebuilding them could run code from the file, so it is refused. Save the weights alone "
                "(torch.save(model.state_dict(), 'weights.pth'), or safetensors) where the file is trusted, "
                "and pass that file"
            ) from None
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: cannot be read as a torch checkpoint (truncated or corrupt?): {detail}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a dict of tensors or a checkpoint dict, found {type(data).__name__}")
    return data


def _unsafe_globals(path: Path, error: str) -> list[str]:
    """Classes and functions the pickle in `path` refers to beyond torch's and `SAFE_GLOBALS`, read from the
    pickle's opcodes (nothing is executed); for old non-zip files, from torch's weights-only `error`."""
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, or truncated
        found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", error)
    return [name for name in found if name not in allowed]


@dataclass(frozen=True)
class CheckpointWeights:
    """The weights taken out of a checkpoint, and where they came from."""

    tensors: dict[str, torch.Tensor]
    entry: str  # the checkpoint keys followed, e.g. 'state_dict_ema' or 'state_dict'; '' for a bare state dict
    ema_entry: str | None  # the key of the EMA weights the checkpoint holds, None when it holds none


def read_state_dict(path: str | Path, *, ema: bool = False) -> CheckpointWeights:
    """The weights of a weight file (see `read_checkpoint`, `select_state_dict`)."""
    path = Path(path)
    return select_state_dict(read_checkpoint(path), where=str(path), ema=ema)


def resolve_weight_file(source: str | Path) -> tuple[Path, dict | None]:
    """The weight file named by `source` and, for a checkpoint directory, its config.json (or None)."""
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        config = read_json_object(config_path) if config_path.is_file() else None
        for name in DIRECTORY_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name, config
        if (path / "model.safetensors.index.json").is_file():
            raise ModelError(f"{path}: sharded checkpoints are not supported; a ViT fits one model.safetensors")
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        hint = f"; pass one of its files: {', '.join(found[:6])}" if found else ""
        raise ModelError(f"{path}: checkpoint directory has none of {', '.join(DIRECTORY_WEIGHT_FILES)}{hint}")
    if not path.is_file():
        raise ModelError(f"{path}: pretrained weights not found (expected a file or a checkpoint directory)")
    sibling = path.parent / "config.json"
    config = read_json_object(sibling) if sibling.is_file() else None
    return path, config


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; ModelError naming the file otherwise (also for the bare
    NaN and Infinity that Python writes but JSON does not allow)."""
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def select_state_dict(data: dict, *, where: str, ema: bool = False) -> CheckpointWeights:
    """Take the weights out of a checkpoint dict as the training tools write it (see `EMA_LAYOUTS`,
    `WRAPPER_KEYS`): the raw training weights by default, the EMA weights with `ema=True`.

    Raises ModelError naming `where` when `ema` is asked for and the checkpoint holds no EMA weights.
    """
    ema_key, raw_key = next(
        ((e, r) for e, r in EMA_LAYOUTS if isinstance(data.get(e), dict) and isinstance(data.get(r), dict)),
        (None, None),
    )
    if ema and ema_key is None:
        expected = "; ".join(f"{e} next to {r}" for e, r in EMA_LAYOUTS)
        raise ModelError(f"{where}: holds no EMA weights (looked for {expected}); drop --ema to load its weights")
    picked = [ema_key] if ema else [raw_key] if raw_key else []
    node = data[picked[0]] if picked else data
    for key in WRAPPER_KEYS:
        if isinstance(node.get(key), dict):
            node, picked = node[key], [*picked, key]
    tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return CheckpointWeights(tensors, "/".join(picked), ema_key)


def find_prefix(state_dict: dict[str, torch.Tensor], anchor: str, where: str) -> str | None:
    """The module prefix in front of `anchor` ('' for none), or None when no key ends with it."""
    prefixes = sorted({k[: -len(anchor)] for k in state_dict if k.endswith(anchor)})
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        return None
    if len(prefixes) > 1:
        raise ModelError(
            f"{where}: holds several ViTs (prefixes {', '.join(repr(p) for p in prefixes)}); "
            "save the one to import on its own"
        )
    return prefixes[0]


def convert_hf_vit(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a transformers ViT state dict (keys without the 'vit.' prefix) to timm's names.

    Query, key and value projections are concatenated, in that order, into timm's fused `qkv`; the
    classifier (if the caller passes it as 'classifier.*') becomes `head`. Returns the converted dict
    and the names of tensors that have no timm counterpart (the pooler, the mask token).
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in _HF_TO_TIMM:
            out[_HF_TO_TIMM[key]] = value
        elif key.startswith("classifier."):
            out["head." + key.split(".", 1)[1]] = value
        elif key.startswith(_HF_DROPPED_PREFIXES):
            dropped.append(key)
        elif match := _HF_LAYER_KEY.match(key):
            index, module, param = int(match.group(1)), match.group(2), match.group(3)
            if module.startswith("attention.attention.") and module.rsplit(".", 1)[1] in _HF_QKV:
                qkv.setdefault((index, param), {})[module.rsplit(".", 1)[1]] = value
            elif module in _HF_LAYER_TO_TIMM:
                out[f"blocks.{index}.{_HF_LAYER_TO_TIMM[module]}.{param}"] = value
            else:
                out[key] = value  # reported as unexpected by the caller
        else:
            out[key] = value
    for (index, param), parts in sorted(qkv.items()):
        missing = [name for name in _HF_QKV if name not in parts]
        if missing:
            raise ModelError(f"transformers ViT layer {index}: attention {param} lacks {', '.join(missing)}")
        out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat([parts[name] for name in _HF_QKV], dim=0)
    return out, dropped


def _check_hf_config(config: dict | None, where: str) -> None:
    if not config or config.get("model_type", "vit") != "vit":
        return
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelError(f"{where}: hidden_act={act!r}; timm's ViT uses exact GELU ('gelu'), so the import would differ")


def load_weights(model: nn.Module, source: str | Path, *, keep_head: bool = False, ema: bool = False) -> WeightReport:
    """Load a local timm or transformers ViT checkpoint into the timm VisionTransformer `model`.

    `ema=True` loads the checkpoint's EMA weights (timm train.py's state_dict_ema, DeiT's model_ema,
    Lightning EMAWeightAveraging's averaged state_dict) and is a ModelError when it has none; by default
    the raw training weights are loaded.

    The position embedding is resampled (timm's `checkpoint_filter_fn`) when the checkpoint's patch
    grid differs from the model's. The head is kept only when `keep_head` is true and the checkpoint's
    head has the model's class count; otherwise the model's own freshly initialised head stays.
    Every other tensor must match by name and shape: missing, unexpected or mis-shaped tensors raise a
    ModelError that lists them.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path, config = resolve_weight_file(source)
    where = str(path)
    weights = read_state_dict(path, ema=ema)
    raw = weights.tensors

    hf_prefix = find_prefix(raw, HF_ANCHOR, where)
    dropped: list[str] = []
    if hf_prefix is not None:
        layout = "transformers"
        _check_hf_config(config, where)
        # ViTForImageClassification keeps the encoder under 'vit.' and the classifier next to it.
        outer = hf_prefix[: -len("vit.")] if hf_prefix.endswith("vit.") else hf_prefix
        body = {k[len(hf_prefix) :]: v for k, v in raw.items() if k.startswith(hf_prefix)}
        body.update({k[len(outer) :]: v for k, v in raw.items() if k.startswith(outer + "classifier.")})
        state_dict, dropped = convert_hf_vit(body)
    else:
        prefix = find_prefix(raw, TIMM_ANCHOR, where)
        if prefix is None:
            raise ModelError(
                f"{where}: not ViT weights: no key ends with '{TIMM_ANCHOR}' (timm) or '{HF_ANCHOR}' (transformers)"
            )
        layout = "timm"
        state_dict = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}

    head = _head_policy(model, state_dict, keep_head)
    if head == "reinitialised":
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}

    pos_before = state_dict.get("pos_embed")
    state_dict = checkpoint_filter_fn(state_dict, model)
    pos_after = state_dict.get("pos_embed")
    resampled = pos_before is not None and pos_after is not None and pos_before.shape != pos_after.shape

    _check_keys(model, state_dict, skip_missing=("head.",) if head == "reinitialised" else (), where=where)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    return WeightReport(where, layout, head, resampled, tuple(dropped), weights.entry, ema, weights.ema_entry)


def _head_policy(model: nn.Module, state_dict: dict[str, torch.Tensor], keep_head: bool) -> str:
    own = getattr(model, "head", None)
    theirs = state_dict.get("head.weight")
    if keep_head and isinstance(own, nn.Linear) and theirs is not None and theirs.shape == own.weight.shape:
        return "kept"
    return "reinitialised"


def _check_keys(model: nn.Module, state_dict: dict[str, torch.Tensor], *, skip_missing: tuple[str, ...], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith(skip_missing)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if names:
                shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
                parts.append(f"{label} [{len(names)}]: {shown}")
        raise ModelError(f"{where}: weights do not fit the model ({'; '.join(parts)}); check the architecture (name, depth, width)")
