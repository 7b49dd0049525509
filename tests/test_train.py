"""Teacher training on real HAM10000 images: learning, artifact, resume after kill -9, DDP, bad checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_config
from skindistil import load_model
from skindistil.config import dump_yaml
from skindistil.data.datamodule import SkinDataModule
from skindistil.errors import ModelError
from skindistil.training.teacher import train_classifier
from skindistil.training.trainer import check_checkpoint

REPO = Path(__file__).resolve().parents[1]


def epoch_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "logs" / "metrics.csv").groupby("epoch").max(numeric_only=True)


@pytest.fixture(scope="module")
def trained(ham_small, tmp_path_factory):
    cfg = tiny_train_config(ham_small, tmp_path_factory.mktemp("runs"))
    return cfg, train_classifier(cfg)


def test_teacher_learns_on_real_images(trained, ham_small):
    cfg, result = trained
    metrics = epoch_metrics(result.run_dir)
    losses = metrics["train/loss_epoch"].to_numpy()
    assert losses[-1] < losses[0] - 0.1, losses
    val_size = len(SkinDataModule(ham_small, cfg.preprocess).dataset("val"))
    assert (metrics["val/num_samples"] == val_size).all()
    chance = 1 / 7
    assert result.best_val_bma == pytest.approx(metrics["val/balanced_accuracy"].max())
    assert result.best_val_bma > chance + 0.08, f"val BMA {result.best_val_bma:.3f} vs chance {chance:.3f}"
    assert result.images_per_second > 0
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "model/config.json",
                 "model/model.safetensors", "model/metrics.json", "model/model_card.md"):
        assert (result.run_dir / name).is_file(), name


def test_artifact_round_trip_gives_identical_logits(trained, ham_small):
    cfg, result = trained
    from skindistil.training.trainer import load_checkpoint_state

    loaded = load_model(result.run_dir)
    assert loaded.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert loaded.preprocess == cfg.preprocess
    best = load_checkpoint_state(result.best_checkpoint)["state_dict"]
    weights = load_file(result.model_dir / "model.safetensors")
    for key, value in best.items():
        torch.testing.assert_close(weights[key.removeprefix("model.")], value, rtol=0, atol=0)
    images, _ = next(iter(SkinDataModule(ham_small, cfg.preprocess, batch_size=8, num_workers=0).test_dataloader()))
    reference = loaded.model(images)
    again = load_model(result.model_dir).logits(images)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)


def _write_config(cfg, path: Path) -> Path:
    dump_yaml(cfg.to_dict(), path)
    return path


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "skindistil.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


RESUME_TRAINER = {"max_epochs": 3, "checkpoint_every_n_steps": 4}


def _resume_config(ham_small, runs: Path, name: str, tmp_path: Path) -> Path:
    """3 epochs of 9 batches with 2 loader workers; last.ckpt also every 4 steps (mid-epoch)."""
    cfg = tiny_train_config(ham_small, runs, name=name, **RESUME_TRAINER)
    cfg.data.num_workers = 2
    return _write_config(cfg, tmp_path / f"{name}.yaml")


@pytest.fixture(scope="module")
def uninterrupted(ham_small, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = _cli("train", "--config", str(_resume_config(ham_small, tmp / "runs", "full", tmp)))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    return tmp / "runs" / "full"


def _kill_after_checkpoint(config: Path, run_dir: Path, min_step: int) -> int:
    """Start `train`, SIGKILL it once last.ckpt is at `min_step` or later; returns that checkpoint's step."""
    victim = _cli("train", "--config", str(config))
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    step = -1
    while step < min_step and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        if last.exists():
            step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "training ended before it could be interrupted"
    assert not (run_dir / "model").exists()
    return torch.load(last, weights_only=True)["global_step"]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every weight tensor bit-identical, and the whole metrics.csv (every row, every column) equal."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert b["state_dict"].keys() == a["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    full_log = pd.read_csv(reference / "logs" / "metrics.csv")
    resumed_log = pd.read_csv(run_dir / "logs" / "metrics.csv")
    pd.testing.assert_frame_equal(resumed_log, full_log)
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.timeout(1800)  # three training runs in one test (two when the fixture is cached)
def test_resume_after_kill_mid_epoch_with_workers_matches_uninterrupted_run(uninterrupted, ham_small, tmp_path):
    runs = tmp_path / "runs"
    config = _resume_config(ham_small, runs, "killed", tmp_path)
    step = _kill_after_checkpoint(config, runs / "killed", min_step=12)
    assert step % 9 != 0, f"the kill should follow a mid-epoch checkpoint, got step {step}"
    resumed = _cli("train", "--config", str(config), "--resume")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    _assert_same_run(runs / "killed", uninterrupted)


@pytest.mark.timeout(1800)
def test_damaged_last_checkpoint_resumes_from_the_previous_one(uninterrupted, ham_small, tmp_path):
    runs = tmp_path / "runs"
    config = _resume_config(ham_small, runs, "damaged", tmp_path)
    _kill_after_checkpoint(config, runs / "damaged", min_step=16)
    checkpoints = runs / "damaged" / "checkpoints"
    previous = checkpoints / "last-prev.ckpt"
    assert 0 < torch.load(previous, weights_only=True)["global_step"] < torch.load(
        checkpoints / "last.ckpt", weights_only=True)["global_step"]
    data = (checkpoints / "last.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(data[: len(data) // 2])  # e.g. a copy cut short by a full disk

    refused = _cli("train", "--config", str(config), "--resume")
    out = refused.communicate(timeout=300)[0]
    assert refused.returncode == 1, out
    assert "truncated or corrupt" in out and f"--resume-from {previous}" in out

    resumed = _cli("train", "--config", str(config), "--resume-from", str(previous))
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    _assert_same_run(runs / "damaged", uninterrupted)


def test_ddp_two_cpu_processes_validate_on_the_whole_split(ham_small, tmp_path):
    cfg = tiny_train_config(ham_small, tmp_path / "runs", name="ddp", max_epochs=1)
    config = _write_config(cfg, tmp_path / "ddp.yaml")
    proc = _cli("train", "--config", str(config), "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    val_size = len(SkinDataModule(ham_small, cfg.preprocess).dataset("val"))
    metrics = epoch_metrics(tmp_path / "runs" / "ddp")
    assert (metrics["val/num_samples"] == val_size).all()
    assert 0 <= metrics["val/balanced_accuracy"].iloc[-1] <= 1
    assert (tmp_path / "runs" / "ddp" / "model" / "model.safetensors").is_file()


def test_truncated_checkpoint_gives_a_clear_error(trained, tmp_path):
    _, result = trained
    data = (result.run_dir / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        check_checkpoint(broken)
    with pytest.raises(ModelError, match="not found"):
        check_checkpoint(tmp_path / "missing.ckpt")


def test_resume_cli_reports_truncated_checkpoint(ham_small, tmp_path):
    cfg = tiny_train_config(ham_small, tmp_path / "runs", name="broken")
    (tmp_path / "runs" / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    proc = _cli("train", "--config", str(_write_config(cfg, tmp_path / "c.yaml")), "--resume")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1
    assert "last.ckpt" in out and "truncated or corrupt" in out


def test_evaluate_model_writes_reports_and_calibrates(trained, ham_small, tmp_path):
    import json

    from PIL import Image

    from skindistil.cli import main

    _, result = trained
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(result.run_dir), "--data", str(ham_small), "--split", "test",
                 "--calibrate", "--workers", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test_size = len(SkinDataModule(ham_small, result_preprocess(result)).dataset("test"))
    assert metrics["num_samples"] == test_size
    assert 0 <= metrics["headline"]["balanced_accuracy"] <= 1
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["image", "akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    np.testing.assert_allclose(predictions.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-5)
    for name in ("confusion_matrix.png", "roc.png", "reliability.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 100
    assert "Headline" in (out / "report.md").read_text()
    loaded = load_model(result.run_dir)
    temperature = loaded.config["calibration"]["temperature"]
    assert temperature > 0 and temperature != 1.0
    assert loaded.temperature == temperature
    # the artifact's metrics now carry the test figures
    assert loaded.metrics["test"]["balanced_accuracy"] == pytest.approx(metrics["headline"]["balanced_accuracy"])


def result_preprocess(result):
    return load_model(result.run_dir).preprocess


def test_prediction_collector_counts_each_padded_sample_once():
    from skindistil.data.sampling import EpochSampler
    from skindistil.training.collect import PredictionCollector

    # 5 validation samples over 2 ranks: rank 1's shard is padded with a repeat of sample 0
    shards = [list(EpochSampler(5, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(s) for s in shards) == 6
    collector = PredictionCollector()
    probs = torch.eye(5)
    for shard in shards:
        index = torch.tensor(shard)
        collector.update(probs[index], index, index)
    gathered = collector.compute()
    np.testing.assert_array_equal(gathered["indices"], np.arange(5))
    np.testing.assert_array_equal(gathered["targets"], np.arange(5))
    np.testing.assert_array_equal(gathered["probs"], np.eye(5))


def test_pretrained_lightning_checkpoint_of_a_run_reproduces_its_model(trained, ham_small):
    from skindistil.models import create_teacher

    cfg, result = trained
    model = create_teacher(cfg.model.name, num_classes=7, pretrained=str(result.run_dir / "checkpoints" / "best.ckpt"),
                           img_size=cfg.preprocess.image_size, keep_head=True, **cfg.model.kwargs).eval()
    images, _ = next(iter(SkinDataModule(ham_small, cfg.preprocess, batch_size=8, num_workers=0).test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(model(images), load_model(result.run_dir).logits(images), rtol=0, atol=0)


def test_train_cli_ema_starts_from_the_ema_weights_of_a_timm_checkpoint(trained, ham_small, tmp_path, capsys):
    import argparse

    from skindistil.cli import main

    cfg, result = trained
    raw = load_file(result.model_dir / "model.safetensors")
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in raw.items()}
    checkpoint = tmp_path / "model_best.pth.tar"  # the layout of timm's train.py (CheckpointSaver)
    torch.save({"epoch": 4, "arch": "vit_base_patch16_224", "state_dict": raw, "state_dict_ema": ema,
                "optimizer": {"state": {}, "param_groups": []}, "version": 2, "metric": 0.5,
                "args": argparse.Namespace(model="vit_base_patch16_224", lr=1e-3, device="cpu")}, checkpoint)
    config = _write_config(tiny_train_config(ham_small, tmp_path / "runs", name="ema", max_epochs=1,
                                             limit_train_batches=1, limit_val_batches=1), tmp_path / "ema.yaml")
    # lr 0: the run's weights stay those it started from, so its artifact shows which were loaded.
    assert main(["train", "--config", str(config), "--pretrained", str(checkpoint), "--ema", "optim.lr=0"]) == 0
    assert f"loaded timm weights from {checkpoint} (state_dict_ema: EMA weights); head reinitialised" in \
        capsys.readouterr().err
    started = load_file(tmp_path / "runs" / "ema" / "model" / "model.safetensors")
    body = [k for k in raw if not k.startswith("head.")]
    assert all(torch.equal(started[k], ema[k]) for k in body)
    assert not any(torch.equal(started[k], raw[k]) for k in body if raw[k].numel() > 1)
    assert yaml_load(tmp_path / "runs" / "ema" / "config.yaml")["model"]["pretrained_ema"] is True


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
