"""Distillation losses as plain functions over logits and hidden states, and the SkinDistilViT loss.

Notation: B = batch, C = classes, D = number of depths (exits), N = tokens, E = width.
Every "mean over the batch" is a plain mean over its B samples unless a class weight says otherwise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skindistil.config import LossConfig
from skindistil.errors import ConfigError

COSINE_TOKENS = ("all", "cls")
DISTILLATION_TOKEN_MODES = ("none", "soft", "hard")


def task_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with optional class weights and label smoothing (PyTorch's definition: with
    weights, the mean divides by the summed weights of the targets)."""
    return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)


@dataclass(frozen=True)
class TaskLoss:
    """The cross-entropy against the labels, with the options every method must honour.

    class_weights: [C] float (`data.imbalance` weighted-loss) or None; label_smoothing: in [0, 1]
    (`optim.label_smoothing`). Every label term of every method (the task term, the per-depth CE of
    FCViT and `full`, FCViTProbs' last-depth CE) is computed by one `TaskLoss`, so no method can drop an
    option. Terms against the teacher (KD, logit MSE, DeiT's hard token loss) are not label terms and
    take neither. Raises ConfigError naming optim.label_smoothing for a value outside [0, 1].
    """

    class_weights: Tensor | None = None
    label_smoothing: float = 0.0

    def __post_init__(self):
        smoothing = self.label_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not math.isfinite(smoothing) \
                or not 0.0 <= smoothing <= 1.0:
            raise ConfigError(f"optim.label_smoothing: expected a number in [0, 1], got {smoothing!r}")

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits [B, C] float, target [B] int64 class indices -> scalar loss."""
        return task_loss(logits, target, self.class_weights, self.label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T)).

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """sum((student - teacher)^2) / B: squared error summed over classes, averaged over the batch."""
    return (student_logits - teacher_logits).pow(2).sum() / student_logits.shape[0]


def distillation_token_loss(
    dist_logits: Tensor, teacher_logits: Tensor, mode: str = "hard", temperature: float = 1.0
) -> Tensor:
    """DeiT's loss on the distillation token's head (Touvron et al., 2021, facebookresearch/deit losses.py).

    mode="soft": T^2 * sum over batch and classes of KL(softmax(teacher / T) || softmax(dist / T)),
    divided by the number of logits B * C (DeiT's normalisation: `kd_loss` / C).
    mode="hard": cross-entropy of `dist_logits` against the teacher's top class (argmax; the first
    one on a tie, as torch.argmax), batch mean. The teacher gets no gradient either way.
    """
    teacher_logits = teacher_logits.detach()
    if mode == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    if mode != "soft":
        raise ValueError(f"mode={mode!r}: expected soft or hard")
    log_p_student = F.log_softmax(dist_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl * temperature**2 / dist_logits.numel()


def hidden_cosine_loss(pairs: Sequence[tuple[Tensor, Tensor]], tokens: str = "all") -> Tensor:
    """Mean over (student, teacher) hidden-state pairs [B, N, E] of 1 - cosine similarity.

    tokens="all": cosine per token over E, averaged over tokens and batch; "cls": class token only.
    Several pairs express an explicit student -> teacher layer map; their losses are averaged.
    """
    if tokens not in COSINE_TOKENS:
        raise ValueError(f"tokens={tokens!r}: expected one of {COSINE_TOKENS}")
    if not pairs:
        raise ValueError("hidden_cosine_loss needs at least one (student, teacher) pair")
    losses = []
    for student, teacher in pairs:
        if tokens == "cls":
            student, teacher = student[:, 0], teacher[:, 0]
        losses.append(1.0 - F.cosine_similarity(student, teacher, dim=-1).mean())
    return torch.stack(losses).mean()


def per_depth_ce(all_logits: Tensor, target: Tensor, task: TaskLoss | None = None) -> Tensor:
    """FCViT: sum over depths of the cross-entropy `task` (default: plain CE) of that depth's logits.

    all_logits: [D, B, C] with D >= 1; target: [B] int64. Returns a scalar.
    """
    task = task or TaskLoss()
    return sum((task(z, target) for z in all_logits), all_logits.new_zeros(()))


def chained_depth_kl(all_logits: Tensor, depths: Sequence[int], weight: float = 1.0) -> Tensor:
    """FCViTProbs: weight * sum over j in `depths` of KL(softmax(z_{j+1}).detach() || softmax(z_j)).

    all_logits: [D, B, C]; `depths` are 0-based indices into its first dimension (as returned by
    `enabled_depths`). Each depth learns from the one above it, which receives no gradient from this
    term; the last depth has no successor and contributes nothing (it is trained by the task loss).
    KL is averaged over the batch.
    """
    last = all_logits.shape[0] - 1
    terms = [
        F.kl_div(
            F.log_softmax(all_logits[j], dim=-1),
            F.log_softmax(all_logits[j + 1], dim=-1).detach(),
            log_target=True,
            reduction="batchmean",
        )
        for j in depths
        if j < last
    ]
    if not terms:
        return all_logits.new_zeros(())
    return weight * torch.stack(terms).sum()


def enabled_depths(step: int, num_depths: int, warmup_steps: int, every_steps: int) -> list[int]:
    """FCViTProbs schedule: the 0-based depths trained at optimiser step `step`, top-down.

    Steps 0 .. warmup_steps-1 train the last depth only; at step warmup_steps the depth below it is
    enabled, and one more every `every_steps` steps after that, until all are. E.g. num_depths=4,
    warmup=10, every=5: steps 0-9 -> [3]; 10-14 -> [2, 3]; 15-19 -> [1, 2, 3]; >= 20 -> [0, 1, 2, 3].
    Steps are integers (the reference implementation compared a float step and never fired).
    """
    step = operator.index(step)
    if num_depths < 1 or warmup_steps < 0 or every_steps < 1:
        raise ValueError(
            f"enabled_depths: need num_depths >= 1, warmup_steps >= 0, every_steps >= 1 "
            f"(got {num_depths}, {warmup_steps}, {every_steps})"
        )
    count = 1 if step < warmup_steps else min(num_depths, 2 + (step - warmup_steps) // every_steps)
    return list(range(num_depths - count, num_depths))


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    loss: LossConfig,
    task: TaskLoss,
    hidden_pairs: Sequence[tuple[Tensor, Tensor]] | None = None,
    dist_logits: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SkinDistilViT loss (SPEC.md) with the weights of `loss` (a `LossConfig`):

        a_task * task(student, label) + a_kd * T^2 * KL(p_teacher^T || p_student^T)
        + a_mse * sum((student - teacher)^2) / B + a_cos * (1 - cos(student hidden, teacher hidden))

    student_logits, teacher_logits: [B, C]; target: [B] int64; `task`: the label cross-entropy with
    its class weights and label smoothing. With the DeiT distillation token (`loss.distillation_token`
    "soft" or "hard"), `student_logits` are the class-token head's and `dist_logits` [B, C] the token
    head's, which adds a_dist * `distillation_token_loss(dist_logits, ...)` (temperature
    `loss.temperature` for soft); a_kd and a_mse still act on the class-token head.

    Returns (total, parts): each term before weighting, detached, for the terms whose weight is
    non-zero (names task, kd, mse, cos, dist). Raises ValueError when a_cos > 0 without
    `hidden_pairs` or a token mode without `dist_logits`.
    """
    if loss.cos_tokens not in COSINE_TOKENS:
        raise ValueError(f"cos_tokens={loss.cos_tokens!r}: expected one of {COSINE_TOKENS}")
    if loss.distillation_token not in DISTILLATION_TOKEN_MODES:
        raise ValueError(f"distillation_token={loss.distillation_token!r}: expected one of {DISTILLATION_TOKEN_MODES}")
    terms: dict[str, tuple[float, Tensor]] = {}
    if loss.a_task:
        terms["task"] = loss.a_task, task(student_logits, target)
    if loss.a_kd:
        terms["kd"] = loss.a_kd, kd_loss(student_logits, teacher_logits, loss.temperature)
    if loss.a_mse:
        terms["mse"] = loss.a_mse, logit_mse(student_logits, teacher_logits)
    if loss.a_cos:
        if not hidden_pairs:
            raise ValueError("a_cos > 0 needs hidden_pairs=[(student_hidden, teacher_hidden), ...]")
        terms["cos"] = loss.a_cos, hidden_cosine_loss(hidden_pairs, loss.cos_tokens)
    if loss.distillation_token != "none" and loss.a_dist:
        if dist_logits is None:
            raise ValueError(f"distillation_token={loss.distillation_token!r} needs dist_logits (the "
                             "distillation token head's logits)")
        terms["dist"] = loss.a_dist, distillation_token_loss(
            dist_logits, teacher_logits, loss.distillation_token, loss.temperature)
    total = sum((w * value for w, value in terms.values()), student_logits.new_zeros(()))
    return total, {name: value.detach() for name, (_, value) in terms.items()}


class DistillationLoss(nn.Module):
    """`distillation_loss` as a module holding its weights and the class weights (a buffer, so it moves
    with the module). Defaults are the authors' code.

    forward(student_logits, teacher_logits, target, hidden_pairs=None, dist_logits=None) returns
    (total, parts) as `distillation_loss`.
    """

    def __init__(
        self,
        a_task: float = 1.0,
        a_kd: float = 0.5,
        temperature: float = 2.0,
        a_mse: float = 0.25,
        a_cos: float = 0.0,
        class_weights: Tensor | None = None,
        cos_tokens: str = "all",
        label_smoothing: float = 0.0,
        distillation_token: str = "none",
        a_dist: float = 1.0,
    ):
        super().__init__()
        if cos_tokens not in COSINE_TOKENS:
            raise ValueError(f"cos_tokens={cos_tokens!r}: expected one of {COSINE_TOKENS}")
        if distillation_token not in DISTILLATION_TOKEN_MODES:
            raise ValueError(f"distillation_token={distillation_token!r}: expected one of {DISTILLATION_TOKEN_MODES}")
        self.config = LossConfig(a_task=a_task, a_kd=a_kd, temperature=temperature, a_mse=a_mse, a_cos=a_cos,
                                 cos_tokens=cos_tokens, distillation_token=distillation_token, a_dist=a_dist)
        self.label_smoothing = TaskLoss(label_smoothing=label_smoothing).label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        hidden_pairs: Sequence[tuple[Tensor, Tensor]] | None = None,
        dist_logits: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        task = TaskLoss(self.class_weights, self.label_smoothing)
        return distillation_loss(student_logits, teacher_logits, target, self.config, task, hidden_pairs, dist_logits)
