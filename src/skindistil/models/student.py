"""Student extraction: a shallower ViT built from a subset of the teacher's blocks (SkinDistilViT)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import nn

from skindistil.config import BLOCK_SELECTIONS
from skindistil.errors import ModelError


def is_vit(model: nn.Module) -> bool:
    """Whether `model` is a timm VisionTransformer (DeiT's distilled ViT included): the architecture
    whose blocks a student can copy, whose hidden states are tokens, and whose attention can be rolled out.
    Convnets (ResNet, ConvNeXt, EfficientNet, RegNet) and other timm families are not."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def vit_depth(model: nn.Module) -> int | None:
    """Blocks of a timm ViT or of the ViT inside a MultiExitViT; None for any other model (a convnet)."""
    vit = getattr(model, "vit", model)
    return len(vit.blocks) if is_vit(vit) else None


def vit_architecture(vit: nn.Module) -> dict[str, Any]:
    """timm constructor arguments that fix the shapes of a VisionTransformer, read from the model.

    Covers the options of the ViTs skindistil builds (patch grid, width, depth, heads, MLP ratio,
    qkv bias, class/register tokens, layer scale, qk-norm, pre-norm, pooling); `load_model` checks
    every tensor name and shape, so anything not covered fails loudly rather than silently.
    """
    blocks = getattr(vit, "blocks", None)
    if not is_vit(vit) or not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ModelError(f"{type(vit).__name__}: not a timm VisionTransformer; pass arch=... explicitly")
    first = blocks[0]
    kwargs: dict[str, Any] = {
        "img_size": list(vit.patch_embed.img_size),
        "patch_size": list(vit.patch_embed.patch_size),
        "in_chans": vit.patch_embed.proj.in_channels,
        "num_classes": vit.num_classes,
        "global_pool": vit.global_pool,
        "embed_dim": vit.embed_dim,
        "depth": len(blocks),
        "num_heads": first.attn.num_heads,
        "mlp_ratio": first.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": first.attn.qkv.bias is not None,
        "qk_norm": not isinstance(first.attn.q_norm, nn.Identity),
        "class_token": vit.has_class_token,
        "reg_tokens": vit.num_reg_tokens,
        "no_embed_class": vit.no_embed_class,
        "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "fc_norm": not isinstance(vit.fc_norm, nn.Identity),
    }
    if not isinstance(first.ls1, nn.Identity):
        # any positive value creates the layer-scale parameters; the loaded weights set them
        kwargs["init_values"] = 1e-5
    return kwargs


class ExtractedStudent(NamedTuple):
    """The student and the teacher block indices (0-based, ascending) it was built from."""

    model: nn.Module
    kept_blocks: list[int]


def select_blocks(
    num_blocks: int, keep_blocks: int | Sequence[int], block_selection: str = "first"
) -> list[int]:
    """Indices of the teacher blocks to keep.

    An int k with block_selection "first" keeps blocks 0..k-1; with "uniform" it keeps
    floor(i * (num_blocks - 1) / (k - 1) + 1/2) for i = 0..k-1 (first and last block always kept),
    which for 12 -> 6 gives DistilBERT's 0, 2, 4, 7, 9, 11; k = 1 keeps block 0. A sequence is an
    explicit choice and must be ascending, unique and within range (block_selection is not used).
    Raises ModelError naming keep_blocks or block_selection for a choice that cannot be made.
    """
    if isinstance(keep_blocks, bool):
        raise ModelError(f"keep_blocks must be an int or a list of block indices, not {keep_blocks!r}")
    if block_selection not in BLOCK_SELECTIONS:
        raise ModelError(f"block_selection={block_selection!r}: choose from {', '.join(BLOCK_SELECTIONS)}")
    if isinstance(keep_blocks, int):
        if not 1 <= keep_blocks <= num_blocks:
            raise ModelError(f"keep_blocks={keep_blocks}: must be between 1 and the teacher's {num_blocks} blocks")
        if block_selection == "first" or keep_blocks == 1:
            return list(range(keep_blocks))
        span, steps = num_blocks - 1, keep_blocks - 1
        # integer form of floor(i * span / steps + 1/2): exact, no float rounding
        return [(2 * i * span + steps) // (2 * steps) for i in range(keep_blocks)]
    indices = list(keep_blocks)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ModelError(f"keep_blocks={indices}: expected a non-empty list of block indices")
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ModelError(f"keep_blocks={indices}: indices must be ascending and unique (blocks run in order)")
    if indices[0] < 0 or indices[-1] >= num_blocks:
        raise ModelError(f"keep_blocks={indices}: indices must lie in 0..{num_blocks - 1}")
    return indices


def extract_student(
    teacher: nn.Module, keep_blocks: int | Sequence[int] = 6, block_selection: str = "first"
) -> ExtractedStudent:
    """A deep copy of timm ViT `teacher` keeping only the chosen blocks, in order.

    Patch embedding, class token, position embedding, final norm and head are copied with the kept
    blocks; the teacher is left untouched. Keeping every block reproduces the teacher exactly.
    Returns `ExtractedStudent(model, kept_blocks)`.
    """
    blocks = getattr(teacher, "blocks", None)
    if not is_vit(teacher) or not isinstance(blocks, nn.Sequential):
        raise ModelError(f"{type(teacher).__name__}: student extraction needs a timm VisionTransformer (with .blocks)")
    kept = select_blocks(len(blocks), keep_blocks, block_selection)
    student = copy.deepcopy(teacher)
    student.blocks = nn.Sequential(*[student.blocks[i] for i in kept])
    if hasattr(student, "feature_info"):
        # timm's feature_info lists one entry per block, named by position
        template = teacher.feature_info[0] if teacher.feature_info else {}
        student.feature_info = [dict(template, module=f"blocks.{i}") for i in range(len(kept))]
    return ExtractedStudent(student, kept)
