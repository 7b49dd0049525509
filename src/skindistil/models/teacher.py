"""The teacher factory: a timm model with a head for the dataset's classes and optional pretrained weights."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from skindistil.errors import ModelError
from skindistil.models.weights import load_weights, looks_like_weight_path

log = logging.getLogger(__name__)

# The paper's teacher: ViT-B/16 at 224 px.
DEFAULT_TEACHER = "vit_base_patch16_224"

OFFLINE_HINT = (
    "download the weights on a connected machine and pass the local file instead: "
    "--pretrained /path/to/model.safetensors (timm weights, or a Hugging Face transformers ViT "
    "checkpoint file or directory such as google/vit-base-patch16-224-in21k)"
)


def create_teacher(
    name: str = DEFAULT_TEACHER,
    num_classes: int = 8,
    pretrained: str | Path | bool | None = None,
    img_size: int | None = None,
    *,
    keep_head: bool = False,
    ema: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Build timm model `name` with a `num_classes` head, optionally initialised from `pretrained`.

    pretrained:
      None/False   random initialisation.
      True         timm's default pretrained tag for `name` (downloaded from the Hugging Face Hub).
      "arch.tag"   a timm hub tag such as "vit_base_patch16_224.augreg_in21k" (arch must match `name`).
      a path       a local timm or transformers ViT checkpoint (see models.weights.load_weights).
    `ema=True` loads a local checkpoint's EMA weights (ModelError when it has none, or for a hub tag).
    The head is always new (`num_classes` outputs); with `keep_head=True` a local checkpoint's head of
    the same class count is kept. `img_size` and `timm_kwargs` (depth, embed_dim, num_heads,
    patch_size, drop_path_rate, ...) go to `timm.create_model`; position embeddings of pretrained
    weights are resampled to the model's patch grid.
    """
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model {name!r} (see timm.list_models('vit_*'))")
    kwargs = dict(timm_kwargs, num_classes=num_classes)
    if img_size is not None:
        kwargs["img_size"] = img_size

    local = isinstance(pretrained, Path) or (isinstance(pretrained, str) and looks_like_weight_path(pretrained))
    if not isinstance(ema, bool):
        raise ModelError(f"ema (--ema, model.pretrained_ema) must be true or false, got {ema!r}")
    if ema and not local:
        raise ModelError(f"--ema loads the EMA weights of a local checkpoint file; --pretrained is {pretrained!r}")
    if pretrained is None or pretrained is False:
        return _build(name, False, kwargs)
    if local:
        model = _build(name, False, kwargs)
        report = load_weights(model, pretrained, keep_head=keep_head, ema=ema)
        log.info("%s", report)
        return model
    tag = name if pretrained is True else str(pretrained)
    return _build_from_hub(arch, tag, kwargs)


@functools.lru_cache(maxsize=64)
def accepts_img_size(name: str) -> bool:
    """Whether timm model `name` takes an `img_size` argument (ViTs, Swin, ...: a fixed input grid);
    convnets (ResNet, ConvNeXt, EfficientNet, RegNet) do not and take any input size.

    Answered by building the model on the meta device (no memory, no weights, no download).
    Raises ModelError for a name timm does not know.
    """
    import timm
    import torch

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model {name!r} (see timm.list_models())")
    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False, img_size=224)
    except TypeError as exc:
        if "img_size" in str(exc):
            return False
        raise
    return True


def _build(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(f"timm model {name!r}: invalid argument(s): {exc}") from None


def _build_from_hub(arch: str, tag: str, kwargs: dict) -> nn.Module:
    import timm

    tag_arch = tag.split(".", 1)[0]
    if tag_arch != arch:
        raise ModelError(f"pretrained tag {tag!r} is for architecture {tag_arch!r}, but the model is {arch!r}")
    if "." in tag and tag not in timm.list_pretrained(f"{arch}.*"):
        known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ModelError(f"unknown pretrained tag {tag!r}; timm knows: {known}")
    online = hub_reachable()
    try:
        # offline, huggingface_hub still serves weights already in its cache, and fails at once otherwise
        # instead of retrying for about a minute
        with contextlib.nullcontext() if online else _hub_offline():
            return _build(tag, True, kwargs)
    except OSError as exc:  # huggingface_hub's offline, connection and HTTP errors are all OSErrors
        why = "the Hugging Face Hub is unreachable" if not online else f"{type(exc).__name__}: {exc}"
        raise ModelError(f"cannot fetch pretrained weights {tag!r} ({why}); {OFFLINE_HINT}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or one TCP connection to the hub endpoint (HF_ENDPOINT, default
    huggingface.co:443) fails within `timeout` seconds; a DNS failure answers at once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
