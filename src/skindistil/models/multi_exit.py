"""A multi-exit (early-exit) ViT: per-depth classifiers on one timm ViT (FCViT, FCViTProbs) and early exit.

Per-block tokens come from timm's `forward_intermediates` (one pass, stopping after the deepest exit
asked for); only `early_exit`, which runs each block on the samples still in flight, walks the blocks
itself from timm's stem (`vit_stem`).

Depths are counted in blocks, 1..N: "depth d" is the class token after block d (0-based index d - 1).
An exit at depth d maps that token through a norm and a linear head to logits:

- `shared_head=False` (FCViT): every exit below the last has a LayerNorm and a Linear head of its own,
  initialised as copies of the model's final norm and head; the last exit is the model's own norm and
  head, so `forward` is the wrapped ViT's forward.
- `shared_head=True` (FCViTProbs): the model's final norm and head serve every exit; no parameters
  are added, and each depth is read by the same classifier.

A ViT with a DeiT distillation token (`models.distilled`) keeps its two heads at every exit: an exit
reads the class token with its head and the distillation token with its distillation head (own
copies of `head_dist` per exit, or the model's own when shared), and its logits are the mean of the
two, exactly as the model's own output is. So every exit, the early-exit rule and `truncate` (a
distilled ViT of that depth) give the same numbers; `exit_head_logits` returns the two separately
for the losses that train each head on its own signal.

`MultiExitViT` is saved as an artifact of kind "depth_vit" (`models.artifact`): the name the format has
always used, kept so that artifacts written by earlier versions and by this one read alike.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from skindistil.errors import ModelError
from skindistil.models.distilled import is_distilled
from skindistil.models.student import extract_student


def vit_stem(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] -> the token sequence entering a timm ViT's first block.

    timm has no public stem: this mirrors the start of `forward_intermediates` and serves only
    `MultiExitViT.early_exit`, which runs each block on the samples still in flight (timm's loops run
    every block on the whole batch).
    """
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def block_tokens(vit: nn.Module, x: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
    """Output tokens [B, N, E] (prefix tokens first, then patches; before the final norm) of the blocks
    at `depths` (1-based, ascending) of timm ViT `vit`, through timm's `forward_intermediates`, which
    stops after the deepest one."""
    out = vit.forward_intermediates(x, indices=[d - 1 for d in depths], return_prefix_tokens=True, norm=False,
                                    stop_early=True, output_fmt="NLC", intermediates_only=True)
    if not vit.num_prefix_tokens:  # timm returns the patch tokens alone then
        return list(out)
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in out]


def vit_logits_and_hidden(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, C] and the last block's output tokens [B, N, E] (before the final norm) of a timm
    ViT, from one `forward_intermediates` pass and `forward_head`."""
    features, (last,) = vit.forward_intermediates(x, indices=1, return_prefix_tokens=True, norm=False,
                                                  output_fmt="NLC")
    hidden = torch.cat(last[::-1], dim=1) if vit.num_prefix_tokens else last
    return vit.forward_head(features), hidden


class MultiExitViT(nn.Module):
    """A timm VisionTransformer with a classifier after each block listed in `exits` (depths, 1-based).

    `exits="all"` puts one after every block; a list must be ascending, unique, within 1..N and end
    with N (the model's own output).
    """

    def __init__(self, vit: nn.Module, exits: str | Sequence[int] = "all", shared_head: bool = False):
        super().__init__()
        _check_token_vit(vit)
        self.vit = vit
        self.depth = len(vit.blocks)
        self.exits = _resolve_exits(exits, self.depth)
        self.shared_head = bool(shared_head)
        own = 0 if self.shared_head else len(self.exits) - 1
        self.distilled = is_distilled(vit)
        self.exit_norms = nn.ModuleList(copy.deepcopy(vit.norm) for _ in range(own))
        self.exit_heads = nn.ModuleList(copy.deepcopy(vit.head) for _ in range(own))
        # empty (no state) unless the ViT has a distillation token
        self.exit_dist_heads = nn.ModuleList(copy.deepcopy(vit.head_dist) for _ in range(own if self.distilled else 0))

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def num_classes(self) -> int:
        return self.vit.num_classes

    def exit_logits(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of exit number `index` (position in `exits`) from the token sequence [B, N, D]; with
        a distillation token, the mean of the class-token and distillation-token heads."""
        logits, dist_logits = self.exit_head_logits(index, tokens)
        return logits if dist_logits is None else (logits + dist_logits) / 2

    def exit_head_logits(self, index: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class-token head logits, distillation-token head logits or None) of exit number `index`."""
        last = self.shared_head or index == len(self.exits) - 1
        norm = self.vit.norm if last else self.exit_norms[index]
        head = self.vit.head if last else self.exit_heads[index]
        x = self.vit.head_drop(norm(tokens[:, : 2 if self.distilled else 1]))
        if not self.distilled:
            return head(x[:, 0]), None
        dist_head = self.vit.head_dist if last else self.exit_dist_heads[index]
        return head(x[:, 0]), dist_head(x[:, 1])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> the token sequence entering the first block (see `vit_stem`)."""
        return vit_stem(self.vit, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the last exit: the wrapped model's prediction."""
        return self.forward_until(x, self.depth)

    def forward_all(self, x: torch.Tensor, return_hidden: bool = False):
        """Logits at every exit, stacked: [num_exits, B, num_classes]; with `return_hidden`, also the
        last block's output tokens [B, N, D] (for hidden-state distillation)."""
        tokens = block_tokens(self.vit, x, self.exits)
        logits = torch.stack([self.exit_logits(index, t) for index, t in enumerate(tokens)])
        return (logits, tokens[-1]) if return_hidden else logits

    def forward_until(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits of the exit at `depth`, running only the first `depth` blocks."""
        index = self._exit_index(depth)
        (tokens,) = block_tokens(self.vit, x, [depth])
        return self.exit_logits(index, tokens)

    def early_exit(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample early exit: stop at the first exit whose top softmax probability >= `threshold`.

        Blocks run only on the samples still in flight; the last exit takes whatever remains.
        Returns (logits [B, C], depth used per sample [B], int64).
        """
        tokens = self.embed(x)
        batch = tokens.shape[0]
        pending = torch.arange(batch, device=tokens.device)
        logits: torch.Tensor | None = None
        depth_used = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        for depth, block in enumerate(self.vit.blocks, start=1):
            tokens = block(tokens)
            if depth not in self.exits:
                continue
            z = self.exit_logits(self.exits.index(depth), tokens)
            if logits is None:
                logits = z.new_zeros(batch, z.shape[-1])
            if depth == self.depth:
                done = torch.ones(len(pending), dtype=torch.bool, device=z.device)
            else:
                done = z.softmax(dim=-1).amax(dim=-1) >= threshold
            logits[pending[done]] = z[done]
            depth_used[pending[done]] = depth
            pending, tokens = pending[~done], tokens[~done]
            if len(pending) == 0:
                break
        return logits, depth_used

    def truncate(self, depth: int) -> nn.Module:
        """A plain timm ViT of `depth` blocks whose norm and head are this exit's (a model per depth)."""
        index = self._exit_index(depth)
        student = extract_student(self.vit, depth, "first").model
        if not self.shared_head and index < len(self.exits) - 1:
            student.norm = copy.deepcopy(self.exit_norms[index])
            student.head = copy.deepcopy(self.exit_heads[index])
            if self.distilled:
                student.head_dist = copy.deepcopy(self.exit_dist_heads[index])
        return student

    def _exit_index(self, depth: int) -> int:
        if depth not in self.exits:
            raise ModelError(f"depth {depth} has no exit; exits are at {self.exits}")
        return self.exits.index(depth)


def _check_token_vit(vit: nn.Module) -> None:
    ok = (
        isinstance(getattr(vit, "blocks", None), nn.Sequential)
        and getattr(vit, "global_pool", None) == "token"
        and getattr(vit, "has_class_token", False)
        and getattr(vit, "attn_pool", None) is None
        and isinstance(getattr(vit, "fc_norm", None), nn.Identity)
    )
    if not ok:
        raise ModelError(
            f"{type(vit).__name__}: per-depth exits need a timm VisionTransformer that classifies its class "
            "token (global_pool='token')"
        )


def _resolve_exits(exits: str | Sequence[int], depth: int) -> list[int]:
    if isinstance(exits, str):
        if exits != "all":
            raise ModelError(f"exits={exits!r}: expected 'all' or a list of depths 1..{depth}")
        return list(range(1, depth + 1))
    resolved = [int(d) for d in exits]
    if not resolved or any(b <= a for a, b in zip(resolved, resolved[1:], strict=False)):
        raise ModelError(f"exits={resolved}: expected ascending, unique depths")
    if resolved[0] < 1 or resolved[-1] != depth:
        raise ModelError(f"exits={resolved}: depths must lie in 1..{depth} and end with the last block ({depth})")
    return resolved
