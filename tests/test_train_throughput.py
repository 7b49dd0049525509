"""Training-throughput benchmark: the raw train step and the comparison with skindistil's training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from skindistil.bench.training import (
    ComparisonSettings,
    markdown_table,
    raw_train_step_throughput,
    run_comparison,
    write_results,
)
from skindistil.data.prepare import prepare_dataset
from skindistil.data.sources import build_source
from skindistil.errors import ConfigError
from skindistil.models import create_teacher, extract_student

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 32, "patch_size": 8}


def tiny_vit(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_teacher("vit_base_patch16_224", num_classes=8, **{**TINY, **overrides})


def test_raw_step_teacher_mode_trains_and_reports_finite_speed():
    model = tiny_vit()
    before = [p.detach().clone() for p in model.parameters()]
    speed = raw_train_step_throughput(model, batch_size=8, image_size=32, steps=4, warmup=1, windows=2)
    assert math.isfinite(speed) and speed > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "no step was taken"


def test_raw_step_distill_mode_leaves_the_teacher_untouched():
    teacher = tiny_vit(depth=4)
    student = extract_student(teacher, 2).model.eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    speed = raw_train_step_throughput(student, 8, 32, steps=4, warmup=1, teacher=teacher, windows=2)
    assert math.isfinite(speed) and speed > 0
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training and not student.training  # modes given back as they were
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))


def test_raw_step_bf16_autocast_runs_on_cpu():
    speed = raw_train_step_throughput(tiny_vit(), 4, 32, steps=2, warmup=1, precision="bf16-mixed", windows=1)
    assert speed > 0


def test_raw_step_rejects_a_precision_it_cannot_reproduce():
    with pytest.raises(ConfigError, match="16-mixed"):
        raw_train_step_throughput(tiny_vit(), 4, 32, steps=1, warmup=0, precision="16-mixed")


def test_comparison_runner_reports_both_figures_for_train_and_distill(tmp_path):
    data_dir = tmp_path / "data"
    prepare_dataset(build_source("synthetic", "120", image_size=40), data_dir, short_side=40, workers=0,
                    progress=False)
    settings = ComparisonSettings(
        model_kwargs={**TINY, "depth": 4}, device="cpu", batch_size=16, epochs=2, data_dir=str(data_dir),
        workers=0, keep_blocks=2, raw_steps=4, raw_warmup=1, out_dir=str(tmp_path / "out"),
    )
    rows = run_comparison(settings)
    assert [row.mode for row in rows] == ["teacher", "distill"]
    for row in rows:
        assert row.raw_before > 0 and row.raw_after > 0 and row.skindistil > 0
        assert row.raw == pytest.approx((row.raw_before + row.raw_after) / 2)
        assert 0 < row.ratio < 2, row
        assert row.target is None  # the 0.90 target is for the GPU
        written = json.loads((tmp_path / "out" / row.mode / "logs" / "throughput.json").read_text())
        assert row.skindistil == pytest.approx(written["images_per_second"])
    assert rows[1].model.endswith("-> 2 blocks")
    files = write_results(rows, settings, tmp_path / "out")
    saved = json.loads(files["json"].read_text())
    assert [r["ratio"] for r in saved["rows"]] == pytest.approx([row.ratio for row in rows])
    table = markdown_table(rows)
    assert table == files["markdown"].read_text()
    assert f"{rows[0].ratio:.3f}" in table and f"{rows[1].skindistil:.1f}" in table


def test_comparison_settings_name_what_is_wrong():
    with pytest.raises(ConfigError, match="modes"):
        run_comparison(ComparisonSettings(modes=("teacher", "fcvit")))
    with pytest.raises(ConfigError, match="device"):
        run_comparison(ComparisonSettings(device="tpu"))
