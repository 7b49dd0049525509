"""`skindistil predict` and the Predictor: real HAM10000 images through a tiny saved artifact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image, ImageOps

import skindistil
from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.data.discovery import discover_images
from skindistil.data.vocab import ISIC2019
from skindistil.errors import ConfigError, CSVError, ImageError
from skindistil.evaluation.report import read_predictions_csv
from skindistil.inference.predictor import Predictor, errors_csv_path
from skindistil.models import save_artifact

CLASSES = list(ISIC2019.names)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A random 2-block ViT at 32 px with the ISIC 2019 classes. HAM images are 200x150: shorter side
    to 36, then a centre crop of 32 leaves even margins (8 and 2 px), so the crop is flip-symmetric."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=len(CLASSES),
    )
    # timm initialises the head near zero, which gives near-uniform probabilities; a larger head makes
    # the predictions (and the differences TTA makes) clearly non-trivial
    torch.nn.init.normal_(model.head.weight, std=1.0)
    preprocess = PreprocessConfig(image_size=32, crop_fraction=8 / 9)
    assert preprocess.resize_size == 36
    return save_artifact(
        model, tmp_path_factory.mktemp("tiny") / "model", classes=CLASSES, preprocess=preprocess
    )


@pytest.fixture(scope="module")
def images(ham_root):
    return sorted((ham_root / "images").glob("*.jpg"))[:10]


def _predict(*argv) -> int:
    return main(["predict", "--no-progress", *map(str, argv)])


def test_csv_output_is_isic_format(artifact, images, tmp_path):
    out = tmp_path / "predictions.csv"
    assert _predict("--model", artifact, *images, "--out", out) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["image", *CLASSES]
    assert list(table["image"]) == [p.stem for p in images]
    np.testing.assert_allclose(table[CLASSES].to_numpy().sum(axis=1), 1.0, atol=1e-5)
    ids, scores, ignored = read_predictions_csv(out, CLASSES)  # what `skindistil evaluate` reads
    assert ids == [p.stem for p in images] and not ignored
    np.testing.assert_allclose(scores, Predictor(artifact).predict(images), atol=1e-6)
    # every input was predicted: no error sidecar, and a stale one from an earlier run is removed
    assert errors_csv_path(out).name == "predictions.errors.csv"
    assert not errors_csv_path(out).exists()
    errors_csv_path(out).write_text("where,reason\nold.jpg,an earlier run's failure\n")
    assert _predict("--model", artifact, *images, "--out", out) == 0
    assert not errors_csv_path(out).exists()


def test_folders_and_csv_lists(artifact, images, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for path in images[:3]:
        (photos / path.name).symlink_to(path)
    (photos / "sub" / images[3].name.replace(".jpg", ".JPG")).symlink_to(images[3])
    (photos / "notes.txt").write_text("not an image")
    listing = tmp_path / "lists" / "lesions.csv"
    listing.parent.mkdir()
    pd.DataFrame(
        {"lesion": ["a", "b"], "path": ["../photos/sub/" + images[3].name.replace(".jpg", ".JPG"), images[5]]}
    ).to_csv(listing, index=False)
    by_image = tmp_path / "by_image.csv"
    pd.DataFrame({"image": [images[6], ""]}).to_csv(by_image, index=False)

    found = discover_images([photos, listing, by_image, images[0]], read_lists=True)
    paths = found.files
    # folder recursively and sorted; the CSV's relative path resolved from its folder; repeats dropped
    assert [p.stem for p in paths] == [images[i].stem for i in (0, 1, 2, 3, 5, 6)]
    assert [p.where for p in found.skipped] == [str(photos / "notes.txt"), f"{by_image} row 3"]
    assert "'.txt' is not an image extension" in found.skipped[0].reason
    assert found.skipped[1].reason == "empty 'image' cell"

    out = tmp_path / "out.json"
    assert _predict("--model", artifact, photos, listing, by_image, "--out", out) == 0
    document = json.loads(out.read_text())
    assert [p["image"] for p in document["predictions"]] == [p.stem for p in paths]
    assert document["errors"] == []
    assert document["skipped"] == [p.to_dict() for p in found.skipped]

    bad = tmp_path / "bad.csv"
    pd.DataFrame({"file": ["x.jpg"]}).to_csv(bad, index=False)
    with pytest.raises(CSVError, match="expected one of path, image"):
        discover_images([bad], read_lists=True)


def test_json_top_k(artifact, images, tmp_path):
    out = tmp_path / "predictions.json"
    assert _predict("--model", artifact, *images[:4], "--out", out, "--top-k", "3") == 0
    document = json.loads(out.read_text())
    assert document["classes"] == CLASSES and document["tta"] is False and document["num_errors"] == 0
    expected = Predictor(artifact).predict(images[:4])
    for entry, row in zip(document["predictions"], expected, strict=True):
        top = entry["top_k"]
        assert [t["class"] for t in top] == [CLASSES[i] for i in np.argsort(-row)[:3]]
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert sum(entry["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert entry["probs"][top[0]["class"]] == pytest.approx(float(row.max()), abs=1e-6)


def test_unreadable_files_are_listed_and_the_rest_predicted(artifact, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images[0].read_bytes()[:2000])
    missing = tmp_path / "missing.png"
    good = images[:3]
    out = tmp_path / "predictions.csv"
    assert (
        _predict("--model", artifact, good[0], corrupt, good[1], missing, truncated, good[2], "--out", out)
        == 0
    )
    assert list(pd.read_csv(out)["image"]) == [p.stem for p in good]
    errors = pd.read_csv(errors_csv_path(out))
    assert list(errors["where"]) == [str(corrupt), str(missing), str(truncated)]
    reasons = dict(zip(errors["where"], errors["reason"], strict=True))
    assert reasons[str(missing)] == "file not found"
    assert reasons[str(corrupt)].startswith(("corrupt image", "not an image"))
    assert "truncated" in reasons[str(truncated)]
    err = capsys.readouterr().err
    assert f"failed {missing}: file not found" in err
    assert "predicted 3 image(s), 3 failed, 0 not taken" in err

    json_out = tmp_path / "predictions.json"
    assert _predict("--model", artifact, good[0], missing, "--out", json_out) == 0
    assert json.loads(json_out.read_text())["errors"] == [{"where": str(missing), "reason": "file not found"}]

    assert _predict("--model", artifact, corrupt, missing, "--out", tmp_path / "none.csv") == 1
    assert "predicted 0 image(s), 2 failed, 0 not taken" in capsys.readouterr().err


def test_tta_is_a_flip_invariant_distribution(artifact, images):
    plain = Predictor(artifact).predict(images)
    tta = Predictor(artifact, tta=True)
    probs = tta.predict(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs - plain).max() > 1e-3
    # the definition: the mean of the softmax over the four flips of the model's input
    loaded = tta.loaded
    batch = loaded.preprocess_images(images)
    views = [batch, batch.flip(-1), batch.flip(-2), batch.flip((-2, -1))]
    expected = torch.stack([loaded.logits(v).softmax(dim=-1) for v in views]).mean(dim=0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    originals = [Image.open(p).convert("RGB") for p in images]
    for flip in (ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(180)):
        np.testing.assert_allclose(tta.predict([flip(im) for im in originals]), probs, atol=1e-5)


def test_predictor_agrees_with_load_model_predict(artifact, images):
    mixed = [
        images[0],
        str(images[1]),
        Image.open(images[2]),
        np.asarray(Image.open(images[3]).convert("RGB")),
        *images[4:],
    ]
    reference = skindistil.load_model(artifact).predict(mixed)
    assert reference.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(Predictor(artifact).predict(mixed), reference, atol=1e-6)
    # batching and decoding threads change nothing, and order is kept
    small = Predictor(artifact, batch_size=3, workers=1).predict_files(images)
    assert small.ids == [p.stem for p in images] and small.paths == [str(p) for p in images]
    np.testing.assert_allclose(small.probs, reference, atol=1e-6)
    with pytest.raises(ImageError, match="file not found"):
        Predictor(artifact).predict([images[0], images[0].with_name("absent.jpg")])
    with pytest.raises(ConfigError, match="unknown backend"):
        Predictor(artifact, backend="tensorrt")


def test_onnx_backend_matches_torch(artifact, images, tmp_path):
    for tta in (False, True):
        torch_probs = Predictor(artifact, tta=tta).predict(images)
        onnx_probs = Predictor(artifact, backend="onnx", tta=tta).predict(images)
        np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    out = tmp_path / "onnx.csv"
    assert _predict("--model", artifact, *images, "--backend", "onnx", "--out", out) == 0
    np.testing.assert_allclose(
        pd.read_csv(out)[CLASSES].to_numpy(), Predictor(artifact).predict(images), atol=1e-4
    )


def test_cli_rejects_bad_options(artifact, images, tmp_path, capsys):
    assert _predict("--model", artifact, images[0], "--out", tmp_path / "p.txt") == 1
    assert "must end in .csv or .json" in capsys.readouterr().err
    assert _predict("--model", tmp_path / "nowhere", images[0]) == 1
    assert "no such model directory" in capsys.readouterr().err


def test_the_stored_temperature_sets_predicts_probabilities(artifact, images, tmp_path):
    """A calibrated artifact's predictions are softmax(logits / T) through LoadedModel.predict and the
    Predictor, with and without TTA; T = 2.5 visibly flattens them."""
    import shutil

    from skindistil.inference.predictor import TTA_FLIPS
    from skindistil.models.artifact import set_calibration

    calibrated = tmp_path / "model"
    shutil.copytree(artifact, calibrated)
    set_calibration(calibrated, 2.5, fitted_on="val")
    loaded = skindistil.load_model(calibrated)
    assert loaded.temperature == 2.5
    batch = loaded.preprocess_images(images)
    expected = (loaded.logits(batch).float() / 2.5).softmax(dim=-1).numpy()
    np.testing.assert_allclose(loaded.predict(images), expected, atol=1e-6)
    np.testing.assert_allclose(Predictor(calibrated).predict(images), expected, atol=1e-6)
    uncalibrated = skindistil.load_model(artifact).predict(images)
    assert np.abs(uncalibrated - expected).max() > 0.05
    assert (expected.max(axis=1) < uncalibrated.max(axis=1)).all()  # T > 1 lowers every top probability
    views = [batch.flip(dims) if dims else batch for dims in TTA_FLIPS]
    tta_expected = np.mean([(loaded.logits(v).float() / 2.5).softmax(dim=-1).numpy() for v in views], axis=0)
    np.testing.assert_allclose(Predictor(calibrated, tta=True).predict(images), tta_expected, atol=1e-6)


def test_an_id_given_twice_is_warned_about_naming_it(artifact, images, tmp_path, capsys):
    """x.jpg and x.png in one folder predict one id twice: the CSV keeps both rows, and the warning names the id
    and both ways it can happen (one stem in several folders, or with several extensions)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(images[0], folder / images[0].name)
    Image.open(images[0]).save(folder / f"{images[0].stem}.png")
    shutil.copy(images[1], folder / images[1].name)
    assert _predict("--model", artifact, folder, "--out", tmp_path / "preds.csv") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"warning: 1 image id(s) occur more than once (one stem in several folders, or with several "
            f"extensions): {images[0].stem}") in err
    assert sorted(pd.read_csv(tmp_path / "preds.csv")["image"]) == sorted([images[0].stem] * 2 + [images[1].stem])
