"""Artifact io: save -> load_model gives identical logits; run dirs, model cards, corrupt files, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import skindistil
from skindistil.config import PreprocessConfig
from skindistil.errors import ImageError, ModelError
from skindistil.models import (
    MultiExitViT,
    create_teacher,
    extract_student,
    load_model,
    save_artifact,
    update_metrics,
)

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
PRE = PreprocessConfig(image_size=32)


def _vit(depth=4, img_size=32):
    torch.manual_seed(0)
    return create_teacher(num_classes=8, embed_dim=32, depth=depth, num_heads=2, img_size=img_size, patch_size=8).eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_vit_round_trip_is_exact_and_writes_every_file(tmp_path, x):
    model = _vit()
    out = save_artifact(model, tmp_path / "model", classes=CLASSES, preprocess=PRE, metrics={"val": {"balanced_accuracy": 0.5}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors", "model_card.md"]
    loaded = load_model(out)
    assert not loaded.model.training
    assert loaded.classes == CLASSES and loaded.preprocess == PRE and loaded.metrics == {"val": {"balanced_accuracy": 0.5}}
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), model(x))
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "vit" and config["architecture"] == "vit_base_patch16_224" and config["format"] == 2
    assert config["model_args"]["depth"] == 4 and config["label_names"] == config["classes"] == CLASSES
    card = (out / "model_card.md").read_text()
    assert "not a medical device" in card and "| val.balanced_accuracy | 0.5000 |" in card


def test_student_depth_comes_from_the_model_not_the_callers_arch(tmp_path, x):
    student, kept = extract_student(_vit(), 2, "uniform")
    arch = {"name": "vit_base_patch16_224", "kwargs": {"depth": 4, "img_size": 32, "drop_path_rate": 0.1}}
    save_artifact(student, tmp_path / "run" / "model", arch=arch, classes=CLASSES, preprocess=PRE,
                  extra={"role": "student", "kept_blocks": kept})
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["model_args"]["depth"] == 2
    assert config["model_args"]["drop_path_rate"] == 0.1
    assert config["provenance"]["kept_blocks"] == [0, 3]
    assert "Kept teacher blocks: 0, 3" in (tmp_path / "run" / "model" / "model_card.md").read_text()
    for path in (tmp_path / "run", tmp_path / "run" / "model" / "config.json"):  # run dir and config path
        with torch.no_grad():
            assert torch.equal(load_model(path).logits(x), student(x))
    assert torch.equal(skindistil.load_model(tmp_path / "run").logits(x), load_model(tmp_path / "run").logits(x))


@pytest.mark.parametrize("shared_head", [False, True])
def test_multi_exit_vit_round_trip(tmp_path, x, shared_head):
    model = MultiExitViT(_vit(), exits=[1, 3, 4], shared_head=shared_head).eval()
    save_artifact(model, tmp_path / "model", classes=CLASSES, preprocess=PRE)
    loaded = load_model(tmp_path / "model")
    assert isinstance(loaded.model, MultiExitViT)
    assert loaded.model.exits == [1, 3, 4] and loaded.model.shared_head is shared_head
    with torch.no_grad():
        assert torch.equal(loaded.model.forward_all(x), model.forward_all(x))


def test_update_metrics_merges_and_refreshes_the_card(tmp_path):
    save_artifact(_vit(depth=1), tmp_path, classes=CLASSES, preprocess=PRE, metrics={"val": {"balanced_accuracy": 0.5}})
    merged = update_metrics(tmp_path, {"test": {"balanced_accuracy": 0.25, "confusion": np.eye(2, dtype=np.int64), "auc": float("nan")}})
    assert merged == {"val": {"balanced_accuracy": 0.5}, "test": {"balanced_accuracy": 0.25, "confusion": [[1, 0], [0, 1]], "auc": None}}
    assert json.loads((tmp_path / "metrics.json").read_text()) == merged  # strict JSON: NaN became null
    assert "| test.balanced_accuracy | 0.2500 |" in (tmp_path / "model_card.md").read_text()


def test_class_names_must_match_the_head(tmp_path):
    with pytest.raises(ModelError, match="8 outputs but 2 class names"):
        save_artifact(_vit(depth=1), tmp_path, classes=["a", "b"], preprocess=PRE)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)

    out = save_artifact(_vit(depth=1), tmp_path / "model", classes=CLASSES, preprocess=PRE)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=r"model\.safetensors: cannot read weights \(truncated"):
        load_model(out)
    weights.unlink()
    with pytest.raises(ModelError, match=r"model\.safetensors: weight file not found"):
        load_model(out)

    save_artifact(_vit(depth=1), out, classes=CLASSES, preprocess=PRE)
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["depth"] = 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="num_parameters: config.json records 19,784 parameters but its architecture has 32,488"):
        load_model(out)
    config["num_parameters"] = sum(p.numel() for p in _vit(depth=2).parameters())
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="weights do not match config.json.*blocks.1"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json: not valid JSON"):
        load_model(out)


def test_predict_on_real_images_from_paths_pil_and_arrays(tmp_path, ham_root):
    paths = sorted((ham_root / "images").glob("*.jpg"))[:3]
    save_artifact(_vit(depth=1), tmp_path, classes=CLASSES, preprocess=PRE)
    loaded = load_model(tmp_path)
    probs = loaded.predict(paths, batch_size=2)
    assert probs.shape == (3, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    np.testing.assert_allclose(loaded.predict([Image.fromarray(a) for a in arrays]), probs, atol=1e-6)
    np.testing.assert_allclose(loaded.predict(arrays), probs, atol=1e-6)
    assert loaded.predict([]).shape == (0, 8)
    # one path (str or Path), one PIL image, one array: one image, never iterated over
    for one in (str(paths[1]), paths[1], Image.fromarray(arrays[1]), arrays[1]):
        np.testing.assert_allclose(loaded.predict(one), probs[1:2], atol=1e-6)
    np.testing.assert_allclose(loaded.predict(np.stack(arrays[:2])), probs[:2], atol=1e-6)  # N x H x W x 3
    # a greyscale array is decoded as the greyscale image it is
    grey = np.asarray(Image.open(paths[0]).convert("L"))
    np.testing.assert_allclose(loaded.predict(grey), loaded.predict(Image.fromarray(grey).convert("RGB")), atol=1e-6)
    with pytest.raises(ImageError, match="image 0: float32 array: floating-point pixels have no defined white"):
        loaded.predict([arrays[0].astype(np.float32)])
    with pytest.raises(ImageError, match="cannot read int as an image"):
        loaded.predict([7])


def test_preprocessing_removes_a_black_dermoscope_border(tmp_path, ham_root):
    image = np.asarray(Image.open(sorted((ham_root / "images").glob("*.jpg"))[0]).convert("RGB"))
    framed = np.pad(image, ((30, 30), (40, 40), (0, 0)))  # a pure black frame around the lesion field
    save_artifact(_vit(depth=1), tmp_path, classes=CLASSES, preprocess=PRE)
    loaded = load_model(tmp_path)
    batch = loaded.preprocess_images([image, framed])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[1])


def test_split_preprocessing_is_the_eval_transform_bit_for_bit(tmp_path, ham_root, uda_root):
    from skindistil.data.imageio import border_crop_box, read_image
    from skindistil.data.transforms import build_eval_transform

    pre = PreprocessConfig(image_size=48)
    save_artifact(_vit(depth=1, img_size=48), tmp_path, classes=CLASSES, preprocess=pre)
    loaded = load_model(tmp_path)
    paths = sorted((ham_root / "images").glob("*.jpg"))[:12] + sorted((uda_root / "images").glob("*.jpg"))[:4]
    arrays = [np.asarray(read_image(p)) for p in paths]
    arrays.append(np.pad(arrays[0], ((20, 20), (30, 30), (0, 0))))  # a black frame: the full border search
    transform = build_eval_transform(pre)
    expected_batch = []
    for rgb in arrays:
        x0, y0, x1, y1 = border_crop_box(rgb)
        # the grey-level search the fast path skips, written out: its answer must be the same box
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        if (gray > 20).all():
            assert (x0, y0, x1, y1) == (0, 0, rgb.shape[1], rgb.shape[0])
        expected = transform(torch.from_numpy(rgb[y0:y1, x0:x1].copy()).permute(2, 0, 1))
        prepared = loaded.prepare_image(rgb)
        assert prepared.dtype == torch.uint8 and prepared.shape == (3, 48, 48)
        assert torch.equal(loaded.normalize(prepared[None])[0], expected)
        expected_batch.append(expected)
    assert torch.equal(loaded.preprocess_images(arrays), torch.stack(expected_batch))
