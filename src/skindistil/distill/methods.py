"""The distillation methods as data: a registry name -> `Method`, each a plain function over model
outputs, targets, the loss config and the optimiser step, plus how its student starts.

Notation: z_d are the logits of the exit at depth d, N the deepest; `task` is the label cross-entropy
(`TaskLoss`: class weights of `data.imbalance`, `optim.label_smoothing`); the KD loss is
`distillation_loss`: task + KD + logit MSE + hidden cosine (+ the DeiT token term).

- distilvit: the KD loss of the student (a timm ViT with fewer blocks) against the teacher.
- fcvit: sum over depths d of task(z_d, label); no teacher term.
- fcvit-probs (one shared head): task(z_N, label) + a_chain * sum over the enabled depths j of
  KL(softmax(z_{j+1}) detached || softmax(z_j)); depths are enabled top-down on integer optimiser
  steps (`enabled_depths`: chain_warmup_steps, then one more every chain_every_steps).
- full (the paper's open question, combining the three): a teacher-initialised multi-exit ViT with a
  head per depth, trained with the KD loss against the teacher at the last exit (z_N, last hidden
  state) + sum over d < N of task(z_d, label) + a_chain * the chained per-depth KL, same schedule.
- cascade: a chain of distilvit runs, each member the first k blocks of the one above it
  (`cascade_plan`).

With the DeiT distillation token (loss.distillation_token soft | hard; the student is a distilled
ViT, `models.distilled`), the KD loss reads the class-token head and adds a_dist * the token term on
the distillation head (in `full`: at the last exit; the other exits are trained on the mean of their
two heads, the logits they predict with). Without it, a distilled student is trained on its output.

Adding a method: one function `loss(student, teacher, target, loss, task, step) -> (loss, parts)`
registered with `register`, and its test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from skindistil.config import LossConfig
from skindistil.distill.losses import (
    TaskLoss,
    chained_depth_kl,
    distillation_loss,
    enabled_depths,
    per_depth_ce,
)
from skindistil.errors import ConfigError
from skindistil.models.distilled import (
    add_distillation_token,
    head_logits,
    is_distilled,
    without_distillation_token,
)
from skindistil.models.multi_exit import MultiExitViT, block_tokens
from skindistil.models.student import extract_student


@dataclass
class StudentOutputs:
    """What the methods read of the student on one batch.

    all_logits: [D, B, C], every exit's logits as it predicts (D = 1 for a plain ViT). logits: [B, C],
    the last exit's logits the KD terms act on (the class-token head's when the distillation token is
    trained, else the prediction). dist_logits: [B, C], the last exit's distillation-token head, only
    when the token is trained. hidden: [B, N, E], the last block's tokens before the final norm without
    a distillation token, only when asked for (the hidden-state cosine).
    """

    all_logits: Tensor
    logits: Tensor
    dist_logits: Tensor | None = None
    hidden: Tensor | None = None


@dataclass
class TeacherOutputs:
    """The teacher on one batch: logits [B, C]; hidden [B, N, E] (last block, before the final norm,
    without a distillation token) or None when the cosine term is off."""

    logits: Tensor
    hidden: Tensor | None = None


LossFn = Callable[[StudentOutputs, "TeacherOutputs | None", Tensor, LossConfig, TaskLoss, int],
                  tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Method:
    """A registered distillation method: its loss function, whether it has a teacher term (and so
    needs the teacher, and can train a distillation token), and how its student is built: a plain ViT
    of the kept blocks (`exits` None) or a multi-exit ViT with a head after every block (`shared_head`:
    one head for all)."""

    name: str
    loss: LossFn
    teacher: bool
    exits: bool
    shared_head: bool = False


REGISTRY: dict[str, Method] = {}


def register(name: str, *, teacher: bool, exits: bool, shared_head: bool = False):
    """Decorator adding a loss function to `REGISTRY` under `name`."""
    def add(fn: LossFn) -> LossFn:
        if name in REGISTRY:
            raise ValueError(f"distillation method {name!r} is already registered")
        REGISTRY[name] = Method(name, fn, teacher, exits, shared_head)
        return fn
    return add


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"method {name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def token_methods() -> tuple[str, ...]:
    """The methods with a teacher term, the only ones that can train a distillation token."""
    return tuple(name for name, method in REGISTRY.items() if method.teacher)


# ------------------------------------------------------------------------------------------- methods


def _kd(student: StudentOutputs, teacher: TeacherOutputs | None, target: Tensor, loss: LossConfig,
        task: TaskLoss) -> tuple[Tensor, dict[str, Tensor]]:
    if teacher is None:
        raise ValueError("this method distills from a teacher: give its outputs")
    pairs = [(student.hidden, teacher.hidden)] if loss.a_cos else None
    return distillation_loss(student.logits, teacher.logits, target, loss, task, hidden_pairs=pairs,
                             dist_logits=student.dist_logits)


def _chain(student: StudentOutputs, loss: LossConfig, step: int) -> tuple[Tensor, list[int]]:
    depths = enabled_depths(step, student.all_logits.shape[0], loss.chain_warmup_steps, loss.chain_every_steps)
    return chained_depth_kl(student.all_logits, depths), depths


@register("distilvit", teacher=True, exits=False)
def distilvit(student: StudentOutputs, teacher: TeacherOutputs | None, target: Tensor, loss: LossConfig,
              task: TaskLoss, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """SkinDistilViT: the KD loss of the student's last exit against the teacher."""
    return _kd(student, teacher, target, loss, task)


@register("fcvit", teacher=False, exits=True)
def fcvit(student: StudentOutputs, teacher: TeacherOutputs | None, target: Tensor, loss: LossConfig,
          task: TaskLoss, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """FCViT: sum over depths of task(z_d, label). Part: per_depth_ce."""
    total = per_depth_ce(student.all_logits, target, task)
    return total, {"per_depth_ce": total.detach()}


@register("fcvit-probs", teacher=False, exits=True, shared_head=True)
def fcvit_probs(student: StudentOutputs, teacher: TeacherOutputs | None, target: Tensor, loss: LossConfig,
                task: TaskLoss, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """FCViTProbs: task(z_N, label) + a_chain * chained KL over the depths enabled at `step`.
    Parts: task, chain_kl, enabled_depths (a count)."""
    last = task(student.all_logits[-1], target)
    chain, depths = _chain(student, loss, step)
    total = last + loss.a_chain * chain
    return total, {"task": last.detach(), "chain_kl": chain.detach(), "enabled_depths": float(len(depths))}


@register("full", teacher=True, exits=True)
def full(student: StudentOutputs, teacher: TeacherOutputs | None, target: Tensor, loss: LossConfig,
         task: TaskLoss, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """KD loss at the last exit + sum over the exits below it of task(z_d, label) + a_chain * chained
    KL over the depths enabled at `step`. Parts: the KD loss's, chain_kl, enabled_depths."""
    kd, parts = _kd(student, teacher, target, loss, task)
    chain, depths = _chain(student, loss, step)
    total = kd + per_depth_ce(student.all_logits[:-1], target, task) + loss.a_chain * chain
    return total, {**parts, "chain_kl": chain.detach(), "enabled_depths": float(len(depths))}


# ------------------------------------------------------------------------------------ student outputs


def student_outputs(student: nn.Module, images: Tensor, *, token: bool = False, hidden: bool = False) -> StudentOutputs:
    """Run `student` (a timm ViT, or a `MultiExitViT`) on images [B, 3, H, W] once and collect what the
    methods read (`StudentOutputs`). `token`: the distillation token is trained, so the last exit's two
    heads are returned apart; `hidden`: also return the last block's tokens."""
    if isinstance(student, MultiExitViT):
        vit = student.vit
        all_logits, tokens = student.forward_all(images, return_hidden=True)
        logits, dist_logits = all_logits[-1], None
        if token:
            logits, dist_logits = student.exit_head_logits(student.num_exits - 1, tokens)
    else:
        vit = student
        (tokens,) = block_tokens(vit, images, [len(vit.blocks)])
        logits, dist_logits = head_logits(vit, tokens)
        if dist_logits is not None and not token:
            logits, dist_logits = (logits + dist_logits) / 2, None  # trained on its output, as it predicts
        all_logits = ((logits + dist_logits) / 2 if dist_logits is not None else logits)[None]
    return StudentOutputs(all_logits, logits, dist_logits, without_distillation_token(vit, tokens) if hidden else None)


# ------------------------------------------------------------------------------ student initialisation


def initial_student(method: str, start: nn.Module, *, keep_blocks: int | Sequence[int] = 6,
                    block_selection: str = "first", token: bool = False) -> tuple[nn.Module, list[int]]:
    """The student `method` trains, built from timm ViT `start` (left untouched), and the blocks of
    `start` it keeps (0-based).

    A method without exits keeps `keep_blocks` blocks chosen by `block_selection` (`extract_student`); a method with
    exits keeps every block and gets a head after each (`MultiExitViT`, shared by all exits when the method
    says so). `token`: add a DeiT distillation token and head when `start` has none.
    Raises ModelError (from the model layer) for a `start` that cannot be cut or given a token.
    """
    spec = get_method(method)
    if spec.exits:
        vit, kept = copy.deepcopy(start), list(range(len(start.blocks)))
    else:
        vit, kept = extract_student(start, keep_blocks, block_selection)
    if token and not is_distilled(vit):
        vit = add_distillation_token(vit)
    return (MultiExitViT(vit, exits="all", shared_head=spec.shared_head) if spec.exits else vit), list(kept)


# ------------------------------------------------------------------------------------------- cascade


@dataclass(frozen=True)
class CascadeMember:
    """One member of a cascade: a ViT of `depth` blocks initialised with the first `depth` blocks of the
    model of depth `source` (the teacher for the first member) and distilled from it by distilvit."""

    depth: int
    source: int
    from_teacher: bool

    @property
    def kept_blocks(self) -> list[int]:
        return list(range(self.depth))


def cascade_plan(teacher_depth: int, min_depth: int) -> list[CascadeMember]:
    """The cascade (SPEC.md): members of depth teacher_depth - 1 down to `min_depth`, each from the one
    a block deeper. Raises ConfigError naming min_depth unless 1 <= min_depth < teacher_depth."""
    if not 1 <= min_depth < teacher_depth:
        raise ConfigError(f"min_depth: {min_depth} must be in 1..{teacher_depth - 1} for a {teacher_depth}-block teacher")
    return [CascadeMember(depth, depth + 1, depth + 1 == teacher_depth)
            for depth in range(teacher_depth - 1, min_depth - 1, -1)]
