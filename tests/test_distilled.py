"""The DeiT distillation token: its loss against direct computation, the distilled student (timm's
VisionTransformerDistilled), per-depth exits and early exit, the artifact, explain and ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skindistil.config import LossConfig, OptimConfig, PreprocessConfig
from skindistil.distill.losses import DistillationLoss, distillation_token_loss, kd_loss, logit_mse
from skindistil.errors import ModelError
from skindistil.inference.explain import (
    attention_rollout,
    explainable,
    recorded_attention,
    rollout,
    unfused_attention,
)
from skindistil.inference.export import collect_images, export_artifact
from skindistil.models import MultiExitViT, create_teacher, load_model, save_artifact
from skindistil.models.distilled import add_distillation_token, head_logits, is_distilled
from skindistil.training.distiller import DistillerModule

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def tiny_vit(depth: int = 3, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_teacher("vit_base_patch16_224", 8, depth=depth, embed_dim=32, num_heads=2, img_size=32,
                          patch_size=8, **kwargs)


def tiny_distilled(depth: int = 3, seed: int = 0):
    model = add_distillation_token(tiny_vit(depth, seed))
    for head in (model.head, model.head_dist):  # large, distinct heads: the two heads clearly disagree
        nn.init.normal_(head.weight, std=1.0)
    return model.eval()


# ------------------------------------------------------------------------------------------- loss


def _kl_by_hand(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = np.exp(t_row / t - np.logaddexp.reduce(t_row / t))
        log_q = s_row / t - np.logaddexp.reduce(s_row / t)
        total += float(np.sum(p * (np.log(p) - log_q)))
    return total


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_token_loss_is_deits_per_logit_kl(temperature):
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 8, generator=gen, dtype=torch.float64), torch.randn(5, 8, generator=gen,
                                                                                         dtype=torch.float64)
    expected = _kl_by_hand(student.numpy(), teacher.numpy(), temperature) * temperature**2 / (5 * 8)
    got = distillation_token_loss(student, teacher, "soft", temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # DeiT divides by the number of logits: the batch-mean KD loss over the class count
    assert got.item() == pytest.approx(kd_loss(student, teacher, temperature).item() / 8, rel=1e-10)


def test_hard_token_loss_is_ce_on_the_teachers_top_class():
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen,
                                                                                         dtype=torch.float64)
    s = student.numpy()
    top = teacher.numpy().argmax(axis=1)
    expected = -np.mean([s[i, top[i]] - np.logaddexp.reduce(s[i]) for i in range(6)])
    assert distillation_token_loss(student, teacher, "hard").item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="soft or hard"):
        distillation_token_loss(student, teacher, "medium")


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_distillation_loss_with_token_sums_its_terms(mode):
    gen = torch.Generator().manual_seed(3)
    cls_logits, dist_logits, teacher = (torch.randn(4, 8, generator=gen) for _ in range(3))
    target = torch.tensor([0, 3, 7, 1])
    loss = DistillationLoss(a_task=1.0, a_kd=0.5, a_mse=0.25, temperature=2.0, distillation_token=mode, a_dist=0.7)
    total, parts = loss(cls_logits, teacher, target, dist_logits=dist_logits)
    assert set(parts) == {"task", "kd", "mse", "dist"}
    expected = (F.cross_entropy(cls_logits, target) + 0.5 * kd_loss(cls_logits, teacher, 2.0)
                + 0.25 * logit_mse(cls_logits, teacher) + 0.7 * distillation_token_loss(dist_logits, teacher, mode, 2.0))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["dist"], distillation_token_loss(dist_logits, teacher, mode, 2.0))
    with pytest.raises(ValueError, match="dist_logits"):
        loss(cls_logits, teacher, target)
    with pytest.raises(ValueError, match="distillation_token"):
        DistillationLoss(distillation_token="yes")


def test_token_term_trains_only_the_distillation_head():
    """With DeiT's token term alone, the class head gets no gradient and the distillation head does."""
    student = add_distillation_token(tiny_vit(2))
    teacher = tiny_vit(3, seed=1).eval()
    loss = LossConfig(a_task=0.0, a_kd=0.0, a_mse=0.0, distillation_token="hard")
    module = DistillerModule(student, teacher, "distilvit", CLASSES, OptimConfig(), loss)
    images = torch.randn(4, 3, 32, 32)
    total, parts = module.training_loss((images, torch.tensor([0, 1, 2, 3])))
    assert set(parts) == {"dist"}
    total.backward()
    assert student.head.weight.grad is None or student.head.weight.grad.abs().max() == 0
    assert student.head_dist.weight.grad.abs().max() > 0
    with torch.no_grad():  # the term is the hard token loss of the distillation head against the teacher
        hidden = student.blocks(student.norm_pre(student._pos_embed(student.patch_embed(images))))
        _, dist_logits = head_logits(student, hidden)
        torch.testing.assert_close(total, distillation_token_loss(dist_logits, teacher(images), "hard"))


def test_token_needs_a_distilled_student_and_a_teacher_method():
    loss = LossConfig(distillation_token="soft")
    with pytest.raises(ValueError, match="distillation token"):
        DistillerModule(tiny_vit(2), tiny_vit(3), "distilvit", CLASSES, OptimConfig(), loss)
    with pytest.raises(ValueError, match="no teacher term"):
        DistillerModule(MultiExitViT(add_distillation_token(tiny_vit(2))), None, "fcvit", CLASSES, OptimConfig(), loss)


# ----------------------------------------------------------------------------------------- model


def test_add_distillation_token_copies_the_vit_and_averages_two_heads():
    vit = tiny_vit(2).eval()
    student = add_distillation_token(vit).eval()
    assert is_distilled(student) and not is_distilled(vit) and student.num_prefix_tokens == 2
    source = vit.state_dict()
    for key, value in student.state_dict().items():
        if key == "pos_embed":  # class token's position, then the same for the distillation token, then patches
            torch.testing.assert_close(value, torch.cat([source[key][:, :1], source[key]], dim=1), rtol=0, atol=0)
        elif key not in ("dist_token", "head_dist.weight", "head_dist.bias"):
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = student.blocks(student.norm_pre(student._pos_embed(student.patch_embed(x))))
        cls_logits, dist_logits = head_logits(student, hidden)
        torch.testing.assert_close(student(x), (cls_logits + dist_logits) / 2)
    with pytest.raises(ModelError, match="already has a distillation token"):
        add_distillation_token(student)
    with pytest.raises(ModelError, match="register tokens"):
        add_distillation_token(tiny_vit(2, reg_tokens=2))
    with pytest.raises(ModelError, match="VisionTransformer"):
        add_distillation_token(create_teacher("resnet18", 8, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8]))


@pytest.mark.parametrize("shared_head", [False, True])
def test_exits_of_a_distilled_vit_average_both_heads_and_truncate_exactly(shared_head):
    model = MultiExitViT(tiny_distilled(3), exits="all", shared_head=shared_head).eval()
    if not shared_head:
        assert len(model.exit_dist_heads) == 2
        for head in [*model.exit_heads, *model.exit_dist_heads]:
            nn.init.normal_(head.weight, std=1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.vit(x))
        all_logits, hidden = model.forward_all(x, return_hidden=True)
        tokens = model.embed(x)
        for index, depth in enumerate(model.exits):
            tokens = model.vit.blocks[depth - 1](tokens)
            cls_logits, dist_logits = model.exit_head_logits(index, tokens)
            assert not torch.allclose(cls_logits, dist_logits)
            torch.testing.assert_close(all_logits[index], (cls_logits + dist_logits) / 2)
            torch.testing.assert_close(model.forward_until(x, depth), all_logits[index])
            truncated = model.truncate(depth).eval()
            assert is_distilled(truncated) and len(truncated.blocks) == depth
            torch.testing.assert_close(truncated(x), all_logits[index])
        logits, used = model.early_exit(x, threshold=0.0)  # every sample leaves at the first exit
        torch.testing.assert_close(logits, all_logits[0])
        assert used.tolist() == [1] * 4


def test_distilled_artifacts_round_trip(tmp_path):
    for name, model in {"vit": tiny_distilled(2), "depth": MultiExitViT(tiny_distilled(3), exits=[2, 3])}.items():
        out = save_artifact(model, tmp_path / name, arch={"name": "deit_base_distilled_patch16_224"},
                            classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
        loaded = load_model(out)
        assert is_distilled(loaded.model) and loaded.config["kind"] == ("vit" if name == "vit" else "depth_vit")
        assert "distillation-token head" in (out / "model_card.md").read_text()
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded.logits(x), model.eval()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------- explain, export


@pytest.mark.parametrize("depth_vit", [False, True])
def test_rollout_of_a_distilled_vit_reads_both_head_tokens(depth_vit):
    vit = tiny_distilled(3)
    model = MultiExitViT(vit) if depth_vit else vit
    x = torch.randn(1, 3, 32, 32)
    heat = attention_rollout(model, x)
    with torch.no_grad(), unfused_attention(model), recorded_attention(model) as maps:
        model(x)
    relevance = rollout(maps)
    rows = relevance[0, :2, 2:].mean(dim=0).clamp(min=0)  # class and distillation tokens over the 4x4 patches
    np.testing.assert_allclose(heat, (rows / rows.sum()).reshape(4, 4).numpy(), rtol=1e-5, atol=1e-7)
    class_only = relevance[0, 0, 2:].clamp(min=0)
    assert not np.allclose(heat, (class_only / class_only.sum()).reshape(4, 4).numpy(), rtol=1e-3, atol=1e-5)
    assert explainable(model) is None


def test_rollout_refuses_a_convnet_clearly():
    cnn = create_teacher("resnet18", 8, layers=[1, 1, 1, 1], channels=[8, 8, 8, 8])
    assert explainable(cnn) is None  # Grad-CAM explains it
    with pytest.raises(ModelError, match="ResNet.*not a ViT.*gradcam"):
        attention_rollout(cnn, torch.randn(1, 3, 32, 32))


def test_onnx_export_of_a_distilled_student_matches_pytorch(tmp_path, ham_root):
    out = save_artifact(tiny_distilled(2), tmp_path / "model", arch={"name": "deit_base_distilled_patch16_224"},
                        classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
    images = collect_images([ham_root / "images"], limit=6).files
    record = export_artifact(out, images=images, tolerance=1e-4)
    assert record["parity"]["ok"] and record["parity"]["images"] == 6
    assert json.loads((out / "export.json").read_text())["parity"]["max_abs_diff"] <= 1e-4
