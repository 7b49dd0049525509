"""Distillation losses against direct computations (loops and textbook formulas), and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from skindistil.distill.losses import (
    DistillationLoss,
    chained_depth_kl,
    distillation_token_loss,
    enabled_depths,
    hidden_cosine_loss,
    kd_loss,
    logit_mse,
    per_depth_ce,
    task_loss,
)

B, C = 5, 4


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    target = torch.tensor([0, 3, 1, 1, 2])
    return student, teacher, target


def _softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_task_loss_matches_the_weighted_smoothed_formula(logits):
    student, _, target = logits
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    eps = 0.1
    numerator = denominator = 0.0
    for i in range(B):
        logp = [math.log(p) for p in _softmax(student[i].tolist())]
        y = int(target[i])
        # PyTorch: (1 - eps) * w_y * (-log p_y) + eps / C * sum_c w_c * (-log p_c), mean over sum of w_y
        numerator += (1 - eps) * weight[y] * -logp[y] + eps / C * sum(weight[c] * -logp[c] for c in range(C))
        denominator += weight[y]
    assert task_loss(student, target, weight, eps).item() == pytest.approx(float(numerator / denominator), rel=1e-9)
    plain = sum(-math.log(_softmax(student[i].tolist())[int(target[i])]) for i in range(B)) / B
    assert task_loss(student, target).item() == pytest.approx(plain, rel=1e-9)


def test_kd_loss_is_t_squared_batch_mean_kl_teacher_to_student(logits):
    student, teacher, _ = logits
    t = 2.0
    total = 0.0
    for i in range(B):
        p_t, p_s = _softmax(teacher[i].tolist(), t), _softmax(student[i].tolist(), t)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    assert kd_loss(student, teacher, t).item() == pytest.approx(t * t * total / B, rel=1e-9)
    assert kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-12)


def test_logit_mse_sums_over_classes_and_averages_over_the_batch(logits):
    student, teacher, _ = logits
    expected = sum((student[i, c] - teacher[i, c]) ** 2 for i in range(B) for c in range(C)) / B
    assert logit_mse(student, teacher).item() == pytest.approx(float(expected), rel=1e-12)


def _cos(u, v):
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def test_hidden_cosine_over_all_tokens_class_token_and_a_layer_map():
    g = torch.Generator().manual_seed(1)
    s1, t1, s2, t2 = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) for _ in range(4))
    all_tokens = 1 - sum(_cos(s1[b, n].tolist(), t1[b, n].tolist()) for b in range(2) for n in range(3)) / 6
    cls_only = 1 - sum(_cos(s1[b, 0].tolist(), t1[b, 0].tolist()) for b in range(2)) / 2
    assert hidden_cosine_loss([(s1, t1)]).item() == pytest.approx(all_tokens, rel=1e-9)
    assert hidden_cosine_loss([(s1, t1)], tokens="cls").item() == pytest.approx(cls_only, rel=1e-9)
    pair_mean = (hidden_cosine_loss([(s1, t1)]) + hidden_cosine_loss([(s2, t2)])) / 2
    assert hidden_cosine_loss([(s1, t1), (s2, t2)]).item() == pytest.approx(pair_mean.item(), rel=1e-12)
    assert hidden_cosine_loss([(s1, s1)]).item() == pytest.approx(0.0, abs=1e-12)
    assert hidden_cosine_loss([(s1, -s1)]).item() == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError, match="tokens="):
        hidden_cosine_loss([(s1, t1)], tokens="mean")


def test_per_depth_ce_is_the_sum_of_each_depths_cross_entropy(logits):
    student, teacher, target = logits
    stacked = torch.stack([student, teacher, student * 0.5])
    expected = sum(task_loss(z, target) for z in (student, teacher, student * 0.5))
    assert per_depth_ce(stacked, target).item() == pytest.approx(expected.item(), rel=1e-12)


def test_chained_kl_sums_enabled_depths_and_only_trains_the_lower_one():
    g = torch.Generator().manual_seed(2)
    stacked = torch.randn(4, B, C, generator=g, dtype=torch.float64, requires_grad=True)
    expected = 0.0
    for j in (1, 2):
        for i in range(B):
            p_upper, p_lower = _softmax(stacked[j + 1, i].tolist()), _softmax(stacked[j, i].tolist())
            expected += sum(u * math.log(u / low) for u, low in zip(p_upper, p_lower, strict=True)) / B
    loss = chained_depth_kl(stacked, [1, 2, 3], weight=50.0)  # depth 3 is the last: nothing above it
    assert loss.item() == pytest.approx(50.0 * expected, rel=1e-9)
    loss.backward()
    grad_per_depth = stacked.grad.abs().sum(dim=(1, 2))
    assert grad_per_depth[0] == 0 and grad_per_depth[3] == 0  # not enabled / only a (detached) target
    assert grad_per_depth[1] > 0 and grad_per_depth[2] > 0
    assert chained_depth_kl(stacked, [3]).item() == 0.0


def test_depth_schedule_fires_top_down_on_integer_steps():
    assert [enabled_depths(s, 4, 10, 5) for s in (0, 9, 10, 14, 15, 19, 20, 1000)] == [
        [3], [3], [2, 3], [2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3],
    ]
    # the paper's 12 depths with the config defaults: every depth is enabled after 100 + 10 * 50 steps
    counts = [len(enabled_depths(step, 12, 100, 50)) for step in range(700)]
    assert counts[99] == 1 and counts[100] == 2 and counts[599] == 11 and counts[600] == 12
    assert counts == sorted(counts)
    with pytest.raises(TypeError):
        enabled_depths(100.0, 12, 100, 50)  # a float step is refused, not silently never matched
    with pytest.raises(ValueError, match="every_steps >= 1"):
        enabled_depths(0, 12, 100, 0)


def test_distillation_loss_is_the_weighted_sum_of_its_parts(logits):
    student, teacher, target = logits
    g = torch.Generator().manual_seed(3)
    hidden = [(torch.randn(B, 3, 6, generator=g, dtype=torch.float64), torch.randn(B, 3, 6, generator=g, dtype=torch.float64))]
    criterion = DistillationLoss(a_task=1.0, a_kd=0.5, temperature=2.0, a_mse=0.25, a_cos=0.1)
    total, parts = criterion(student, teacher, target, hidden_pairs=hidden)
    assert set(parts) == {"task", "kd", "mse", "cos"}
    assert parts["task"] == task_loss(student, target) and parts["kd"] == kd_loss(student, teacher, 2.0)
    assert parts["mse"] == logit_mse(student, teacher) and parts["cos"] == hidden_cosine_loss(hidden)
    expected = parts["task"] + 0.5 * parts["kd"] + 0.25 * parts["mse"] + 0.1 * parts["cos"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)


def test_distillation_loss_defaults_weights_and_missing_hidden_states(logits):
    student, teacher, target = logits
    defaults = DistillationLoss()
    weights = defaults.config
    assert (weights.a_task, weights.a_kd, weights.temperature, weights.a_mse, weights.a_cos) == (1.0, 0.5, 2.0, 0.25, 0.0)
    total, parts = defaults(student, teacher, target)
    assert set(parts) == {"task", "kd", "mse"}
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    _, weighted = DistillationLoss(class_weights=weight)(student, teacher, target)
    assert weighted["task"] == task_loss(student, target, weight)
    with pytest.raises(ValueError, match="hidden_pairs"):
        DistillationLoss(a_cos=1.0)(student, teacher, target)


def test_distillation_loss_module_passes_every_option_through(logits):
    """Every constructor option reaches its term (the class of bug where an option is accepted and dropped)."""
    student, teacher, target = logits
    g = torch.Generator().manual_seed(4)
    hidden = [(torch.randn(B, 3, 6, generator=g, dtype=torch.float64), torch.randn(B, 3, 6, generator=g, dtype=torch.float64))]
    dist = torch.randn(B, C, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    criterion = DistillationLoss(a_task=2.0, a_kd=0.3, temperature=3.0, a_mse=0.7, a_cos=0.2, class_weights=weight,
                                 cos_tokens="cls", label_smoothing=0.1, distillation_token="soft", a_dist=0.4)
    total, parts = criterion(student, teacher, target, hidden_pairs=hidden, dist_logits=dist)
    expected = (2.0 * task_loss(student, target, weight, 0.1) + 0.3 * kd_loss(student, teacher, 3.0)
                + 0.7 * logit_mse(student, teacher) + 0.2 * hidden_cosine_loss(hidden, tokens="cls")
                + 0.4 * distillation_token_loss(dist, teacher, "soft", 3.0))
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    assert parts["task"].item() == pytest.approx(task_loss(student, target, weight, 0.1).item(), rel=1e-12)
    defaults = DistillationLoss().config
    assert (defaults.distillation_token, defaults.a_dist, defaults.cos_tokens) == ("none", 1.0, "all")
    with pytest.raises(ValueError, match="cos_tokens"):
        DistillationLoss(cos_tokens="mean")
    assert "class_weights" not in criterion.state_dict()  # a run input, not state: never saved


def test_distillation_token_loss_defaults_to_hard_and_per_depth_ce_of_no_depth_is_zero(logits):
    student, teacher, target = logits
    assert distillation_token_loss(student, teacher) == distillation_token_loss(student, teacher, "hard")
    assert distillation_token_loss(student, teacher) != distillation_token_loss(student, teacher, "soft")
    soft_default = distillation_token_loss(student, teacher, "soft")
    assert soft_default == distillation_token_loss(student, teacher, "soft", 1.0)
    assert soft_default != distillation_token_loss(student, teacher, "soft", 2.0)
    none = per_depth_ce(student[None][:0], target)
    assert torch.is_tensor(none) and none.item() == 0.0


def test_boundaries_defaults_and_refusals(logits):
    from skindistil.config import LossConfig
    from skindistil.distill.losses import TaskLoss, distillation_loss

    student, teacher, target = logits
    assert kd_loss(student, teacher) == kd_loss(student, teacher, 2.0)  # the authors' T
    assert TaskLoss(label_smoothing=1.0).label_smoothing == 1.0  # the closed end of [0, 1] is allowed
    assert enabled_depths(0, 1, 0, 1) == [0]  # a single depth is a valid chain of one
    with pytest.raises(ValueError, match="num_depths >= 1"):
        enabled_depths(0, 0, 5, 1)
    with pytest.raises(ValueError, match="at least one"):
        hidden_cosine_loss([])
    with pytest.raises(ValueError, match="cos_tokens='mean'"):
        distillation_loss(student, teacher, target, LossConfig(cos_tokens="mean"), TaskLoss())
    with pytest.raises(ValueError, match="distillation_token='soft-ish'"):
        distillation_loss(student, teacher, target, LossConfig(distillation_token="soft-ish"), TaskLoss())
    with pytest.raises(ValueError, match="needs dist_logits"):
        distillation_loss(student, teacher, target, LossConfig(distillation_token="hard"), TaskLoss())
    with pytest.raises(ValueError, match="a_cos > 0 needs hidden_pairs"):
        distillation_loss(student, teacher, target, LossConfig(a_cos=0.1), TaskLoss())
    nothing, parts = distillation_loss(student, teacher, target, LossConfig(a_task=0, a_kd=0, a_mse=0), TaskLoss())
    assert torch.is_tensor(nothing) and nothing.item() == 0.0 and parts == {}
