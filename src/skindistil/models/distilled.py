"""The DeiT distillation token (Touvron et al., 2021): a ViT student with a second token and head.

timm's `VisionTransformerDistilled` (timm.models.deit) puts a distillation token after the class
token; `head` reads the class token and `head_dist` the distillation token. In training the class
head learns from the labels and the distillation head from the teacher
(`skindistil.distill.losses.distillation_token_loss`); at inference the model's output is the mean
of the two heads' logits (timm's eval forward), so every command that runs the model (evaluate,
predict, export, serve) uses both heads without knowing about them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from skindistil.errors import ModelError
from skindistil.models.student import is_vit, vit_architecture

# Any of timm's distilled entrypoints builds a VisionTransformerDistilled; the recorded kwargs
# (depth, width, heads, patch and image size, ...) fix its shape.
DISTILLED_ARCH = "deit_base_distilled_patch16_224"
NEW_PARAMETERS = ("dist_token", "head_dist.weight", "head_dist.bias")


def is_distilled(model: nn.Module) -> bool:
    """Whether `model` (or the ViT inside a MultiExitViT) has a DeiT distillation token and head."""
    from timm.models.deit import VisionTransformerDistilled

    return isinstance(getattr(model, "vit", model), VisionTransformerDistilled)


def is_distilled_name(name: str) -> bool:
    """Whether timm architecture `name` is a distilled ViT (timm names them deit_*_distilled_*)."""
    return "_distilled_" in str(name).split(".", 1)[0]


def add_distillation_token(vit: nn.Module, **timm_kwargs) -> nn.Module:
    """A `VisionTransformerDistilled` with the shape and weights of timm ViT `vit`, plus a distillation
    token and its head.

    Patch embedding, class token, position embeddings, blocks, final norm and head are copied; the
    distillation token and `head_dist` are new, initialised as timm initialises DeiT (truncated
    normal, std 0.02; zero bias). The distillation token's position embedding starts as a copy of the
    class token's (ViTs with `no_embed_class` give prefix tokens none). `timm_kwargs` (e.g.
    drop_path_rate) go to `timm.create_model`; `vit` is left untouched and the result is in its mode.
    Raises ModelError for a model that is not a timm ViT classifying its class token, one that already
    has a distillation token, or one with register tokens (timm's distilled ViT has none).
    """
    import timm

    name = type(vit).__name__
    if is_distilled(vit):
        raise ModelError(f"{name}: the model already has a distillation token")
    if not is_vit(vit) or not vit.has_class_token or vit.global_pool != "token":
        raise ModelError(f"{name}: a distillation token needs a timm VisionTransformer that classifies its "
                         "class token (global_pool='token')")
    if vit.num_reg_tokens:
        raise ModelError(f"{name}: has {vit.num_reg_tokens} register tokens; timm's distilled ViT supports none")
    student = timm.create_model(DISTILLED_ARCH, pretrained=False, **{**timm_kwargs, **vit_architecture(vit)})
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    if not vit.no_embed_class:
        pos = state["pos_embed"]  # [1, 1 + patches, E]: the class token's position, then the patches'
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if sorted(missing) != sorted(NEW_PARAMETERS) or unexpected:
        raise ModelError(f"{name}: cannot add a distillation token (missing {missing}, unexpected {unexpected})")
    return student.train(vit.training)


def head_logits(vit: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
    """(logits, distillation logits) from the last block's output tokens [B, N, E] (before the final
    norm) of timm ViT `vit`: for a distilled ViT, the class-token head's and the distillation-token
    head's logits [B, C] (the model's output is their mean); for any other ViT, its output and None."""
    x = vit.norm(tokens)
    if not is_distilled(vit):
        return vit.forward_head(x), None
    return vit.head(vit.head_drop(x[:, 0])), vit.head_dist(vit.head_drop(x[:, 1]))


def without_distillation_token(vit: nn.Module, tokens: Tensor) -> Tensor:
    """Hidden states [B, N, E] of `vit` without the distillation token (the class, register and patch
    tokens every ViT has), so that a distilled and a plain ViT compare token for token."""
    if not is_distilled(vit):
        return tokens
    return torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1)
