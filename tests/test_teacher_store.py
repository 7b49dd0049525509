"""Stored teacher outputs on real HAM10000 images: the stored loss equals the online loss on replayed
batches, a store made for another run is refused by name, and students train from a store without
the teacher (same student as online, cascade first member only, the CLI)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skindistil.cli import main
from skindistil.config import DistillConfig, PreprocessConfig
from skindistil.errors import ConfigError
from skindistil.models import create_teacher, load_model, save_artifact
from skindistil.training.distill_run import distill
from skindistil.training.distiller import DistillerModule
from skindistil.training.teacher import build_datamodule
from skindistil.training.teacher_store import (
    TeacherStore,
    bytes_per_thousand_images_epoch,
    identity_mismatches,
    read_header,
    store_identity,
    write_teacher_store,
)

TEACHER_DEPTH = 4
TRAINER = {"max_epochs": 2, "precision": "32-true", "accelerator": "cpu", "devices": 1, "progress": False,
           "log_every_n_steps": 1, "limit_train_batches": 3}


def random_teacher(out_dir: Path, classes: list[str], seed: int = 0) -> Path:
    """A random 4-block ViT at 64 px with a large head (clearly non-uniform teacher probabilities)."""
    torch.manual_seed(seed)
    model = create_teacher("vit_base_patch16_224", num_classes=len(classes), embed_dim=48, depth=TEACHER_DEPTH,
                           num_heads=2, mlp_ratio=2.0, patch_size=16, img_size=64)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return save_artifact(model, out_dir / "model", classes=classes, preprocess=PreprocessConfig(image_size=64),
                         extra={"role": "teacher"})


@pytest.fixture(scope="module")
def teacher(ham_small, tmp_path_factory) -> Path:
    classes = json.loads((ham_small / "dataset.json").read_text())["classes"]
    return random_teacher(tmp_path_factory.mktemp("teacher"), classes)


def store_config(teacher: Path, data_dir: Path, out_dir: Path, name="student", method="distilvit", **fields):
    data = {"dir": str(data_dir), "batch_size": 16, "num_workers": 0, **fields.pop("data", {})}
    trainer = {**TRAINER, **fields.pop("trainer", {})}
    return DistillConfig.from_dict({
        "name": name, "out_dir": str(out_dir), "teacher": str(teacher), "method": method, "keep_blocks": 2,
        "min_depth": 2, "data": data, "optim": {"lr": 1e-3}, "trainer": trainer, **fields,
    })


@pytest.fixture(scope="module")
def stores(teacher, ham_small, tmp_path_factory):
    """hidden ("none", "cls", "all") -> a 2-epoch store of the teacher on ham_small, written on first use."""
    out = tmp_path_factory.mktemp("stores")
    made = {}

    def get(hidden: str) -> Path:
        if hidden not in made:
            cfg = store_config(teacher, ham_small, out)
            made[hidden] = write_teacher_store(cfg, out / hidden, hidden=hidden)
        return made[hidden]

    return get


def _student_pair(cfg: DistillConfig, teacher_dir: Path, method: str, store: TeacherStore):
    """The same student (same initial weights) wired to the online teacher and to the store."""
    from skindistil.models import MultiExitViT, extract_student

    teacher = load_model(teacher_dir)
    if method == "distilvit":
        student, _ = extract_student(teacher.model, 2, "first")
    else:
        student = MultiExitViT(load_model(teacher_dir).model, exits="all")
    online = DistillerModule(student, teacher.model, method, teacher.classes, cfg.optim, cfg.loss)
    stored = DistillerModule(student, None, method, teacher.classes, cfg.optim, cfg.loss, teacher_store=store)
    return online, stored


@pytest.mark.parametrize(("method", "hidden"), [("distilvit", "cls"), ("distilvit", "all"), ("full", "cls")])
def test_stored_loss_equals_the_online_loss_on_replayed_batches(teacher, ham_small, stores, tmp_path, method, hidden):
    cfg = store_config(teacher, ham_small, tmp_path, method=method,
                       loss={"a_cos": 0.5, "cos_tokens": hidden, "a_mse": 0.25, "a_kd": 0.5})
    datamodule = build_datamodule(cfg, load_model(teacher).preprocess)
    datamodule.train_keys = True
    datamodule.setup("fit")
    store = TeacherStore.open(stores(hidden), store_identity(cfg, load_model(teacher), datamodule, load_model(teacher).preprocess), epochs=2,
                              hidden=hidden)
    online, stored = _student_pair(cfg, teacher, method, store)
    online.eval(), stored.eval()  # no dropout: both see the same student function
    rows = len(datamodule.labels("train"))
    loader = datamodule.train_dataloader()
    compared = 0
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        for batch_index, batch in enumerate(loader):
            if batch_index == 2:
                break
            assert (batch[2] // rows == epoch).all()
            with torch.no_grad():
                loss_online, parts_online = online.training_loss(batch)
                loss_stored, parts_stored = stored.training_loss(batch)
            assert set(parts_online) == set(parts_stored) >= {"task", "kd", "mse", "cos"}
            for name, value in parts_online.items():
                torch.testing.assert_close(parts_stored[name], value, rtol=2e-3, atol=2e-3, msg=f"{name}, epoch {epoch}")
            torch.testing.assert_close(loss_stored, loss_online, rtol=2e-3, atol=2e-3)
            compared += 1
    assert compared == 4
    # the teacher's outputs differ between epochs (augmentation replayed per epoch, not one epoch reused)
    first = np.load(stores(hidden) / "epoch-0000-logits.npy")
    second = np.load(stores(hidden) / "epoch-0001-logits.npy")
    assert first.shape == second.shape == (rows, 7) and first.dtype == np.float16
    assert np.abs(first.astype(np.float32) - second.astype(np.float32)).max() > 1e-2


def test_a_student_of_another_input_size_distils_from_the_store_as_online(teacher, ham_small, tmp_path):
    """A 32 px student of the 64 px teacher: the store holds the teacher's view of the student's
    augmented 32 px images (reprocessed as online), and a store for a 64 px student is refused."""
    from skindistil.distill.start import student_start

    cfg = store_config(teacher, ham_small, tmp_path, student_init="vit_base_patch16_224",
                       student_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
                       student_preprocess={"image_size": 32})
    store_dir = write_teacher_store(cfg, tmp_path / "store32", hidden="none")
    loaded = load_model(teacher)
    start = student_start(cfg, loaded)
    assert start.preprocess.image_size == 32 and loaded.preprocess.image_size == 64
    datamodule = build_datamodule(cfg, start.preprocess)
    datamodule.train_keys = True
    datamodule.setup("fit")
    store = TeacherStore.open(store_dir, store_identity(cfg, loaded, datamodule, start.preprocess), epochs=2)
    torch.manual_seed(0)
    student = start.model
    online = DistillerModule(student, loaded.model, "distilvit", loaded.classes, cfg.optim, cfg.loss,
                             teacher_preprocess=loaded.preprocess, student_preprocess=start.preprocess).eval()
    stored = DistillerModule(student, None, "distilvit", loaded.classes, cfg.optim, cfg.loss,
                             teacher_store=store).eval()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch[0].shape[-1] == 32
    with torch.no_grad():
        (loss_online, parts_online), (loss_stored, parts_stored) = online.training_loss(batch), stored.training_loss(batch)
    assert parts_online["kd"] > 0
    torch.testing.assert_close(parts_stored["kd"], parts_online["kd"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss_stored, loss_online, rtol=2e-3, atol=2e-3)
    # the same run with a 64 px student (the teacher's own preprocessing) is another store
    wide = dataclasses.replace(cfg, student_preprocess={"image_size": 64}, student_kwargs={**cfg.student_kwargs})
    wide_start = student_start(wide, loaded)
    wide_data = build_datamodule(wide, wide_start.preprocess)
    wide_data.setup("fit")
    with pytest.raises(ConfigError, match=r"preprocessing differs \(student.image_size: store 32, run 64"):
        TeacherStore.open(store_dir, store_identity(wide, loaded, wide_data, wide_start.preprocess), epochs=2)


def test_store_header_size_and_hidden_shapes(stores, ham_small):
    path = stores("all")
    header = read_header(path)
    rows = header["dataset"]["rows"]
    assert header["epochs_written"] == 2 and header["hidden"] == "all" and header["seed"] == 42
    assert np.load(path / "epoch-0001-hidden.npy", mmap_mode="r").shape == (rows, 17, 48)  # 16 patches + class token
    assert np.load(stores("cls") / "epoch-0001-hidden.npy", mmap_mode="r").shape == (rows, 1, 48)
    assert not list(stores("none").glob("*hidden*"))
    expected = 1000 * header["bytes"] / (2 * rows)
    assert bytes_per_thousand_images_epoch(header) == pytest.approx(expected)
    assert header["bytes"] == sum(p.stat().st_size for p in path.glob("epoch-*.npy"))


def _refusal(cfg: DistillConfig, store: Path, teacher: Path) -> str:
    loaded = load_model(cfg.teacher)
    datamodule = build_datamodule(cfg, loaded.preprocess)
    datamodule.setup("fit")
    from skindistil.training.teacher_store import needed_hidden

    hidden = needed_hidden(cfg.method, cfg.loss.a_cos, cfg.loss.cos_tokens)
    with pytest.raises(ConfigError) as info:
        TeacherStore.open(store, store_identity(cfg, loaded, datamodule, loaded.preprocess), epochs=cfg.trainer.max_epochs, hidden=hidden)
    return str(info.value)


def test_a_store_made_for_another_run_is_refused_by_name(teacher, ham_small, stores, tmp_path):
    store = stores("none")
    base = store_config(teacher, ham_small, tmp_path)
    # the matching run opens it
    loaded = load_model(teacher)
    datamodule = build_datamodule(base, loaded.preprocess)
    datamodule.setup("fit")
    TeacherStore.open(store, store_identity(base, loaded, datamodule, loaded.preprocess), epochs=2)

    message = _refusal(dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, seed=7)), store, teacher)
    assert "seed (trainer.seed) differs (store 42, run 7)" in message and "teacher" not in message.split("another run")[1]

    other = random_teacher(tmp_path / "other", loaded.classes, seed=1)
    message = _refusal(dataclasses.replace(base, teacher=str(other)), store, teacher)
    assert "teacher (weights sha256) differs" in message and "preprocessing" not in message

    # the same weights with another preprocessing (mean) in config.json
    moved = tmp_path / "repre" / "model"
    shutil.copytree(teacher, moved)
    config = json.loads((moved / "config.json").read_text())
    config["preprocess"]["mean"] = [0.4, 0.5, 0.5]
    config.get("pretrained_cfg", {})["mean"] = [0.4, 0.5, 0.5]
    (moved / "config.json").write_text(json.dumps(config))
    message = _refusal(dataclasses.replace(base, teacher=str(moved)), store, teacher)
    assert "preprocessing differs (" in message and "teacher.mean: store [0.5, 0.5, 0.5], run [0.4, 0.5, 0.5]" in message
    assert "teacher (weights" not in message

    # another training split: two training rows swap labels
    data = tmp_path / "data"
    shutil.copytree(ham_small, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    train = manifest.index[manifest["split"] == "train"]
    first, other_row = train[0], next(i for i in train if manifest.at[i, "label"] != manifest.at[train[0], "label"])
    for column in ("label", "class_name"):
        manifest.loc[[first, other_row], column] = manifest.loc[[other_row, first], column].to_numpy()
    manifest.to_csv(data / "manifest.csv", index=False)
    message = _refusal(store_config(teacher, data, tmp_path), store, teacher)
    assert "dataset (training split) differs (train_fingerprint:" in message and "seed" not in message

    message = _refusal(dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, max_epochs=3)), store, teacher)
    assert "holds 2 complete epoch(s), the run trains 3" in message
    with_cos = dataclasses.replace(base, loss=dataclasses.replace(base.loss, a_cos=0.1, cos_tokens="cls"))
    assert "needs the teacher's hidden states (cls tokens" in _refusal(with_cos, store, teacher)
    all_tokens = dataclasses.replace(with_cos, loss=dataclasses.replace(with_cos.loss, cos_tokens="all"))
    assert "holds 'cls'" in _refusal(all_tokens, stores("cls"), teacher)

    # the writer refuses to add to a store of another run, and every mismatch is named at once
    with pytest.raises(ConfigError, match=r"holds a teacher store of another run: seed .*; teacher \(weights"):
        write_teacher_store(dataclasses.replace(base, teacher=str(other),
                                                trainer=dataclasses.replace(base.trainer, seed=7)), store, hidden="none")


def test_replay_needs_cpu_augmentation_and_a_teacher_term(teacher, ham_small, stores, tmp_path):
    device = store_config(teacher, ham_small, tmp_path, data={"augment_on": "device"}, teacher_store=str(stores("none")))
    with pytest.raises(ConfigError, match="augment_on='device' is not replayable"):
        distill(device)
    with pytest.raises(ConfigError, match="augment_on='device'"):
        write_teacher_store(device, tmp_path / "never")
    fcvit = store_config(teacher, ham_small, tmp_path, method="fcvit", teacher_store=str(stores("none")))
    with pytest.raises(ConfigError, match="method fcvit has no teacher term"):
        distill(fcvit)
    with pytest.raises(ConfigError, match="not a teacher store"):
        distill(store_config(teacher, ham_small, tmp_path, teacher_store=str(tmp_path)))


def test_identity_mismatches_lists_each_field():
    recorded = {"seed": 1, "teacher": {"weights_sha256": "a" * 64, "classes": ["x"]}, "preprocess": {"mean": [0.5]},
                "augmentation": {"augment_on": "cpu"}, "dataset": {"train_fingerprint": "f", "fold": None}}
    assert identity_mismatches(recorded, recorded) == []
    changed = {**recorded, "seed": 2, "dataset": {"train_fingerprint": "g", "fold": 0}}
    problems = identity_mismatches(recorded, changed)
    assert problems == ["seed (trainer.seed) differs (store 1, run 2)",
                        'dataset (training split) differs (fold: store null, run 0; train_fingerprint: store "f", run "g")']


@pytest.fixture
def teacher_calls():
    """The depth of every timm ViT that runs its forward pass during the test (a global forward pre-hook)."""
    from timm.models.vision_transformer import VisionTransformer

    depths = []

    def record(module, args):
        if isinstance(module, VisionTransformer):
            depths.append(len(module.blocks))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield depths
    handle.remove()


def test_a_student_from_the_store_is_the_online_student_without_the_teacher(teacher, ham_small, stores, tmp_path,
                                                                           teacher_calls):
    online_cfg = store_config(teacher, ham_small, tmp_path, name="online")
    stored_cfg = store_config(teacher, ham_small, tmp_path, name="stored", teacher_store=str(stores("none")))
    distill(online_cfg)
    assert TEACHER_DEPTH in teacher_calls  # the online run ran the teacher
    teacher_calls.clear()
    (result,) = distill(stored_cfg)
    assert teacher_calls and set(teacher_calls) == {2}  # only the 2-block student ran: no teacher forward
    online, stored = load_model(online_cfg.run_dir), load_model(stored_cfg.run_dir)
    assert stored.config["provenance"]["teacher_store"] == str(stores("none"))
    steps = pd.read_csv(stored_cfg.run_dir / "logs" / "metrics.csv")["train/kd"].notna().sum()
    assert steps == 6  # 2 epochs x 3 batches, every one with the KD term from the store
    before = load_model(teacher).model.state_dict()
    changed = 0
    for key, value in stored.model.state_dict().items():
        # fp16-rounded teacher logits move the weights by far less than training itself does
        torch.testing.assert_close(value, online.model.state_dict()[key], rtol=0, atol=2e-4, msg=key)
        changed += not torch.equal(value, before[key])
    assert changed > 10


def test_cascade_reads_the_store_for_its_first_member_only(teacher, ham_small, stores, tmp_path, teacher_calls):
    cfg = store_config(teacher, ham_small, tmp_path, name="cascade", method="cascade", teacher_store=str(stores("none")),
                       trainer={"max_epochs": 1, "limit_train_batches": 2})
    results = distill(cfg)
    assert [load_model(r.model_dir).config["provenance"].get("teacher_store") for r in results] == [
        str(stores("none")), None]
    # member 3 never ran the 4-block teacher; member 2 ran member 3 (its teacher) online
    assert TEACHER_DEPTH not in teacher_calls and teacher_calls.count(3) >= 2 + 2


def test_store_teacher_and_distill_cli(teacher, ham_small, tmp_path, capsys):
    common = ["--teacher", str(teacher.parent), "--data", str(ham_small), "--workers", "0", "--accelerator", "cpu",
              "--precision", "32-true"]
    assert main(["store-teacher", *common, "--epochs", "1", "--out", str(tmp_path / "store"), "--hidden", "cls",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    printed = " ".join(printed.split())  # rich wraps lines at the console width, wherever the path ends
    assert "1 epoch(s)" in printed and "hidden cls" in printed and "per 1,000 images per epoch" in printed
    assert read_header(tmp_path / "store")["hidden"] == "cls"
    assert main(["distill", *common, "--teacher-store", str(tmp_path / "store"), "--keep-blocks", "2", "--epochs", "1",
                 "--batch-size", "16", "--a-cos", "0.1", "--out-dir", str(tmp_path), "--name", "cli", "--no-progress",
                 "loss.cos_tokens=cls", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1"]) == 0
    log = pd.read_csv(tmp_path / "cli" / "logs" / "metrics.csv")
    assert log["train/cos"].notna().sum() == 2 and log["train/kd"].notna().sum() == 2
    assert main(["distill", *common, "--teacher-store", str(tmp_path / "store"), "--keep-blocks", "2", "--epochs", "2",
                 "--out-dir", str(tmp_path), "--name", "too-long", "--no-progress"]) == 1
    assert "holds 1 complete epoch(s), the run trains 2" in capsys.readouterr().err


def test_a_resumed_run_replays_the_store_where_it_stopped(teacher, ham_small, stores, tmp_path, monkeypatch):
    """Stopped in the middle of epoch 2 and resumed from its mid-epoch checkpoint, a run from the store reads
    the stored outputs of the batches it had not trained on: it ends with the weights of the run that was
    never stopped (a resume that replayed other stored outputs, or misaligned them with the views, would
    train the student on other targets)."""
    import lightning as L

    import skindistil.training.distill_run as distill_run

    store = str(stores("none"))

    def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    whole = store_config(teacher, ham_small, tmp_path, name="whole", teacher_store=store)
    distill(whole)

    class StopAtStep4(L.Callback):  # an interruption after the first of epoch 2's three batches
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step == 4

    build = distill_run.build_trainer
    monkeypatch.setattr(distill_run, "build_trainer", lambda *a, **k: build(*a, **k, extra_callbacks=[StopAtStep4()]))
    cut = store_config(teacher, ham_small, tmp_path, name="resumed", teacher_store=store,
                       trainer={"checkpoint_every_n_steps": 1})
    distill(cut)
    stopped = last_weights(cut.run_dir)
    monkeypatch.setattr(distill_run, "build_trainer", build)
    distill(cut, resume=True)
    log = pd.read_csv(cut.run_dir / "logs" / "metrics.csv")
    assert log["train/kd"].notna().sum() == 6  # 4 steps, then the 2 left: none trained twice
    resumed, reference = last_weights(cut.run_dir), last_weights(whole.run_dir)
    assert any(not torch.equal(resumed[k], stopped[k]) for k in resumed)  # the resumed run trained
    for key, value in resumed.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)
