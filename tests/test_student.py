"""Student extraction: block selection rules, exact copies, parameter count of SkinDistilViT."""

from __future__ import annotations

import pytest
import torch

from skindistil.errors import ModelError
from skindistil.models import create_teacher, extract_student, select_blocks


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_teacher(num_classes=8, embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8).eval()


def test_uniform_reproduces_distilberts_12_to_6_pattern():
    assert select_blocks(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]
    assert select_blocks(12, 2, "uniform") == [0, 11]
    assert select_blocks(12, 12, "uniform") == list(range(12))
    assert select_blocks(12, 1, "uniform") == [0]


def test_first_and_explicit_selection():
    assert select_blocks(12, 6, "first") == [0, 1, 2, 3, 4, 5]
    assert select_blocks(12, [1, 5, 11]) == [1, 5, 11]


@pytest.mark.parametrize(
    "keep_blocks, block_selection, message",
    [
        ([2, 1], "first", "ascending and unique"),
        ([1, 1], "first", "ascending and unique"),
        ([0, 12], "first", r"in 0\.\.11"),
        ([-1, 3], "first", r"in 0\.\.11"),
        ([], "first", "non-empty"),
        (0, "first", "between 1 and"),
        (13, "first", "between 1 and"),
        (6, "random", r"block_selection=.random.: choose from first, uniform"),
        (True, "first", "int or a list"),
    ],
)
def test_invalid_selections_raise_model_error(keep_blocks, block_selection, message):
    with pytest.raises(ModelError, match=message):
        select_blocks(12, keep_blocks, block_selection)


def test_keeping_every_block_reproduces_the_teacher_exactly(teacher):
    student, kept = extract_student(teacher, 4)
    assert kept == [0, 1, 2, 3]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_student_runs_the_kept_blocks_in_order_and_leaves_the_teacher_alone(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, kept = extract_student(teacher, [0, 2])
    assert kept == [0, 2] and len(student.blocks) == 2 and len(teacher.blocks) == 4
    assert [f["module"] for f in student.feature_info] == ["blocks.0", "blocks.1"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = teacher.patch_embed(x)
        tokens = teacher.blocks[2](teacher.blocks[0](teacher._pos_embed(tokens)))
        expected = teacher.head(teacher.norm(tokens)[:, 0])
        assert torch.allclose(student(x), expected, atol=1e-6)
        for p in student.parameters():
            p.add_(1.0)  # a deep copy: the teacher must not see this
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_non_vit_teacher_is_refused():
    with pytest.raises(ModelError, match="needs a timm VisionTransformer"):
        extract_student(torch.nn.Linear(2, 2), 1)


def test_six_of_twelve_vit_b16_blocks_is_half_the_parameters():
    teacher = create_teacher("vit_base_patch16_224", num_classes=8)
    student, kept = extract_student(teacher, 6, "uniform")
    assert kept == [0, 2, 4, 7, 9, 11]
    reduction = 100 * (1 - _num_params(student) / _num_params(teacher))
    assert reduction == pytest.approx(49.5, abs=0.5)
