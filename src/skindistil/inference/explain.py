"""Where a model looks: attention rollout and its gradient-weighted variant for ViTs, Grad-CAM for CNNs.

Both read the attention probabilities A_l [B, heads, N, N] of every block the forward pass runs
(tokens: the class token, any register tokens, then the patch grid) and propagate relevance from
the class token down to the patches:

- "rollout" (Abnar & Zuidema, 2020): per block, fuse the heads (mean, or max), add the identity for
  the residual connection and renormalise the rows, Â_l = norm(fuse(A_l) + I); then
  R = Â_L ... Â_2 Â_1. Class-agnostic.
- "grad-rollout" (Chefer, Gur & Wolf, 2021, "Generic attention-model explainability"): per block,
  Ā_l = mean over heads of (∂y_c/∂A_l ⊙ A_l) clamped at 0, where y_c is the logit of the explained
  class; R starts at I and is updated R <- R + Ā_l R block by block. Class-specific.

The map is the class token's row of R over the patch tokens, reshaped to the patch grid and
normalised to sum to 1 (all zeros when no patch has positive relevance). A ViT with a DeiT
distillation token predicts with the mean of its class-token and distillation-token heads, so its map
is the mean of those two tokens' rows. Only ViTs can be explained this way: a convnet has no
attention and is explained by Grad-CAM (`grad_cam`).

timm's attention normally runs fused (scaled_dot_product_attention), which never materialises A.
Here, and only here, the attention modules are switched to timm's explicit path for the duration
of one call (`unfused_attention`), where A is the output of `attn_drop` (an identity in eval mode),
read with forward hooks (`recorded_attention`).

- "gradcam" (Selvaraju et al., 2017) for CNNs, through captum's `LayerGradCam`: at the network's last
  feature stage (timm's `feature_info[-1]`, else its last Conv2d), the channels weighted by the mean
  gradient of the explained class's logit, summed and clamped at 0 (no min-max rescaling, so the
  relevance mass is the method's own). Class-specific. Needs captum (the `explain` extra).

`explanation_map` picks the method's function by the model's architecture (`model_family`: "vit" or
"cnn") and refuses a method that does not apply to it, so one call explains a ViT teacher, a
distilled student and a CNN alike.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from skindistil.data.records import Problem
from skindistil.errors import ConfigError, ImageError, ModelError
from skindistil.files import write_bytes
from skindistil.models.artifact import LoadedModel
from skindistil.models.distilled import is_distilled
from skindistil.models.multi_exit import MultiExitViT
from skindistil.models.student import is_vit

METHODS = ("rollout", "grad-rollout", "gradcam")
HEAD_FUSIONS = ("mean", "max")
METHOD_TITLES = {"rollout": "attention rollout", "grad-rollout": "gradient-weighted rollout", "gradcam": "Grad-CAM"}
# The architecture family each method explains (see `model_family`).
METHOD_FAMILY = {"rollout": "vit", "grad-rollout": "vit", "gradcam": "cnn"}
FAMILY_NAMES = {"vit": "ViT", "cnn": "CNN"}
CLASS_SPECIFIC = frozenset({"grad-rollout", "gradcam"})
EXPLAIN_EXTRA_HINT = "pip install 'skindistil[explain]' (captum)"


# ----------------------------------------------------------------------------------------- capture


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules of `model` (those with `fused_attn` and an `attn_drop` layer), in order."""
    modules = [
        m
        for m in model.modules()
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]
    if not modules:
        raise ModelError(
            f"{type(model).__name__}: no timm attention modules (with fused_attn and attn_drop) to explain"
        )
    return modules


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Switch `model`'s timm attention modules to the explicit softmax path; restore their setting on exit."""
    modules = attention_modules(model)
    saved = [m.fused_attn for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield modules
    finally:
        for m, fused in zip(modules, saved, strict=True):
            m.fused_attn = fused


@contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every forward pass appends each attention module's probabilities
    [B, heads, N, N] to the yielded list, in the order the blocks run."""
    maps: list[Tensor] = []
    with unfused_attention(model) as modules:
        handles = [
            m.attn_drop.register_forward_hook(lambda _mod, _inp, out: maps.append(out)) for m in modules
        ]
        try:
            yield maps
        finally:
            for handle in handles:
                handle.remove()


# ------------------------------------------------------------------------------------- propagation


def rollout(attentions: Sequence[Tensor], head_fusion: str = "mean") -> Tensor:
    """Attention rollout R = Â_L ... Â_1 with Â_l = rownorm(fuse_heads(A_l) + I); [B, N, N]."""
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head fusion {head_fusion!r}: choose from {', '.join(HEAD_FUSIONS)}")
    relevance = _identity_like(attentions)
    for attn in attentions:
        fused = attn.mean(dim=1) if head_fusion == "mean" else attn.amax(dim=1)
        fused = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        relevance = (fused / fused.sum(dim=-1, keepdim=True)) @ relevance
    return relevance


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Gradient-weighted rollout: R <- R + mean_heads((∂y/∂A_l ⊙ A_l)^+) R from R = I; [B, N, N]."""
    relevance = _identity_like(attentions)
    for attn, grad in zip(attentions, gradients, strict=True):
        weighted = (grad * attn).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def _identity_like(attentions: Sequence[Tensor]) -> Tensor:
    if not attentions:
        raise ModelError("no attention maps were recorded (did the forward pass run any attention block?)")
    batch, _, tokens, _ = attentions[0].shape
    first = attentions[0]
    return torch.eye(tokens, dtype=first.dtype, device=first.device).expand(batch, tokens, tokens)


# ------------------------------------------------------------------------------------------- maps


def rollout_refusal(model: nn.Module) -> str | None:
    """None when attention rollout can explain `model` (a timm ViT that classifies its class token,
    alone or inside a MultiExitViT), else why not (one sentence)."""
    vit = model.vit if isinstance(model, MultiExitViT) else model
    if not is_vit(vit):
        return (f"attention rollout explains a ViT's attention, and this model is a {type(vit).__name__} "
                "(not a ViT, no attention to roll out): explain it with gradcam")
    if not (vit.has_class_token and vit.global_pool == "token"):
        return (f"{type(vit).__name__}: rollout explains the class token; the model must be a timm ViT that "
                "classifies its class token (global_pool='token')")
    return None


def explainable(model: nn.Module) -> str | None:
    """None when some method of METHODS can explain `model` (Grad-CAM a CNN, rollout a ViT that
    classifies its class token), else why not (one sentence)."""
    try:
        if model_family(model) == "cnn":
            return None
    except ModelError as exc:
        return str(exc)
    return rollout_refusal(model)


def _token_vit(model: nn.Module) -> nn.Module:
    vit = model.vit if isinstance(model, MultiExitViT) else model
    reason = rollout_refusal(model)
    if reason is not None:
        raise ModelError(reason)
    return vit


def attention_rollout(
    model: nn.Module,
    image: Tensor,
    method: str = "rollout",
    class_index: int | None = None,
    head_fusion: str = "mean",
) -> np.ndarray:
    """Relevance of each patch for one preprocessed image [1, 3, H, W] (or [3, H, W]) -> [gh, gw].

    method: "rollout" (class-agnostic; `head_fusion` mean or max) or "grad-rollout" (for class
    `class_index`, default the predicted class). The map is non-negative and sums to 1 (see the
    module docstring). `model` is a timm ViT or a MultiExitViT; it runs in eval mode for this call.
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: choose from {', '.join(METHODS)}")
    images = image[None] if image.ndim == 3 else image
    if images.ndim != 4 or images.shape[0] != 1:
        raise ConfigError(f"attention_rollout explains one image [1, 3, H, W], got shape {list(image.shape)}")
    vit = _token_vit(model)
    patch_h, patch_w = vit.patch_embed.patch_size
    grid = (images.shape[-2] // patch_h, images.shape[-1] // patch_w)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    needs_grad = method == "grad-rollout"
    # grad-rollout needs a graph even when the caller runs under inference_mode or no_grad; an input
    # that requires grad keeps the graph alive when the weights are frozen.
    try:
        with (
            torch.inference_mode(False),
            torch.set_grad_enabled(needs_grad),
            recorded_attention(model) as maps,
        ):
            x = images.detach().clone().to(device).requires_grad_(needs_grad)
            logits = model(x)
            if method == "rollout":
                relevance = rollout([a.detach() for a in maps], head_fusion)
            else:
                target = int(logits[0].argmax()) if class_index is None else int(class_index)
                if not 0 <= target < logits.shape[-1]:
                    raise ConfigError(f"class index {target} out of range for {logits.shape[-1]} classes")
                grads = torch.autograd.grad(logits[0, target], maps)
                relevance = gradient_rollout([a.detach() for a in maps], grads)
    finally:
        model.train(was_training)
    # the rows of the tokens the heads read: the class token, and a distillation token's too
    readout = relevance[0, : 2 if is_distilled(vit) else 1].mean(dim=0)
    patches = readout[vit.num_prefix_tokens :].clamp(min=0)
    if patches.numel() != grid[0] * grid[1]:
        raise ModelError(
            f"{patches.numel()} patch tokens do not form the {grid[0]}x{grid[1]} patch grid of the input"
        )
    total = patches.sum()
    heat = patches / total if total > 0 else patches
    return heat.reshape(grid).float().cpu().numpy()


def model_family(model: nn.Module) -> str:
    """"vit" for a model with timm attention blocks (a ViT, a MultiExitViT), "cnn" for a convolutional
    network without them; ModelError for anything else."""
    if any(hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module) for m in model.modules()):
        return "vit"
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "cnn"
    raise ModelError(f"{type(model).__name__}: neither a timm ViT (attention blocks) nor a CNN (Conv2d layers)")


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The explanation methods that apply to `model`'s architecture, in METHODS order."""
    family = model_family(model)
    return tuple(m for m in METHODS if METHOD_FAMILY[m] == family)


def check_method(model: nn.Module, method: str) -> None:
    """ConfigError for an unknown method or one that does not apply to the model's architecture."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: choose from {', '.join(METHODS)}")
    family = model_family(model)
    if METHOD_FAMILY[method] != family:
        label = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise ConfigError(
            f"method {method!r} explains {FAMILY_NAMES[METHOD_FAMILY[method]]}s, but {label} is a "
            f"{FAMILY_NAMES[family]}: "
            f"use {' or '.join(methods_for(model))}"
        )


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM reads: the last feature stage timm names in `feature_info`, else the last
    Conv2d of the model."""
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1]
        name = last.get("module") if isinstance(last, dict) else None
        if name:
            return model.get_submodule(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"{type(model).__name__}: no convolutional layer for Grad-CAM")
    return convs[-1]


def grad_cam(model: nn.Module, image: Tensor, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM of one preprocessed image [1, 3, H, W] (or [3, H, W]) for class `class_index` (default
    the predicted class) at `cam_layer(model)` -> [h, w] at that layer's resolution, non-negative,
    summing to 1 (all zeros when no location has positive relevance). Runs the model in eval mode."""
    try:
        from captum.attr import LayerGradCam
    except ImportError:
        raise ConfigError(f"Grad-CAM needs captum: {EXPLAIN_EXTRA_HINT}") from None
    images = image[None] if image.ndim == 3 else image
    if images.ndim != 4 or images.shape[0] != 1:
        raise ConfigError(f"grad_cam explains one image [1, 3, H, W], got shape {list(image.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.detach().clone().to(device).requires_grad_(True)
            with torch.no_grad():
                logits = model(x)
            target = int(logits[0].argmax()) if class_index is None else int(class_index)
            if not 0 <= target < logits.shape[-1]:
                raise ConfigError(f"class index {target} out of range for {logits.shape[-1]} classes")
            cam = LayerGradCam(model, cam_layer(model)).attribute(x, target=target, relu_attributions=True)
    finally:
        model.train(was_training)
    heat = cam.detach()[0].sum(dim=0).clamp(min=0).float().cpu()
    total = heat.sum()
    return (heat / total if total > 0 else heat).numpy()


def explanation_map(
    model: nn.Module,
    image: Tensor,
    method: str = "rollout",
    class_index: int | None = None,
    head_fusion: str = "mean",
) -> np.ndarray:
    """The relevance map of one preprocessed image [1, 3, H, W] by `method`, at the method's own
    resolution ([gh, gw] patch grid for rollout methods, the last stage's grid for Grad-CAM);
    non-negative, summing to 1. ConfigError when the method does not apply to the architecture."""
    check_method(model, method)
    if method == "gradcam":
        return grad_cam(model, image, class_index)
    return attention_rollout(model, image, method, class_index, head_fusion)


# ------------------------------------------------------------------------------------------ images


def render_overlay(image: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.5) -> bytes:
    """PNG bytes of `overlay_figure(image, heat, title, alpha)` at 100 dpi (800x440 px)."""
    buffer = io.BytesIO()
    overlay_figure(image, heat, title, alpha).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def overlay_figure(image: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.5):
    """A matplotlib Figure: `image` (HxWx3 float in [0, 1]) beside the same image under the heat map
    `heat` [gh, gw] (rescaled to [0, 1] between its minimum and maximum, bilinearly upsampled), with a
    colour scale for the map and `title` above both."""
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    low, span = float(heat.min()), float(np.ptp(heat))
    scaled = (heat - low) / span if span > 0 else np.zeros_like(heat)
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("input (model's view)")
    right.imshow(image)
    # the extent of imshow's default pixel-centred grid, so the map covers exactly the image
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    layer = right.imshow(scaled, cmap="jet", alpha=alpha, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
    right.set_title("relevance overlay")
    scale = fig.colorbar(layer, ax=right, fraction=0.046, pad=0.02)
    scale.set_label("relevance (0 = image minimum, 1 = maximum)")
    scale.solids.set_alpha(1)  # the scale shows the colours themselves, not blended with the image
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def _display_image(loaded: LoadedModel, batch: Tensor) -> np.ndarray:
    """The preprocessed image [1, 3, S, S] back in [0, 1] HWC: what the model saw."""
    mean = torch.tensor(loaded.preprocess.mean)[:, None, None]
    std = torch.tensor(loaded.preprocess.std)[:, None, None]
    return (batch[0].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def explain_png(
    loaded: LoadedModel,
    image,
    method: str = "rollout",
    class_name: str | None = None,
    head_fusion: str = "mean",
) -> tuple[bytes, str, float]:
    """Explain one raw image (PIL image, path or HxWx3 uint8 array) through the artifact's preprocessing.

    Returns (PNG bytes of image | overlay, predicted class, its probability). `class_name` picks the
    class grad-rollout or Grad-CAM explains (default: the predicted one).
    """
    class_index = None
    if class_name is not None:
        if class_name not in loaded.classes:
            raise ConfigError(
                f"class {class_name!r} is not one of the model's classes: {', '.join(loaded.classes)}"
            )
        class_index = loaded.classes.index(class_name)
    batch = loaded.preprocess_images([image])
    probs = loaded.probabilities(loaded.logits(batch))[0].cpu()
    top = int(probs.argmax())
    heat = explanation_map(loaded.model, batch, method, class_index, head_fusion)
    explained = (
        f" of {loaded.classes[top if class_index is None else class_index]}" if method in CLASS_SPECIFIC else ""
    )
    title = f"prediction {loaded.classes[top]} ({float(probs[top]):.1%}); {METHOD_TITLES[method]}{explained}"
    return render_overlay(_display_image(loaded, batch), heat, title), loaded.classes[top], float(probs[top])


def explain_images(
    loaded: LoadedModel,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    method: str = "rollout",
    class_name: str | None = None,
    head_fusion: str = "mean",
    on_error: Callable[[Problem], None] | None = None,
) -> list[Path]:
    """Write OUT_DIR/<stem>_<method>.png (image | overlay) for each image file; returns the files written.

    <stem> is the file's stem, or, for files sharing a stem (``mel/x.jpg``, ``nv/x.jpg``), a name made
    from the whole path (`skindistil.data.names.unique_file_stems`), so no output overwrites another.
    An unreadable image raises ImageError, or, with `on_error`, is reported to it and skipped.
    """
    from skindistil.data.imageio import read_image
    from skindistil.data.names import unique_file_stems

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    paths = [Path(p) for p in paths]
    for path, stem in zip(paths, unique_file_stems(paths), strict=True):
        try:
            image = read_image(path)
        except ImageError as exc:
            if on_error is None:
                raise
            on_error(Problem(exc.where, exc.reason))
            continue
        png, _, _ = explain_png(loaded, image, method, class_name, head_fusion)
        target = out_dir / f"{stem}_{method}.png"
        write_bytes(target, png)
        written.append(target)
    return written
