"""Distillation on real HAM10000 images: every method end to end from a tiny trained teacher, the frozen
teacher, the FCViTProbs schedule, the CLI, early exit, family reports and the loss ablation."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import tiny_train_config
from skindistil.cli import build_parser, main
from skindistil.commands.common import resolve_config
from skindistil.commands.distill import FLAG_KEYS
from skindistil.config import DeprecatedKeyWarning, DistillConfig, LossConfig, load_yaml
from skindistil.data.datamodule import SkinDataModule
from skindistil.errors import ModelError
from skindistil.evaluation.early_exit import (
    FULL_DEPTH,
    exit_confidences,
    measure_throughput,
    simulate_early_exit,
    sweep_thresholds,
)
from skindistil.evaluation.evaluate import evaluate_model, split_outputs
from skindistil.experiments.ablation import ablation_variants
from skindistil.models import MultiExitViT, load_model
from skindistil.training.distill_run import distill
from skindistil.training.distiller import DistillerModule
from skindistil.training.teacher import train_classifier

TEACHER_DEPTH = 4
TRAINER = {"max_epochs": 1, "precision": "32-true", "accelerator": "cpu", "devices": 1, "progress": False,
           "log_every_n_steps": 1, "limit_train_batches": 4}


@pytest.fixture(scope="module")
def teacher(ham_small, tmp_path_factory) -> Path:
    cfg = tiny_train_config(ham_small, tmp_path_factory.mktemp("teacher"), max_epochs=2)
    return train_classifier(cfg).model_dir


def distill_config(teacher: Path, data_dir: Path, out_dir: Path, method: str, **fields) -> DistillConfig:
    return DistillConfig.from_dict({
        "name": method, "out_dir": str(out_dir), "teacher": str(teacher), "method": method, "keep_blocks": 2,
        "min_depth": 2,
        "loss": {"chain_warmup_steps": 1, "chain_every_steps": 1},
        "data": {"dir": str(data_dir), "batch_size": 32, "num_workers": 0, "imbalance": "weighted-loss"},
        "optim": {"lr": 1e-3, "schedule": "cosine"},
        "trainer": TRAINER,
        **fields,
    })


class TeacherSpy:
    """Wraps DistillerModule.training_step: records whether the teacher (and each of its submodules)
    is in eval mode at every step, and snapshots its state at the first step of each fit."""

    def __init__(self):
        self.steps = []  # (teacher in train mode anywhere, any parameter requires grad)
        self.snapshots = []  # (teacher module, its state dict cloned at the first step)

    @contextlib.contextmanager
    def installed(self):
        original = DistillerModule.training_step
        spy = self

        def training_step(module, batch, batch_idx):
            teacher = module.teacher
            if not any(t is teacher for t, _ in spy.snapshots):
                spy.snapshots.append((teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
            assert all(m.training for m in module.student.modules()), "the student must train in train mode"
            spy.steps.append((any(m.training for m in teacher.modules()),
                              any(p.requires_grad for p in teacher.parameters())))
            return original(module, batch, batch_idx)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DistillerModule, "training_step", training_step)
            yield self


@pytest.fixture(scope="module")
def distilled(teacher, ham_small, tmp_path_factory):
    """method -> (config, results, spy); each method is trained once, on first use."""
    out = tmp_path_factory.mktemp("students")
    done = {}

    def run(method: str):
        if method not in done:
            cfg = distill_config(teacher, ham_small, out, method)
            with TeacherSpy().installed() as spy:
                done[method] = cfg, distill(cfg), spy
        return done[method]

    return run


@pytest.mark.parametrize("method", ["distilvit", "fcvit", "fcvit-probs", "full"])
def test_each_method_writes_a_working_artifact(distilled, ham_small, method):
    cfg, results, _ = distilled(method)
    assert len(results) == 1 and results[0].model_dir == cfg.run_dir / "model"
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "model/model.safetensors",
                 "model/metrics.json", "logs/metrics.csv"):
        assert (cfg.run_dir / name).is_file(), name
    loaded = load_model(cfg.run_dir)
    provenance = loaded.config["provenance"]
    assert provenance["method"] == method and provenance["role"] == "student"
    assert results[0].best_val_bma == pytest.approx(loaded.metrics["val"]["balanced_accuracy"])
    if method == "distilvit":
        assert loaded.config["kind"] == "vit"
        assert provenance["kept_blocks"] == [0, 1]
        assert len(loaded.model.blocks) == 2 and loaded.architecture["kwargs"]["depth"] == 2
    else:
        assert loaded.config["kind"] == "depth_vit" and isinstance(loaded.model, MultiExitViT)
        assert loaded.model.exits == list(range(1, TEACHER_DEPTH + 1))
        assert loaded.model.shared_head == (method == "fcvit-probs")
    images, _ = next(iter(SkinDataModule(ham_small, loaded.preprocess, batch_size=8, num_workers=0).test_dataloader()))
    assert torch.isfinite(loaded.logits(images)).all()


@pytest.mark.parametrize("method", ["distilvit", "full"])
def test_teacher_is_frozen_in_eval_mode_and_untouched(distilled, teacher, method):
    _, _, spy = distilled(method)
    assert spy.steps, "training_step never ran"
    assert not any(in_train_mode for in_train_mode, _ in spy.steps), "teacher left eval mode during training"
    assert not any(grad for _, grad in spy.steps), "teacher parameters require grad"
    on_disk = load_model(teacher).model.state_dict()
    (module, before), = spy.snapshots
    after = module.state_dict()
    assert set(after) == set(before) == set(on_disk)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(on_disk[key], value, rtol=0, atol=0, msg=key)


def test_fcvit_probs_schedule_enables_more_depths_during_the_run(distilled):
    cfg, _, _ = distilled("fcvit-probs")
    log = pd.read_csv(cfg.run_dir / "logs" / "metrics.csv")
    enabled = log.dropna(subset=["train/enabled_depths"]).sort_values("step")["train/enabled_depths"].to_numpy()
    # warm-up 1 step, then one more depth every step: 1, 2, 3, 4 over the 4 steps
    np.testing.assert_array_equal(enabled, [1, 2, 3, 4])
    # the chained KL is in the loss once a second depth is enabled, and not before
    chain = log.dropna(subset=["train/chain_kl"]).sort_values("step")["train/chain_kl"].to_numpy()
    assert chain[0] == 0 and (chain[1:] > 0).all()


def test_cascade_writes_one_member_per_depth_and_resumes(distilled):
    cfg, results, spy = distilled("cascade")
    members = cfg.run_dir / "cascade"
    assert [r.model_dir for r in results] == [members / "depth-03" / "model", members / "depth-02" / "model"]
    for depth in (3, 2):
        loaded = load_model(members / f"depth-{depth:02d}")
        assert len(loaded.model.blocks) == depth
        assert loaded.config["provenance"]["cascade_depth"] == depth
        assert loaded.config["provenance"]["kept_blocks"] == list(range(depth))
    # the cascade's run directory is no single model: the error names every member and the family command
    with pytest.raises(ModelError) as refused:
        load_model(cfg.run_dir)
    assert str(members / "depth-03") in str(refused.value) and str(members / "depth-02") in str(refused.value)
    assert f"evaluate --family {cfg.run_dir}" in str(refused.value)
    # each member is distilled from the one above it, which stays frozen in eval mode
    assert len(spy.snapshots) == 2 and not any(mode or grad for mode, grad in spy.steps)
    assert [len(t.blocks) for t, _ in spy.snapshots] == [4, 3]
    for module, before in spy.snapshots:
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    weights = {d: members / f"depth-{d:02d}" / "model" / "model.safetensors" for d in (3, 2)}
    stamps = {d: p.stat().st_mtime_ns for d, p in weights.items()}
    assert distill(cfg) == []  # everything finished: nothing retrained
    assert {d: p.stat().st_mtime_ns for d, p in weights.items()} == stamps
    shutil.rmtree(members / "depth-02")  # lose the last member: only it is trained again
    rerun = distill(cfg)
    assert [r.model_dir for r in rerun] == [members / "depth-02" / "model"]
    assert weights[3].stat().st_mtime_ns == stamps[3]


def test_cli_flags_map_to_the_config(tmp_path):
    parser = build_parser()
    args = parser.parse_args([
        "distill", "--teacher", "runs/t", "--data", "data/2019", "--method", "cascade", "--keep-blocks", "0,2",
        "--block-selection", "uniform", "--min-depth", "3", "--a-cos", "0.1", "--a-kd", "0.7", "--temperature", "4",
        "--a-mse", "0", "--a-chain", "10", "--epochs", "3", "--lr", "1e-3", "--batch-size", "16",
        "--name", "007", "--out-dir", str(tmp_path), "--imbalance", "weighted-loss", "--precision", "bf16-mixed",
        "--strategy", "ddp", "--devices", "2", "loss.cos_tokens=cls",
    ])
    cfg = resolve_config(args, DistillConfig, FLAG_KEYS)
    assert cfg.keep_blocks == [0, 2] and cfg.block_selection == "uniform"
    assert cfg.method == "cascade" and cfg.min_depth == 3
    assert cfg.teacher == "runs/t" and cfg.data.dir == "data/2019" and cfg.name == "007"
    assert (cfg.loss.a_cos, cfg.loss.a_kd, cfg.loss.temperature, cfg.loss.a_mse, cfg.loss.a_chain) == (0.1, 0.7, 4, 0, 10)
    assert cfg.loss.cos_tokens == "cls" and cfg.loss.a_task == LossConfig().a_task
    assert (cfg.trainer.max_epochs, cfg.optim.lr, cfg.data.batch_size) == (3, 1e-3, 16)
    assert (cfg.trainer.precision, cfg.trainer.strategy, cfg.trainer.devices) == ("bf16-mixed", "ddp", 2)
    assert cfg.data.imbalance == "weighted-loss"
    # the old spellings: --keep for --keep-blocks, --ddp-strategy for --strategy (Lightning's)
    single = resolve_config(parser.parse_args(["distill", "--keep", "4", "--ddp-strategy", "ddp_spawn"]),
                            DistillConfig, FLAG_KEYS)
    assert single.keep_blocks == 4 and single.block_selection == "first" and single.loss == LossConfig()
    assert single.trainer.strategy == "ddp_spawn"


@pytest.mark.parametrize("selection", ["first", "uniform"])
def test_distill_strategy_with_a_block_selection_is_refused_naming_block_selection(selection, tmp_path, capsys):
    """`distill --strategy first|uniform` chose blocks before --strategy meant Lightning's strategy: it is
    refused before anything loads, naming --block-selection; a recipe's trainer.strategy too."""
    assert main(["distill", "--teacher", str(tmp_path / "no-teacher"), "--strategy", selection]) == 1
    err = capsys.readouterr().err
    assert f"trainer.strategy: {selection!r} is not a Lightning strategy" in err
    assert f"--block-selection {selection}" in err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer: {{strategy: {selection}}}\n")
    assert main(["distill", "--config", str(recipe), "--teacher", str(tmp_path / "no-teacher")]) == 1
    assert f"--block-selection {selection}" in capsys.readouterr().err


def test_keep_blocks_with_uniform_selection_from_an_old_recipe(teacher, ham_small, tmp_path):
    """`--keep-blocks 3 --block-selection uniform` keeps blocks 0, 2, 3 of the 4-block teacher (the first
    three would be 0, 1, 2), over an old recipe's deprecated keep/strategy keys; the run's config.yaml
    writes the current names."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("keep: 2\nstrategy: first\n")
    with pytest.warns(DeprecatedKeyWarning) as caught:
        code = main(["distill", "--config", str(recipe), "--teacher", str(teacher.parent), "--data", str(ham_small),
                     "--keep-blocks", "3", "--block-selection", "uniform", "--epochs", "1", "--batch-size", "32",
                     "--workers", "0", "--accelerator", "cpu", "--precision", "32-true", "--out-dir", str(tmp_path),
                     "--name", "uniform", "--no-progress", "trainer.limit_train_batches=1"])
    assert code == 0
    messages = [str(w.message) for w in caught if w.category is DeprecatedKeyWarning]
    assert messages == [f"{recipe}: keep is deprecated: read as keep_blocks=2; rename the key to keep_blocks",
                        f"{recipe}: strategy is deprecated: read as block_selection='first'; rename the key to "
                        "block_selection"]
    loaded = load_model(tmp_path / "uniform")
    assert loaded.config["provenance"]["kept_blocks"] == [0, 2, 3] and len(loaded.model.blocks) == 3
    saved = load_yaml(tmp_path / "uniform" / "config.yaml")
    assert (saved["keep_blocks"], saved["block_selection"]) == (3, "uniform")
    assert "keep" not in saved and "strategy" not in saved and saved["trainer"]["strategy"] == "auto"


def _gate_args(teacher, ham_small, tmp_path, gate):
    return ["distill", "--teacher", str(teacher.parent), "--data", str(ham_small), "--keep-blocks", "2", "--epochs", "1",
            "--batch-size", "32", "--workers", "0", "--accelerator", "cpu", "--precision", "32-true",
            "--out-dir", str(tmp_path), "--name", "gated", "--no-progress", "--min-class-retention", gate,
            "trainer.limit_train_batches=2"]


def test_distill_retention_gate_fails_the_exit_code_after_writing_its_report(teacher, ham_small, tmp_path):
    assert main(_gate_args(teacher, ham_small, tmp_path, "mel=100,nv=0.5")) == 1
    result = json.loads((tmp_path / "gated" / "eval" / "test" / "retention.json").read_text())
    assert result["passed"] is False and result["gate"] == {"mel": 100.0, "nv": 0.5}
    (student,) = result["students"]
    assert student["failures"][0].startswith("mel: ")
    per_class = student["comparison"]["per_class"]
    teacher_eval = evaluate_model(teacher, ham_small, "test", tmp_path / "t", num_workers=0, progress=False)
    for name in ("mel", "nv"):
        assert per_class[name]["teacher_recall"] == pytest.approx(teacher_eval["per_class"][name]["sensitivity"],
                                                                  nan_ok=True)
    report = (tmp_path / "gated" / "eval" / "test" / "retention.md").read_text()
    assert "FAILS the gate: mel: " in report and "distinguishable from zero" in report


def test_distill_gate_on_an_unknown_class_stops_before_training(teacher, ham_small, tmp_path, capsys):
    assert main(_gate_args(teacher, ham_small, tmp_path, "MEL=0.97")) == 1
    assert "unknown class 'MEL'" in capsys.readouterr().err
    assert not (tmp_path / "gated").exists()


# ------------------------------------------------------------------------------------------ early exit


@pytest.fixture(scope="module")
def fcvit_outputs(distilled, ham_small):
    cfg, _, _ = distilled("fcvit")
    loaded = load_model(cfg.run_dir)
    return loaded, split_outputs(loaded, ham_small, "test", batch_size=16, num_workers=0, all_exits=True,
                                 progress=False)


def _gap_thresholds(all_logits: np.ndarray) -> list[float]:
    """Thresholds half-way between neighbouring confidences near their quartiles: every decision is far
    (relative to float noise) from the threshold, so batching cannot flip it."""
    conf = np.unique(exit_confidences(all_logits))
    picks = [int(q * (len(conf) - 1)) for q in (0.25, 0.5, 0.75)]
    return [float((conf[i] + conf[i + 1]) / 2) for i in picks]


def test_simulated_early_exit_matches_the_model(fcvit_outputs, ham_small):
    loaded, outputs = fcvit_outputs
    model, exits = loaded.model, loaded.model.exits
    batches = [images for images, _ in SkinDataModule(ham_small, loaded.preprocess, batch_size=16,
                                                      num_workers=0).test_dataloader()]
    for tau in [0.0, *_gap_thresholds(outputs.logits), 1.5]:
        logits, depths = simulate_early_exit(outputs.logits, exits, tau)
        with torch.inference_mode():
            real = [model.early_exit(x, tau) for x in batches]
        np.testing.assert_array_equal(torch.cat([d for _, d in real]).numpy(), depths)
        np.testing.assert_allclose(torch.cat([z for z, _ in real]).numpy(), logits, rtol=1e-4, atol=1e-5)
        timed = measure_throughput(model, batches, tau)
        np.testing.assert_array_equal(timed["depths"], depths)
        assert timed["early_exit_images_per_s"] > 0 and timed["full_depth_images_per_s"] > 0
    _, depths = simulate_early_exit(outputs.logits, exits, 0.0)
    assert (depths == 1).all()
    logits, depths = simulate_early_exit(outputs.logits, exits, 1.5)
    assert (depths == TEACHER_DEPTH).all()
    np.testing.assert_array_equal(logits, outputs.logits[-1])


def test_sweep_scores_calibration_and_teacher_agreement_at_every_threshold(fcvit_outputs, teacher, ham_small,
                                                                          tmp_path):
    from skindistil.evaluation.early_exit import sweep_exits
    from skindistil.evaluation.metrics import decide, expected_calibration_error

    loaded, outputs = fcvit_outputs
    t_loaded = load_model(teacher)
    t_out = split_outputs(t_loaded, ham_small, "test", batch_size=16, num_workers=0, progress=False)
    teacher_probs = torch.from_numpy(t_out.logits).softmax(-1).numpy()
    result = sweep_exits(loaded.path, ham_small, "test", tmp_path, thresholds=[0.5], num_workers=0, progress=False,
                         teacher_probs=teacher_probs)
    exits = list(loaded.model.exits)
    for point, tau in zip(result["points"], [0.5, np.inf], strict=True):
        logits, _ = simulate_early_exit(outputs.logits, exits, tau)
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        assert point["ece"] == pytest.approx(expected_calibration_error(probs, outputs.labels))
        assert point["comparison"]["agreement"]["top1"] == pytest.approx(np.mean(decide(probs) == decide(teacher_probs)))
    for i, depth in enumerate(exits):
        probs = torch.from_numpy(outputs.logits[i]).softmax(-1).numpy()
        assert result["per_exit_ece"][depth] == pytest.approx(expected_calibration_error(probs, outputs.labels))
    assert "| 0.50 |" in (tmp_path / "early_exit.md").read_text()


def test_mean_depth_grows_with_the_threshold(fcvit_outputs):
    loaded, outputs = fcvit_outputs
    grid = np.linspace(0.0, 1.0, 21)
    points = sweep_thresholds(outputs.logits, outputs.labels, loaded.model.exits, len(loaded.classes), grid)
    mean_depths = [p["mean_depth"] for p in points]
    assert mean_depths[0] == 1.0 and points[-1]["threshold"] == FULL_DEPTH and mean_depths[-1] == TEACHER_DEPTH
    assert all(b >= a for a, b in zip(mean_depths, mean_depths[1:], strict=False))
    assert mean_depths[-2] > 1.0  # the grid does reach the deeper exits
    for p in points:
        assert sum(p["exit_share"].values()) == pytest.approx(1.0)
        assert 0.0 <= p["balanced_accuracy"] <= 1.0


def test_evaluate_cli_early_exit_and_sweep(distilled, ham_small, tmp_path):
    cfg, _, _ = distilled("fcvit")
    full = evaluate_model(cfg.run_dir, ham_small, "test", tmp_path / "full", num_workers=0, progress=False)
    assert main(["evaluate", "--model", str(cfg.run_dir), "--data", str(ham_small), "--workers", "0",
                 "--exit-threshold", "0.5", "--sweep-exits", "--thresholds", "0.3,0.5,0.9"]) == 0
    out = cfg.run_dir / "eval" / "test"
    sweep = json.loads((out / "early_exit.json").read_text())
    assert [p["threshold"] for p in sweep["points"]] == [0.3, 0.5, 0.9, FULL_DEPTH]
    assert sweep["points"][-1]["mean_depth"] == TEACHER_DEPTH
    assert sweep["points"][-1]["balanced_accuracy"] == pytest.approx(full["headline"]["balanced_accuracy"])
    assert "| 0.50 |" in (out / "early_exit.md").read_text()
    assert Image.open(out / "early_exit.png").size[0] > 100
    metrics = json.loads((out / "exit-0.5" / "metrics.json").read_text())
    early = metrics["early_exit"]
    assert early["simulated_matches_model"] == 1.0 and early["threshold"] == 0.5
    assert early["mean_depth"] == pytest.approx(sweep["points"][1]["mean_depth"])
    assert metrics["headline"]["balanced_accuracy"] == pytest.approx(sweep["points"][1]["balanced_accuracy"])
    assert early["images_per_s"] > 0 and early["full_depth_images_per_s"] > 0
    assert (out / "exit-0.5" / "report.md").is_file()


def test_early_exit_needs_per_depth_heads(distilled, ham_small, capsys):
    cfg, _, _ = distilled("distilvit")
    assert main(["evaluate", "--model", str(cfg.run_dir), "--data", str(ham_small), "--exit-threshold", "0.5"]) == 1
    assert "per-depth heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------ families and ablation


def test_family_report_tables_and_plot(distilled, teacher, ham_small, tmp_path):
    cascade, _, _ = distilled("cascade")
    fcvit, _, _ = distilled("fcvit")
    out = tmp_path / "family"
    assert main(["evaluate", "--family", str(cascade.run_dir), str(fcvit.run_dir), "--data", str(ham_small),
                 "--workers", "0", "--out", str(out)]) == 0
    report = json.loads((out / "family.json").read_text())
    by_method = {f["label"]: f for f in report["families"]}
    assert set(by_method) == {"cascade", "fcvit"}
    assert [(r["depth"], r["role"]) for r in by_method["cascade"]["rows"]] == [(2, "member"), (3, "member"),
                                                                                (4, "teacher")]
    assert [r["depth"] for r in by_method["fcvit"]["rows"]] == [1, 2, 3, 4]
    params = [r["params"] for r in by_method["fcvit"]["rows"]]
    assert params == sorted(params) and len(set(params)) == 4
    teacher_bma = evaluate_model(teacher, ham_small, "test", tmp_path / "t", num_workers=0, progress=False)
    assert report["teachers"][0]["balanced_accuracy"] == pytest.approx(teacher_bma["headline"]["balanced_accuracy"])
    assert by_method["cascade"]["rows"][-1]["balanced_accuracy"] == pytest.approx(report["teachers"][0]["balanced_accuracy"])
    fcvit_full = evaluate_model(fcvit.run_dir, ham_small, "test", tmp_path / "f", num_workers=0, progress=False)
    assert by_method["fcvit"]["rows"][-1]["balanced_accuracy"] == pytest.approx(fcvit_full["headline"]["balanced_accuracy"])
    # calibration of every member, and the paired comparison with the teacher, as evaluate computes them
    last = by_method["fcvit"]["rows"][-1]
    assert last["ece"] == pytest.approx(fcvit_full["headline"]["ece"])
    assert last["reliability"]["count"] == fcvit_full["reliability"]["count"]
    expected = fcvit_full["headline"]["balanced_accuracy"] - teacher_bma["headline"]["balanced_accuracy"]
    assert last["comparison"]["balanced_accuracy"]["difference"]["value"] == pytest.approx(expected)
    assert all(("comparison" in r) == (r["role"] == "member") for f in report["families"] for r in f["rows"])
    for fam in report["families"]:
        for row in fam["rows"]:
            assert 0 <= row["balanced_accuracy"] <= 1 and 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    md = (out / "family.md").read_text()
    assert "| method | 1 | 2 | 3 | 4 |" in md and "teacher: BMA" in md
    image = Image.open(out / "family.png")
    image.verify()
    # a single run writes into its own eval directory
    assert main(["evaluate", "--family", str(fcvit.run_dir), "--data", str(ham_small), "--workers", "0"]) == 0
    assert (fcvit.run_dir / "eval" / "test" / "family.png").is_file()


def test_a_family_whose_teacher_is_not_found_says_so(distilled, ham_small, tmp_path):
    """A student's provenance names its teacher as given at distillation (often a relative path): when it
    cannot be found, the family is scored without it, with a warning, and family.json and family.md name it."""
    from skindistil.evaluation.family import find_family

    fcvit, _, _ = distilled("fcvit")
    moved = tmp_path / "fcvit"
    shutil.copytree(fcvit.run_dir / "model", moved / "model")
    config = json.loads((moved / "model" / "config.json").read_text())
    config["provenance"]["teacher"] = "elsewhere/teacher/model"
    (moved / "model" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "family"
    with pytest.warns(UserWarning, match=r"its teacher elsewhere/teacher/model \(provenance\) is not found"):
        assert main(["evaluate", "--family", str(moved), "--data", str(ham_small), "--workers", "0",
                     "--out", str(out)]) == 0
    (family,) = json.loads((out / "family.json").read_text())["families"]
    assert family["teacher_missing"] == "elsewhere/teacher/model" and family["teacher"] is None
    assert [r["role"] for r in family["rows"]] == ["member"] * 4 and all("comparison" not in r for r in family["rows"])
    assert "Teacher `elsewhere/teacher/model` (from the provenance) not found: no comparison to it." in (
        out / "family.md").read_text()
    assert find_family(fcvit.run_dir).teacher_missing is None  # found: nothing said


def test_ablation_variants():
    variants = ablation_variants(LossConfig())
    assert list(variants) == ["full", "no-task", "no-kd", "no-mse", "no-cos"]
    assert variants["full"].a_cos == 0.1 and variants["no-cos"].a_cos == 0.0
    assert variants["no-kd"].a_kd == 0.0 and variants["no-kd"].a_mse == variants["full"].a_mse
    assert list(ablation_variants(LossConfig(a_mse=0.0), cos_weight=0.0)) == ["full", "no-task", "no-kd"]


def test_ablate_cli_reports_every_variant(teacher, ham_small, tmp_path):
    args = ["ablate", "--teacher", str(teacher), "--data", str(ham_small), "--out-dir", str(tmp_path),
            "--epochs", "1", "--keep-blocks", "2", "--batch-size", "32", "--workers", "0", "--accelerator", "cpu",
            "--precision", "32-true", "--no-progress", "trainer.limit_train_batches=2",
            "trainer.log_every_n_steps=1"]
    assert main(args) == 0
    out = tmp_path / "ablation" / "ablation"
    report = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["full", "no-task", "no-kd", "no-mse", "no-cos"]
    teacher_test = report["teacher"]["test_balanced_accuracy"]
    assert 0 < teacher_test <= 1
    for name, row in rows.items():
        assert 0 <= row["val_balanced_accuracy"] <= 1 and 0 <= row["test_balanced_accuracy"] <= 1, name
        assert row["retention_pct"] == pytest.approx(100 * row["test_balanced_accuracy"] / teacher_test)
        assert row["depth"] == 2
    assert rows["no-cos"]["a_cos"] == 0 and rows["full"]["a_cos"] == 0.1 and rows["no-task"]["a_task"] == 0
    md = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    Image.open(out / "ablation.png").verify()
    stamp = (tmp_path / "ablation" / "variants" / "full" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # a rerun scores again without retraining
    assert (tmp_path / "ablation" / "variants" / "full" / "model" / "model.safetensors").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------ exact resume


class SimulatedCrash(RuntimeError):
    pass


class CrashOnce:
    """A callback that raises (as a crash would) once, at the start of optimiser step `step`."""

    def __init__(self, step: int):
        import lightning as L

        crash = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not crash.done and trainer.global_step == step:
                    crash.done = True
                    raise SimulatedCrash(f"step {step}")

        self.done = False
        self.callback = _Callback()


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("method", ["distilvit", "fcvit", "fcvit-probs", "full", "cascade"])
def test_resume_mid_epoch_with_workers_matches_uninterrupted_distillation(teacher, ham_small, tmp_path,
                                                                           monkeypatch, method):
    """2 epochs of 4 batches, 2 loader workers, last.ckpt every 3 steps: a crash at step 6 (mid-epoch 1)
    and a resume from the step-6 checkpoint end with the weights and the log of an uninterrupted run."""
    from skindistil.training import distill_run

    trainer = {**TRAINER, "max_epochs": 2, "checkpoint_every_n_steps": 3}
    fields = {"trainer": trainer, "data": {"dir": str(ham_small), "batch_size": 32, "num_workers": 2,
                                          "imbalance": "weighted-loss"}}
    full = distill_config(teacher, ham_small, tmp_path / "full", method, **fields)
    distill(full)

    crash = CrashOnce(step=6)
    build = distill_run.build_trainer
    monkeypatch.setattr(distill_run, "build_trainer",
                        lambda *a, **k: build(*a, extra_callbacks=[crash.callback], **k))
    crashed = distill_config(teacher, ham_small, tmp_path / "crashed", method, **fields)
    with pytest.raises(SimulatedCrash):
        distill(crashed)
    runs = sorted(p.parent.parent for p in (tmp_path / "crashed").rglob("checkpoints/last.ckpt"))
    assert torch.load(runs[-1] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    distill(crashed, resume=True)

    members = sorted(p.parent.parent.relative_to(tmp_path / "full") for p in
                     (tmp_path / "full").rglob("checkpoints/last.ckpt"))
    assert len(members) == (2 if method == "cascade" else 1)
    for member in members:
        a = torch.load(tmp_path / "full" / member / "checkpoints" / "last.ckpt", weights_only=True)
        b = torch.load(tmp_path / "crashed" / member / "checkpoints" / "last.ckpt", weights_only=True)
        assert a["global_step"] == b["global_step"] == 8
        assert b["state_dict"].keys() == a["state_dict"].keys()
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{member}: {key}")
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "crashed" / member / "logs" / "metrics.csv"),
                                      pd.read_csv(tmp_path / "full" / member / "logs" / "metrics.csv"))


def test_resume_from_is_refused_for_a_cascade(capsys):
    code = main(["distill", "--teacher", "t", "--data", "d", "--method", "cascade", "--resume-from", "x.ckpt"])
    assert code == 1
    assert "--resume-from: a cascade has one checkpoint per member" in capsys.readouterr().err
