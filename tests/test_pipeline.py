"""`skindistil run` end to end on a reduced quickstart: every report section with numbers; reruns skip work."""

from __future__ import annotations

import json
import re

import pytest

from skindistil.cli import main
from skindistil.config import load_yaml
from skindistil.experiments.pipeline import detect_source

REDUCED = [
    "data.root=240", "data.short_side=40",
    "teacher.model.kwargs={embed_dim: 32, depth: 3, num_heads: 2, mlp_ratio: 2.0, patch_size: 8}",
    "teacher.preprocess.image_size=32", "teacher.trainer.max_epochs=2", "teacher.data.num_workers=0",
    "distill.keep_blocks=2", "distill.trainer.max_epochs=1", "distill.data.num_workers=0", "distill.min_depth=2",
    "cascade_epochs=1", "benchmark.batch_sizes=[1,4]", "benchmark.seconds=0.3", "explain_images=1", "bootstrap=200",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = ["run", "--config", "configs/quickstart.yaml", "--out-dir", str(out), "--no-progress", *REDUCED]
    assert main(args) == 0
    return out / "quickstart", args


def test_report_has_every_section_with_numbers(quick_run):
    run_dir, _ = quick_run
    report = (run_dir / "report.md").read_text()
    for title in ("## Data", "## Teacher vs students", "## Training curves", "## Confusion matrices",
                  "## Attention maps", "## Per-depth", "## Early exit", "## Run"):
        assert title in report, title
    table = report.split("## Teacher vs students")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| teacher") or line.startswith("| distilvit")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "n/a" not in cells, row
        assert all(re.fullmatch(r"[\d.,]+", c) for c in cells[1:]), row
    assert re.search(r"\d+\.\d% smaller, -?\d+\.\d% faster", report)
    # operating points chosen on val, applied on test, with intervals, for the teacher and the student
    melanoma = report.split("## Operating points: melanoma vs rest (test split)")[1].split("\n## ")[0]
    for model in ("teacher", "distilvit"):
        for point in ("melanoma@sens95", "melanoma@spec80"):
            row = next(line for line in melanoma.splitlines() if line.startswith(f"| {model} | {point} | MEL |"))
            assert re.search(r"\| \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] \| \d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] \|", row), row
    assert "## Operating points: cancer vs non-cancer (test split)" in report
    html = (run_dir / "report.html").read_text()
    assert "<table>" in html and "not medical devices" in html
    for image in re.findall(r"\]\((report_assets/[^)]+\.png)\)", report):
        assert (run_dir / image).stat().st_size > 1000, image
    for member in ("students/cascade/cascade/depth-02", "students/fcvit", "students/distilvit", "teacher"):
        assert (run_dir / member / "model" / "model.safetensors").is_file(), member
        assert (run_dir / member / "eval" / "test" / "metrics.json").is_file(), member
    assert load_yaml(run_dir / "config.yaml")["teacher"]["trainer"]["max_epochs"] == 2


def test_rerun_skips_finished_stages(quick_run, capsys):
    run_dir, args = quick_run
    weights = run_dir / "teacher" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teacher found" in out and "distilvit found" in out and "benchmark found" in out
    assert weights.stat().st_mtime_ns == before


def test_a_copied_run_reports_the_speed_of_its_models(quick_run, tmp_path):
    """bench.json names models by the path they had; in a copy of the run, the report still finds their speed."""
    import shutil

    run_dir, args = quick_run
    copy = tmp_path / "elsewhere" / "quickstart"
    shutil.copytree(run_dir, copy)
    moved_args = [a if a != str(run_dir.parent) else str(copy.parent) for a in args]
    assert main(moved_args) == 0
    table = (copy / "report.md").read_text().split("## Teacher vs students")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith(("| teacher", "| distilvit"))]
    assert len(rows) == 2 and all("n/a" not in row for row in rows), rows


def test_report_has_intervals_paired_comparisons_and_calibration(quick_run):
    run_dir, _ = quick_run
    report = (run_dir / "report.md").read_text()
    for title in ("## How sure: intervals", "## What each student loses", "## Calibration"):
        assert title in report, title
    comparison = json.loads((run_dir / "comparison.json").read_text())
    teacher = json.loads((run_dir / "teacher" / "eval" / "test" / "metrics.json").read_text())
    student = json.loads((run_dir / "students" / "distilvit" / "eval" / "test" / "metrics.json").read_text())
    paired = comparison["models"]["distilvit"]
    expected = student["headline"]["balanced_accuracy"] - teacher["headline"]["balanced_accuracy"]
    assert paired["balanced_accuracy"]["difference"]["value"] == pytest.approx(expected)
    low, high = paired["balanced_accuracy"]["difference"]["interval"]
    assert low <= expected <= high
    assert f"distilvit: {paired['verdict']}" in report
    assert set(comparison["models"]) >= {"distilvit", "fcvit", "cascade@2"}
    family = json.loads((run_dir / "family" / "family.json").read_text())
    rows = [row for fam in family["families"] for row in fam["rows"]]
    assert all("ece" in row for row in rows) and all("comparison" in row for row in rows if row["role"] == "member")


def test_retention_gate_marks_the_report_and_fails_the_exit_code(quick_run):
    run_dir, args = quick_run
    assert main([*args, "--min-class-retention", "MEL=100"]) == 1
    report = (run_dir / "report.md").read_text()
    assert "FAIL: MEL: retention" in report and "the run exits with code 1" in report
    gated = json.loads((run_dir / "comparison.json").read_text())["models"]["distilvit"]
    assert gated["gate_failures"][0].startswith("MEL: ")


def test_detect_source_recognises_the_shared_layouts(ham_root, uda_root, tmp_path):
    assert detect_source(ham_root)[0] == "ham10000"
    assert detect_source(uda_root)[0] == "isic2019"
    with pytest.raises(Exception, match="not a prepared dataset"):
        detect_source(tmp_path)


def test_gpu_recipe_on_cpu_warns_with_the_measured_duration(ham_small, tmp_path, capsys):
    import copy
    import dataclasses

    from skindistil.config import RunConfig
    from skindistil.experiments.pipeline import Pipeline
    from skindistil.training.estimate import estimate_training

    cfg = RunConfig.from_dict(load_yaml("configs/ham10000-scratch.yaml"))
    assert cfg.sized_for == "gpu"
    teacher = copy.deepcopy(cfg.teacher)  # shrunk so the measurement takes a moment; the recipe's epochs stay
    teacher.model.kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    teacher.preprocess = dataclasses.replace(teacher.preprocess, image_size=32)
    teacher.data.batch_size = 16
    estimate = estimate_training(teacher, num_train=100, num_classes=8, steps=1)
    assert estimate.device == "cpu" and estimate.seconds_per_step > 0
    assert estimate.steps == 7 * teacher.trainer.max_epochs  # ceil(100 / 16) batches per epoch
    capsys.readouterr()
    Pipeline(cfg, progress=False).announce_duration(teacher, ham_small)
    out = " ".join(capsys.readouterr().out.split())
    train_images = sum(1 for line in (ham_small / "manifest.csv").read_text().splitlines() if ",train," in line)
    steps = -(-train_images // 16) * teacher.trainer.max_epochs
    assert f"teacher: {steps:,} steps" in out and "(measured)" in out
    assert "sized for a GPU" in out and "configs/quickstart.yaml" in out
    cfg.sized_for = "any"
    Pipeline(cfg, progress=False).announce_duration(teacher, ham_small)
    assert "sized for a GPU" not in capsys.readouterr().out
    cfg.sized_for = "laptop"
    with pytest.raises(Exception, match="sized_for"):
        Pipeline(cfg, progress=False).run()
