"""Any timm classifier as the teacher: convnets through train, the artifact, evaluate, predict, export,
benchmark, serve and explain; distillation from a convnet into a ViT student (with the DeiT token),
each model through its own preprocessing, and the refusals. Real HAM10000 images throughout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from skindistil.cli import main
from skindistil.config import DistillConfig, LossConfig, OptimConfig, PreprocessConfig
from skindistil.data.datamodule import SkinDataModule
from skindistil.data.transforms import eval_resize_crop, normalize_uint8, reprocess
from skindistil.errors import ConfigError, ModelError
from skindistil.evaluation.metrics import balanced_accuracy, decide
from skindistil.inference.export import export_artifact
from skindistil.models import create_teacher, load_model, save_artifact
from skindistil.models.distilled import is_distilled
from skindistil.models.teacher import accepts_img_size
from skindistil.serve import create_app
from skindistil.training.distill_run import distill
from skindistil.training.distiller import DistillerModule

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "mlp_ratio": 2.0}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TRAINER = {"max_epochs": 1, "precision": "32-true", "accelerator": "cpu", "devices": 1, "progress": False,
           "log_every_n_steps": 1, "limit_train_batches": 3}


@pytest.fixture(scope="module")
def cnn_teacher(ham_small, tmp_path_factory) -> Path:
    """A tiny ResNet-18 trained 1 epoch through the CLI at 48 px with ImageNet normalisation."""
    out = tmp_path_factory.mktemp("cnn")
    rc = main(["train", "--data", str(ham_small), "--model", "resnet18", "--out-dir", str(out), "--name", "resnet",
               "--epochs", "1", "--batch-size", "32", "--accelerator", "cpu", "--workers", "0", "--no-progress",
               f"model.kwargs={json.dumps(TINY_RESNET)}", "preprocess.image_size=48",
               f"preprocess.mean={IMAGENET['mean']}", f"preprocess.std={IMAGENET['std']}",
               "trainer.precision=32-true", "trainer.log_every_n_steps=1"])
    assert rc == 0
    return out / "resnet" / "model"


def test_only_fixed_grid_models_take_img_size():
    assert accepts_img_size("vit_base_patch16_224") and accepts_img_size("deit_tiny_distilled_patch16_224")
    for name in ("resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002"):
        assert not accepts_img_size(name)
    with pytest.raises(ModelError, match="unknown timm model"):
        accepts_img_size("resnet_nonexistent")


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_convnet_artifacts_round_trip(name, tmp_path, ham_root):
    torch.manual_seed(0)
    model = create_teacher(name, num_classes=7)
    out = save_artifact(model, tmp_path / name, arch={"name": name, "kwargs": {}}, classes=HAM_CLASSES,
                        preprocess=PreprocessConfig(image_size=32))
    loaded = load_model(out)
    assert loaded.config["kind"] == "timm" and loaded.architecture == {"name": name, "kwargs": {"num_classes": 7}}
    assert f"timm `{name}` (not a ViT), input 32 px" in (out / "model_card.md").read_text()
    images = sorted((ham_root / "images").glob("*.jpg"))[:3]
    batch = loaded.preprocess_images(images)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), model.eval()(batch), rtol=0, atol=0)


def test_convnet_teacher_trains_and_its_artifact_rebuilds(cnn_teacher, ham_small):
    config = json.loads((cnn_teacher / "config.json").read_text())
    assert config["kind"] == "timm"
    assert config["architecture"] == "resnet18" and config["model_args"] == {**TINY_RESNET, "num_classes": 7}
    metrics = pd.read_csv(cnn_teacher.parent / "logs" / "metrics.csv")
    assert metrics["train/loss_step"].notna().sum() >= 3 and metrics["val/balanced_accuracy"].notna().any()
    loaded = load_model(cnn_teacher)
    assert loaded.preprocess.image_size == 48 and list(loaded.preprocess.mean) == IMAGENET["mean"]
    # evaluate: its BMA is the BMA of the model's own predictions on the test split
    assert main(["evaluate", "--model", str(cnn_teacher), "--data", str(ham_small), "--workers", "0"]) == 0
    scored = json.loads((cnn_teacher.parent / "eval" / "test" / "metrics.json").read_text())
    dm = SkinDataModule(ham_small, loaded.preprocess, batch_size=64, num_workers=0)
    probs, labels = [], []
    for images, targets in dm.test_dataloader():
        probs.append(loaded.probabilities(loaded.logits(images)).numpy())
        labels.append(targets.numpy())
    bma = balanced_accuracy(np.concatenate(labels), decide(np.concatenate(probs)), 7)
    assert scored["headline"]["balanced_accuracy"] == pytest.approx(bma, abs=1e-9)


def test_convnet_teacher_predicts_exports_benchmarks_and_serves(cnn_teacher, ham_root, tmp_path, capsys):
    images = sorted((ham_root / "images").glob("*.jpg"))[:4]
    loaded = load_model(cnn_teacher)
    expected = loaded.predict(images)
    assert main(["predict", "--model", str(cnn_teacher), *map(str, images), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(table[HAM_CLASSES].to_numpy(), expected, atol=1e-6)

    record = export_artifact(cnn_teacher, out=tmp_path / "resnet.onnx", images=images)
    assert record["parity"]["ok"] and record["input"]["shape"][1:] == [3, 48, 48]

    assert main(["benchmark", "--models", str(cnn_teacher), "--batch-sizes", "1", "--repeats", "3", "--seconds",
                 "1", "--warmup", "1", "--out", str(tmp_path / "bench")]) == 0
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["results"] and all(r["ms_per_image"] > 0 for r in bench["results"])

    with TestClient(create_app(cnn_teacher)) as client:
        data = images[0].read_bytes()
        answer = client.post("/v1/predict", files={"file": ("a.jpg", data, "image/jpeg")})
        assert answer.status_code == 200
        probs = answer.json()["probabilities"]
        np.testing.assert_allclose([probs[c] for c in HAM_CLASSES], expected[0], atol=1e-5)
        assert client.get("/v1/model").json()["kind"] == "timm"
        # a convnet is explained by Grad-CAM, by default and by name; rollout is refused, naming gradcam
        explained = client.post("/v1/explain", files={"file": ("a.jpg", data, "image/jpeg")})
        assert explained.status_code == 200 and explained.content.startswith(b"\x89PNG")
        assert explained.headers["X-Top-Class"] == HAM_CLASSES[int(expected[0].argmax())]
        named = client.post("/v1/explain?method=gradcam", files={"file": ("a.jpg", data, "image/jpeg")})
        assert named.status_code == 200 and named.content == explained.content
        refused = client.post("/v1/explain?method=rollout", files={"file": ("a.jpg", data, "image/jpeg")})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "unsupported_method" and "gradcam" in error["message"]
    capsys.readouterr()
    assert main(["explain", "--model", str(cnn_teacher), str(images[0]), "--out", str(tmp_path / "explain")]) == 0
    assert [p.name for p in (tmp_path / "explain").glob("*.png")] != []
    assert main(["explain", "--model", str(cnn_teacher), str(images[0]), "--method", "rollout",
                 "--out", str(tmp_path / "refused")]) != 0
    assert "gradcam" in capsys.readouterr().err


# -------------------------------------------------------------------------------- distillation


def distill_cfg(teacher: Path, data: Path, out: Path, name: str, **fields) -> DistillConfig:
    loss = fields.pop("loss", {})
    return DistillConfig.from_dict({
        "name": name, "out_dir": str(out), "teacher": str(teacher), "method": "distilvit", "keep_blocks": 2,
        "student_init": "vit_base_patch16_224", "student_kwargs": TINY_VIT,
        "student_preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "loss": {"a_kd": 0.0, "a_mse": 0.0, "distillation_token": "hard", **loss},
        "data": {"dir": str(data), "batch_size": 32, "num_workers": 0},
        "optim": {"lr": 1e-3},
        "trainer": TRAINER,
        **fields,
    })


def test_convnet_teacher_distils_into_a_vit_with_the_distillation_token(cnn_teacher, ham_small, tmp_path, ham_root):
    cfg = distill_cfg(cnn_teacher, ham_small, tmp_path, "deit")
    [result] = distill(cfg)
    loaded = load_model(result.model_dir)
    assert is_distilled(loaded.model) and len(loaded.model.blocks) == 2 and loaded.config["kind"] == "vit"
    assert loaded.architecture["name"] == "deit_base_distilled_patch16_224"
    assert loaded.preprocess.image_size == 32 and list(loaded.preprocess.mean) == [0.5] * 3
    provenance = loaded.config["provenance"]
    assert provenance["student_init"] == "vit_base_patch16_224" and provenance["kept_blocks"] == [0, 1]
    assert provenance["loss"]["distillation_token"] == "hard"
    logs = pd.read_csv(result.run_dir / "logs" / "metrics.csv")
    for part in ("train/task", "train/dist"):  # CE on the class token, the hard token term
        assert logs[part].notna().sum() == 3 and (logs[part].dropna() > 0).all()
    assert "train/kd" not in logs and "train/mse" not in logs
    probs = loaded.predict(sorted((ham_root / "images").glob("*.jpg"))[:5])
    assert probs.shape == (5, 7) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert main(["evaluate", "--model", str(result.model_dir), "--data", str(ham_small), "--workers", "0"]) == 0


def test_student_from_a_vit_artifact_keeps_chosen_blocks(cnn_teacher, ham_small, tmp_path):
    torch.manual_seed(0)
    vit = create_teacher("vit_base_patch16_224", 7, img_size=32, **TINY_VIT)
    start = save_artifact(vit, tmp_path / "vit" / "model", classes=HAM_CLASSES, preprocess=PreprocessConfig(image_size=32))
    trainer = {**TRAINER, "limit_train_batches": 1}
    cfg = distill_cfg(cnn_teacher, ham_small, tmp_path, "from-artifact", student_init=str(start.parent),
                      student_kwargs={}, student_preprocess={}, keep_blocks=[0, 2], trainer=trainer,
                      loss={"distillation_token": "none", "a_kd": 0.5})
    [result] = distill(cfg)
    loaded = load_model(result.model_dir)
    assert not is_distilled(loaded.model) and len(loaded.model.blocks) == 2
    assert loaded.config["provenance"]["kept_blocks"] == [0, 2]
    assert loaded.config["provenance"]["student_init"] == str(start)
    assert loaded.preprocess == PreprocessConfig(image_size=32)
    assert f"Kept `{start}` blocks: 0, 2" in (result.model_dir / "model_card.md").read_text()


def test_the_teacher_sees_its_own_preprocessing_of_the_students_view(ham_small):
    student_pre = PreprocessConfig(image_size=32)
    teacher_pre = PreprocessConfig(image_size=48, **{k: tuple(v) for k, v in IMAGENET.items()})
    dm = SkinDataModule(ham_small, student_pre, batch_size=4, num_workers=0)
    images, _ = next(iter(dm.test_dataloader()))
    # same size: only the normalisation changes, and the result is the teacher's own normalisation
    same_size = dataclasses.replace(teacher_pre, image_size=32)
    raw = torch.stack([eval_resize_crop(dm.dataset("test").load(i), student_pre) for i in range(4)])
    torch.testing.assert_close(reprocess(images, student_pre, same_size), normalize_uint8(raw, same_size),
                               rtol=0, atol=1e-5)
    assert reprocess(images, student_pre, student_pre) is images
    # another size: the [0, 1] view resized (antialiased bilinear), then normalised
    seen = []
    teacher = create_teacher("resnet18", 7, **TINY_RESNET).eval()
    teacher.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    module = DistillerModule(create_teacher("vit_base_patch16_224", 7, img_size=32, **TINY_VIT), teacher,
                             "distilvit", HAM_CLASSES, OptimConfig(), LossConfig(),
                             teacher_preprocess=teacher_pre, student_preprocess=student_pre)
    module.training_loss((images, torch.zeros(4, dtype=torch.long)))
    unit = images * 0.5 + 0.5
    resized = torch.nn.functional.interpolate(unit, size=(48, 48), mode="bilinear", antialias=True,
                                              align_corners=False)
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert seen[0].shape == (4, 3, 48, 48)
    torch.testing.assert_close(seen[0], (resized - mean) / std, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("fields", "message"), [
    ({"student_init": None, "student_kwargs": {}, "student_preprocess": {}}, r"not a ViT.*--student-init"),
    ({"loss": {"a_cos": 0.1}}, r"loss.a_cos=0.1.*not a ViT"),
    ({"method": "cascade", "student_init": None, "student_kwargs": {}, "student_preprocess": {}},
     r"method cascade.*not a ViT"),
    ({"method": "fcvit"}, r"distillation_token=hard: method fcvit"),
    ({"loss": {"distillation_token": "soft-ish"}}, r"loss.distillation_token: 'soft-ish'"),
    ({"student_init": "resnet18", "student_kwargs": TINY_RESNET}, r"student_init: resnet18 is a timm ResNet, not a ViT"),
    ({"student_init": "no_such_dir/model"}, r"neither an existing model directory nor a timm model name"),
    ({"student_preprocess": {"image_size": 32, "crop_size": 3}}, r"student_preprocess: .*unknown field.*crop_size"),
])
def test_what_cannot_be_distilled_is_refused_before_training(cnn_teacher, ham_small, tmp_path, fields, message):
    cfg = distill_cfg(cnn_teacher, ham_small, tmp_path, "refused", **fields)
    with pytest.raises(ConfigError, match=message):
        distill(cfg)
    assert not (tmp_path / "refused").exists()


def test_ablation_of_a_convnet_teacher_leaves_the_cosine_out(cnn_teacher, ham_small, tmp_path):
    from skindistil.experiments.ablation import run_ablation

    with pytest.raises(ConfigError, match=r"--cos-weight 0.1: the teacher .* is not a ViT"):
        run_ablation(distill_cfg(cnn_teacher, ham_small, tmp_path, "ablate"), cos_weight=0.1)
    assert not (tmp_path / "ablate").exists()


def test_student_input_and_hidden_states_must_match(cnn_teacher, ham_small, tmp_path):
    torch.manual_seed(0)
    wide = save_artifact(create_teacher("vit_base_patch16_224", 7, img_size=32, **{**TINY_VIT, "embed_dim": 48}),
                         tmp_path / "wide", classes=HAM_CLASSES, preprocess=PreprocessConfig(image_size=32))
    narrow = save_artifact(create_teacher("vit_base_patch16_224", 7, img_size=32, **TINY_VIT),
                           tmp_path / "narrow", classes=HAM_CLASSES, preprocess=PreprocessConfig(image_size=32))
    no_student = {"student_init": str(narrow), "student_kwargs": {}, "student_preprocess": {}}
    with pytest.raises(ConfigError, match=r"student ViT .* takes 32x32 inputs but its preprocessing gives 40x40"):
        distill(distill_cfg(cnn_teacher, ham_small, tmp_path, "x", **{**no_student,
                                                                         "student_preprocess": {"image_size": 40}}))
    with pytest.raises(ConfigError, match="student_kwargs: apply to a timm name"):
        distill(distill_cfg(cnn_teacher, ham_small, tmp_path, "x", **{**no_student, "student_kwargs": {"depth": 2}}))
    with pytest.raises(ConfigError, match=r"hidden states are 32 wide, the teacher's 48"):
        distill(distill_cfg(wide, ham_small, tmp_path, "x", **no_student, loss={"a_cos": 0.1}))
