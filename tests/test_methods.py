"""The registered distillation methods against direct computations on tiny tensors, and the
LightningModule calling them on tiny ViTs: each test fails for a specific break of the method
(teacher ignored, per-depth CE dropped, chained KL dropped, label smoothing or class weights dropped)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skindistil.config import LossConfig, OptimConfig
from skindistil.distill.losses import TaskLoss
from skindistil.distill.methods import (
    REGISTRY,
    StudentOutputs,
    TeacherOutputs,
    cascade_plan,
    get_method,
    initial_student,
    student_outputs,
    token_methods,
)
from skindistil.errors import ConfigError
from skindistil.models import MultiExitViT, create_teacher
from skindistil.training.distiller import DistillerModule

D, B, C, N, E = 3, 5, 4, 3, 6
ALL_ENABLED = 10**6  # a step at which the chain schedule has enabled every depth
LOSS = LossConfig(a_task=1.0, a_kd=0.5, temperature=2.0, a_mse=0.25, a_cos=0.1, a_chain=50.0,
                  chain_warmup_steps=2, chain_every_steps=3)
CLASSES = ["MEL", "NV", "BCC", "AK"]


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    all_logits = torch.randn(D, B, C, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, C, generator=g, dtype=torch.float64) * 3
    student_hidden, teacher_hidden = (torch.randn(B, N, E, generator=g, dtype=torch.float64) for _ in range(2))
    target = torch.tensor([0, 3, 1, 1, 2])
    return all_logits, teacher, student_hidden, teacher_hidden, target


def _call(method, all_logits, teacher, s_hidden, t_hidden, target, loss=LOSS, task=None, step=ALL_ENABLED):
    task = task or TaskLoss()
    student = StudentOutputs(all_logits, all_logits[-1], None, s_hidden)
    return get_method(method).loss(student, TeacherOutputs(teacher, t_hidden), target, loss, task, step)


# direct formulas, written out independently of skindistil.distill.losses
def _ce(z, y, eps=0.0, weight=None):
    return F.cross_entropy(z, y, weight=weight, label_smoothing=eps)


def _kd(z, t, temp):
    p_t = (t / temp).softmax(-1)
    return (p_t * ((t / temp).log_softmax(-1) - (z / temp).log_softmax(-1))).sum(-1).mean() * temp**2


def _mse(z, t):
    return ((z - t) ** 2).sum(-1).mean()


def _cos(s, t):
    return 1 - F.cosine_similarity(s, t, dim=-1).mean()


def _chain(all_logits, lowest):
    """Sum over j = lowest..D-2 of batch-mean KL(softmax(z_{j+1}) || softmax(z_j))."""
    total = 0.0
    for j in range(lowest, all_logits.shape[0] - 1):
        p_up = all_logits[j + 1].softmax(-1)
        total = total + (p_up * (p_up.log() - all_logits[j].log_softmax(-1))).sum(-1).mean()
    return total


def _kd_total(z, t, s_hidden, t_hidden, y, loss=LOSS, eps=0.0):
    return (loss.a_task * _ce(z, y, eps) + loss.a_kd * _kd(z, t, loss.temperature) + loss.a_mse * _mse(z, t)
            + loss.a_cos * _cos(s_hidden, t_hidden))


def test_the_registry_holds_the_papers_methods():
    assert list(REGISTRY) == ["distilvit", "fcvit", "fcvit-probs", "full"]
    assert token_methods() == ("distilvit", "full")
    assert [(m.exits, m.shared_head) for m in REGISTRY.values()] == [(False, False), (True, False), (True, True),
                                                                     (True, False)]
    with pytest.raises(ValueError, match="expected one of distilvit, fcvit, fcvit-probs, full"):
        get_method("cascade")


@pytest.mark.parametrize("method", list(REGISTRY))
def test_each_method_is_its_formula(method):
    z, t, sh, th, y = _tensors()
    total, parts = _call(method, z, t, sh, th, y)
    expected = {
        "distilvit": _kd_total(z[-1], t, sh, th, y),
        "fcvit": sum(_ce(z[d], y) for d in range(D)),
        "fcvit-probs": _ce(z[-1], y) + LOSS.a_chain * _chain(z, 0),
        "full": _kd_total(z[-1], t, sh, th, y) + sum(_ce(z[d], y) for d in range(D - 1)) + LOSS.a_chain * _chain(z, 0),
    }[method]
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    assert not any(torch.is_tensor(v) and v.requires_grad for v in parts.values())


@pytest.mark.parametrize("method", ["distilvit", "full"])
def test_the_teacher_term_reads_the_teachers_logits(method):
    z, t, sh, th, y = _tensors()
    other = t.flip(-1) + 1.0
    changed = _call(method, z, other, sh, th, y)[0] - _call(method, z, t, sh, th, y)[0]
    torch.testing.assert_close(changed, LOSS.a_kd * (_kd(z[-1], other, 2.0) - _kd(z[-1], t, 2.0))
                               + LOSS.a_mse * (_mse(z[-1], other) - _mse(z[-1], t)))
    assert abs(float(changed)) > 1e-3
    # without the logit terms the teacher's logits do not enter the loss at all
    no_logit_terms = LossConfig(a_kd=0.0, a_mse=0.0, a_cos=0.1)
    torch.testing.assert_close(_call(method, z, other, sh, th, y, no_logit_terms)[0],
                               _call(method, z, t, sh, th, y, no_logit_terms)[0], rtol=0, atol=0)


@pytest.mark.parametrize("method", list(REGISTRY))
def test_label_smoothing_changes_every_label_term(method):
    z, t, sh, th, y = _tensors()
    eps = 0.2
    plain, _ = _call(method, z, t, sh, th, y, task=TaskLoss())
    smoothed, _ = _call(method, z, t, sh, th, y, task=TaskLoss(label_smoothing=eps))
    label_exits = {"distilvit": [D - 1], "fcvit": range(D), "fcvit-probs": [D - 1], "full": range(D)}[method]
    expected = sum(_ce(z[d], y, eps) - _ce(z[d], y) for d in label_exits)
    torch.testing.assert_close(smoothed - plain, expected, rtol=1e-10, atol=1e-12)
    assert abs(float(expected)) > 1e-3


@pytest.mark.parametrize("method", list(REGISTRY))
def test_class_weights_weigh_every_label_term(method):
    z, t, sh, th, y = _tensors()
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    plain, _ = _call(method, z, t, sh, th, y, task=TaskLoss())
    weighted, _ = _call(method, z, t, sh, th, y, task=TaskLoss(class_weights=weight))
    label_exits = {"distilvit": [D - 1], "fcvit": range(D), "fcvit-probs": [D - 1], "full": range(D)}[method]
    expected = sum(_ce(z[d], y, weight=weight) - _ce(z[d], y) for d in label_exits)
    torch.testing.assert_close(weighted - plain, expected, rtol=1e-10, atol=1e-12)


def test_label_smoothing_out_of_range_is_refused_by_name():
    for bad in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match="optim.label_smoothing"):
            TaskLoss(label_smoothing=bad)


@pytest.mark.parametrize("method", ["fcvit-probs", "full"])
def test_gradients_reach_each_lower_exit_through_the_chained_term(method):
    z, t, sh, th, y = _tensors()

    def exit_grads(a_chain, step=ALL_ENABLED):
        leaf = z.clone().requires_grad_(True)
        loss = LossConfig(**{**LOSS.__dict__, "a_chain": a_chain})
        _call(method, leaf, t, sh, th, y, loss, step=step)[0].backward()
        return leaf.grad

    chain_grad = exit_grads(50.0) - exit_grads(0.0)
    for j in range(D - 1):
        assert chain_grad[j].abs().max() > 1e-3, f"no chained-KL gradient at exit {j + 1}"
    # the upper depth of each pair is a detached target: the last exit gets nothing from the chain
    assert chain_grad[D - 1].abs().max() == 0
    # during the warm-up only the last depth is enabled: no chain gradient below it
    warmup = exit_grads(50.0, step=0) - exit_grads(0.0, step=0)
    assert warmup.abs().max() == 0


def test_the_chain_schedule_enables_depths_on_the_step():
    z, t, sh, th, y = _tensors()
    counts = [_call("fcvit-probs", z, t, sh, th, y, step=s)[1]["enabled_depths"] for s in (0, 1, 2, 4, 5, 100)]
    assert counts == [1, 1, 2, 2, 3, 3]
    _, parts = _call("fcvit-probs", z, t, sh, th, y, step=2)
    torch.testing.assert_close(parts["chain_kl"], _chain(z, 1))


def test_full_contains_the_per_depth_cross_entropy():
    z, t, sh, th, y = _tensors()
    no_chain = LossConfig(**{**LOSS.__dict__, "a_chain": 0.0})
    full, _ = _call("full", z, t, sh, th, y, no_chain)
    last_only, _ = _call("distilvit", z[-1:], t, sh, th, y, no_chain)
    torch.testing.assert_close(full - last_only, sum(_ce(z[d], y) for d in range(D - 1)), rtol=1e-10, atol=1e-12)
    lower_changed = z.clone()
    lower_changed[0] = lower_changed[0].flip(-1)
    assert abs(float(_call("full", lower_changed, t, sh, th, y, no_chain)[0] - full)) > 1e-3


def test_the_cascade_plan_chains_each_member_to_the_one_above():
    plan = cascade_plan(4, 2)
    assert [(m.depth, m.source, m.from_teacher, m.kept_blocks) for m in plan] == [
        (3, 4, True, [0, 1, 2]), (2, 3, False, [0, 1])]
    assert [m.depth for m in cascade_plan(12, 1)] == list(range(11, 0, -1))
    for bad in (0, 4):
        with pytest.raises(ConfigError, match=f"min_depth: {bad} must be in 1..3"):
            cascade_plan(4, bad)


# ------------------------------------------------------------------------------ on tiny ViTs


def _vit(depth=3, seed=0):
    torch.manual_seed(seed)
    model = create_teacher("vit_base_patch16_224", len(CLASSES), depth=depth, embed_dim=32, num_heads=2,
                           img_size=32, patch_size=8)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_initial_students_per_method():
    start = _vit(4)
    student, kept = initial_student("distilvit", start, keep_blocks=[0, 3])
    assert kept == [0, 3] and len(student.blocks) == 2
    torch.testing.assert_close(student.blocks[1].mlp.fc1.weight, start.blocks[3].mlp.fc1.weight, rtol=0, atol=0)
    for method, shared in (("fcvit", False), ("fcvit-probs", True), ("full", False)):
        model, kept = initial_student(method, start, keep_blocks=2)
        assert isinstance(model, MultiExitViT) and model.shared_head == shared and kept == [0, 1, 2, 3]
        assert model.exits == [1, 2, 3, 4] and model.vit is not start
    token_student, _ = initial_student("distilvit", start, keep_blocks=2, token=True)
    assert token_student.num_prefix_tokens == 2 and start.num_prefix_tokens == 1


def _module(method, label_smoothing=0.0, teacher_seed=1, loss=None, weights=None):
    start = _vit(3)
    student, _ = initial_student(method, start, keep_blocks=2)
    loss = loss or LossConfig(a_cos=0.1, chain_warmup_steps=0, chain_every_steps=1)
    return DistillerModule(student, _vit(3, seed=teacher_seed).eval(), method, CLASSES,
                           OptimConfig(label_smoothing=label_smoothing), loss, class_weights=weights)


def _images():
    torch.manual_seed(5)
    return torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("method", list(REGISTRY))
def test_the_module_honours_label_smoothing_and_class_weights(method):
    images, y = _images()
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    plain, _ = _module(method, weights=weights).training_loss((images, y))
    smoothed_module = _module(method, label_smoothing=0.3, weights=weights)
    smoothed, _ = smoothed_module.training_loss((images, y))
    with torch.no_grad():
        z = student_outputs(smoothed_module.student, images).all_logits
    label_exits = [len(z) - 1] if method in ("distilvit", "fcvit-probs") else range(len(z))
    expected = sum(_ce(z[d], y, 0.3, weights) - _ce(z[d], y, 0.0, weights) for d in label_exits)
    torch.testing.assert_close(smoothed - plain, expected, rtol=1e-4, atol=1e-6)
    assert abs(float(expected)) > 1e-3


@pytest.mark.parametrize("method", ["distilvit", "full"])
def test_the_module_distils_from_the_teacher(method):
    images, y = _images()
    module = _module(method)
    loss, parts = module.training_loss((images, y))
    with torch.no_grad():
        student = student_outputs(module.student, images).logits
        teacher = module.teacher(images)
    torch.testing.assert_close(parts["kd"], _kd(student, teacher, 2.0))
    torch.testing.assert_close(parts["mse"], _mse(student, teacher))
    other, _ = _module(method, teacher_seed=2).training_loss((images, y))
    assert abs(float(other.detach() - loss.detach())) > 1e-3
    no_logit_terms = LossConfig(a_kd=0.0, a_mse=0.0, chain_warmup_steps=0, chain_every_steps=1)
    same = [_module(method, teacher_seed=s, loss=no_logit_terms).training_loss((images, y))[0] for s in (1, 2)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["fcvit-probs", "full"])
def test_the_module_chains_the_exits(method):
    images, y = _images()
    _, parts = _module(method).training_loss((images, y))
    assert parts["enabled_depths"] == 2 and parts["chain_kl"] > 0  # step 0, no warm-up: the last two depths


def test_a_teacher_method_without_teacher_outputs_is_refused():
    z, _, sh, _, y = _tensors()
    student = StudentOutputs(z, z[-1], None, sh)
    for method in token_methods():
        with pytest.raises(ValueError, match="distills from a teacher"):
            get_method(method).loss(student, None, y, LOSS, TaskLoss(), 0)


def _distilled(depth=3):
    student = initial_student("distilvit", _vit(depth), keep_blocks=depth, token=True)[0]
    for head in (student.head, student.head_dist):  # distinct heads: their logits clearly differ
        torch.nn.init.normal_(head.weight, std=1.0)
    return student.eval()


def test_student_outputs_of_a_distilled_vit_split_or_average_its_heads():
    from skindistil.models.distilled import head_logits

    vit = _distilled()
    images, _ = _images()
    with torch.no_grad():
        prediction = vit(images)
        tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))
        cls_logits, dist_logits = head_logits(vit, tokens)
        plain = student_outputs(vit, images)
        split = student_outputs(vit, images, token=True, hidden=True)
    assert plain.dist_logits is None and plain.hidden is None
    torch.testing.assert_close(plain.logits, prediction)
    torch.testing.assert_close(plain.all_logits, prediction[None])
    torch.testing.assert_close(split.logits, cls_logits)
    torch.testing.assert_close(split.dist_logits, dist_logits)
    torch.testing.assert_close(split.all_logits, prediction[None])
    # the distillation token is left out of the hidden states (class + 16 patch tokens remain)
    torch.testing.assert_close(split.hidden, torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1))


@pytest.mark.parametrize("shared_head", [False, True])
def test_student_outputs_of_a_distilled_multi_exit_vit(shared_head):
    model = MultiExitViT(_distilled(), shared_head=shared_head).eval()
    if not shared_head:
        for head in [*model.exit_heads, *model.exit_dist_heads]:
            torch.nn.init.normal_(head.weight, std=1.0)
    images, _ = _images()
    with torch.no_grad():
        everything, tokens = model.forward_all(images, return_hidden=True)
        cls_logits, dist_logits = model.exit_head_logits(model.num_exits - 1, tokens)
        plain = student_outputs(model, images)
        split = student_outputs(model, images, token=True, hidden=True)
    torch.testing.assert_close(plain.all_logits, everything)
    torch.testing.assert_close(plain.logits, everything[-1])
    assert plain.dist_logits is None and plain.hidden is None
    torch.testing.assert_close(split.logits, cls_logits)
    torch.testing.assert_close(split.dist_logits, dist_logits)
    assert not torch.allclose(split.logits, split.dist_logits)
    torch.testing.assert_close(split.hidden, torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1))


def test_initial_student_options_and_defaults():
    start = _vit(8)
    default, kept = initial_student("distilvit", start)
    assert kept == [0, 1, 2, 3, 4, 5] and default.num_prefix_tokens == 1  # the paper's 6 blocks, no token
    _, uniform = initial_student("distilvit", start, keep_blocks=3, block_selection="uniform")
    assert uniform == [0, 4, 7]
    model, _ = initial_student("full", start)
    assert model.vit.num_prefix_tokens == 1 and model.exits == list(range(1, 9))
    assert model.vit.blocks[0] is not start.blocks[0] and model.vit.patch_embed is not start.patch_embed
    distilled = _distilled()
    again, _ = initial_student("fcvit", distilled, token=True)  # already has the token: kept, not added twice
    assert again.vit.num_prefix_tokens == 2
