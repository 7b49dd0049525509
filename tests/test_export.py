"""ONNX export: parity with PyTorch, dynamic batch, int8 agreement on real HAM10000 images, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.errors import ConfigError, ImageError, ModelError
from skindistil.inference.export import collect_images, export_artifact, max_abs_diff, top1_agreement
from skindistil.inference.onnx import OnnxRunner
from skindistil.models import MultiExitViT, create_teacher, load_model, save_artifact

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def tiny_vit(depth: int = 2):
    torch.manual_seed(0)
    return create_teacher("vit_base_patch16_224", 8, depth=depth, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


@pytest.fixture
def artifact(tmp_path):
    return save_artifact(tiny_vit(), tmp_path / "run" / "model", classes=CLASSES, preprocess=PreprocessConfig(image_size=32))


@pytest.fixture(scope="module")
def ham_images(ham_root):
    return collect_images([ham_root / "images"], limit=20).files


def test_export_cli_int8_on_ham_images(artifact, ham_root, capsys):
    rc = main(["export", "--model", str(artifact.parent), "--int8", "--images", str(ham_root / "images"), "--max-images", "20"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and "top-1 agreement with fp32" in printed

    record = json.loads((artifact / "export.json").read_text())
    assert record["opset"] == 17 and record["dynamic_batch"] and record["input"]["shape"][1:] == [3, 32, 32]
    assert record["parity"]["ok"] and record["parity"]["max_abs_diff"] <= 1e-4
    assert record["parity"]["images"] == 20
    int8 = record["int8"]
    assert int8["agreement_on"] == "images" and int8["num_inputs"] == 20
    assert 0.0 <= int8["top1_agreement"] <= 1.0
    assert f"{int8['top1_agreement']:.4f}" in printed
    assert (artifact / "model.int8.onnx").stat().st_size == int8["onnx_bytes"]
    assert int8["cpu_latency_ms"]["fp32"] > 0 and int8["cpu_latency_ms"]["int8"] > 0

    # the file has a dynamic batch: batch 1 and 3 both match PyTorch
    loaded = load_model(artifact)
    runner = OnnxRunner(artifact / "model.onnx")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        logits = runner(x.numpy())
        assert logits.shape == (batch, 8)
        assert max_abs_diff(logits, loaded.logits(x)) <= 1e-4
    with pytest.raises(ModelError, match=r"expected images \[B, 3, H, W\]"):
        runner(np.zeros((3, 32, 32), dtype=np.float32))
    # int8 agreement recomputed from the two files on the same preprocessed images
    images = loaded.preprocess_images(collect_images([ham_root / "images"], limit=20).files).numpy()
    agreement = top1_agreement(runner(images), OnnxRunner(artifact / "model.int8.onnx")(images))
    assert agreement == pytest.approx(int8["top1_agreement"])


def test_export_depth_vit_to_custom_path(tmp_path, ham_images):
    model = MultiExitViT(tiny_vit(depth=3), exits="all")
    model_dir = save_artifact(model, tmp_path / "student", classes=CLASSES, preprocess=PreprocessConfig(image_size=32))
    out = tmp_path / "exported" / "student.onnx"
    record = export_artifact(model_dir, out=out, images=ham_images[:4], num_random=3)
    assert out.is_file() and (out.parent / "export.json").is_file()
    assert not (model_dir / "model.onnx").exists()
    assert record["parity"]["ok"] and "int8" not in record
    x = torch.randn(2, 3, 32, 32)
    assert max_abs_diff(OnnxRunner(out)(x), load_model(model_dir).logits(x)) <= 1e-4


def test_int8_without_images_agrees_on_random_inputs(artifact):
    record = export_artifact(artifact, int8=True, num_random=6)
    assert record["int8"]["agreement_on"] == "random inputs" and record["int8"]["num_inputs"] == 6


def test_agreement_and_diff_definitions():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, 1.0]])
    b = np.array([[0.9, 0.1], [1.0, 0.0], [2.5, 3.0], [4.0, 1.0]])
    assert top1_agreement(a, b) == 0.75
    assert max_abs_diff(a, b) == pytest.approx(1.0)


def test_export_bad_inputs(tmp_path, artifact, capsys):
    assert main(["export", "--model", str(tmp_path / "missing")]) == 1
    assert "no such model directory" in capsys.readouterr().err
    assert main(["export", "--model", str(artifact), "--images", str(tmp_path / "nope.jpg")]) == 1
    assert "nope.jpg: no such file or directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="opset 11"):
        export_artifact(artifact, opset=11)
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_artifact(artifact, out=tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no image files"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(ModelError, match="ONNX file not found"):
        OnnxRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        OnnxRunner(tmp_path / "junk.onnx")
    with pytest.raises(SystemExit):
        main(["export", "--model", str(artifact), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
