"""Operating points: threshold rules on a constructed ROC, the seeded group bootstrap against a hand loop,
storage in the artifact (validated on load), and evaluate / predict / serve over real HAM10000 images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from fastapi.testclient import TestClient

from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.data.vocab import BINARY, HAM10000, ISIC2019
from skindistil.errors import ConfigError, ModelError
from skindistil.evaluation.bootstrap import BootstrapSettings, resampling_units, unit_index
from skindistil.evaluation.evaluate import split_outputs
from skindistil.evaluation.operating_points import (
    bootstrap_rates,
    choose_threshold,
    decide,
    fit_operating_points,
    view_classes,
)
from skindistil.models import load_model, save_artifact
from skindistil.models.artifact import set_calibration, set_operating_points
from skindistil.serve import create_app

# A constructed ROC: 10 positives and 10 negatives, no ties.
POS = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1]
NEG = [0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.2, 0.15, 0.05, 0.02]


@pytest.mark.parametrize(
    ("target", "level", "threshold", "sensitivity", "specificity"),
    [
        # the largest threshold with >= 8, 9, 10 of the 10 positives at or above it
        ("sensitivity", 0.80, 0.4, 0.8, 0.6),
        ("sensitivity", 0.90, 0.3, 0.9, 0.5),
        ("sensitivity", 0.95, 0.1, 1.0, 0.2),
        # the smallest threshold with >= 8, 9, 10 of the 10 negatives below it
        ("specificity", 0.80, 0.6, 0.6, 0.8),
        ("specificity", 0.90, 0.7, 0.5, 0.9),
        ("specificity", 0.95, 0.8, 0.4, 1.0),
    ],
)
def test_choose_threshold_on_a_constructed_roc(target, level, threshold, sensitivity, specificity):
    y = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    scores = np.r_[POS, NEG]
    rng = np.random.default_rng(0)
    order = rng.permutation(20)  # the input order does not matter
    chosen = choose_threshold(y[order], scores[order], target, level)
    assert chosen == {"threshold": threshold, "sensitivity": sensitivity, "specificity": specificity,
                      "positives": 10, "negatives": 10}


def test_choose_threshold_with_ties_and_unreachable_specificity():
    y = np.array([1, 1, 0, 0], bool)
    scores = np.array([0.5, 0.5, 0.5, 0.1])
    # the tied negative is decided positive with the tied positives
    assert choose_threshold(y, scores, "sensitivity", 0.95) == {
        "threshold": 0.5, "sensitivity": 1.0, "specificity": 0.5, "positives": 2, "negatives": 2}
    # both negatives below the threshold: only above the top score, where nothing is positive
    with pytest.raises(ValueError, match="no finite threshold reaches specificity 95%"):
        choose_threshold(y, scores, "specificity", 0.95)
    with pytest.raises(ValueError, match="0 positive"):
        choose_threshold(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), "sensitivity", 0.9)


def test_views_follow_the_model_classes():
    assert view_classes(ISIC2019.names) == {"cancer": ["MEL", "BCC", "SCC"], "melanoma": ["MEL"]}
    assert view_classes(HAM10000.names) == {"cancer": ["bcc", "mel"], "melanoma": ["mel"]}
    assert view_classes(BINARY.names) == {"cancer": ["malignant"]}
    assert view_classes(["NV", "BKL"]) == {}


def test_fit_operating_points_names_views_and_scores():
    rng = np.random.default_rng(1)
    names = ISIC2019.to_list()
    labels = rng.integers(0, 8, 400)
    probs = rng.dirichlet(np.ones(8), 400)
    points, notes = fit_operating_points(probs, labels, names)
    assert notes == []
    assert sorted(points) == sorted(f"{v}@{t}{p}" for v in ("cancer", "melanoma") for t in ("sens", "spec")
                                    for p in (80, 90, 95))
    point = points["cancer@sens90"]
    assert point["positive_classes"] == ["MEL", "BCC", "SCC"]
    # the score is the summed cancer probability; the threshold reaches 90% sensitivity on these data
    cancer = np.isin(labels, [0, 2, 7])
    scores = probs[:, [0, 2, 7]].sum(axis=1) / probs.sum(axis=1)
    positive = scores >= point["threshold"]
    assert positive[cancer].mean() >= 0.9 and positive[cancer].mean() == point["validation"]["sensitivity"]
    # ... and is the largest such threshold: the next higher cancer score misses it
    higher = scores[cancer][scores[cancer] > point["threshold"]].min()
    assert (scores[cancer] >= higher).mean() < 0.9
    np.testing.assert_array_equal(decide(probs, names, point)[1], positive)


def test_bootstrap_matches_a_hand_loop_over_groups():
    rng = np.random.default_rng(3)
    truth = rng.random(40) < 0.4
    positive = rng.random(40) < 0.5
    ids = [f"img{i}" for i in range(40)]
    lesions = [f"lesion{i // 3}" if i < 30 else None for i in range(40)]  # 10 lesions of 3 + 10 single images
    units, counts = resampling_units(ids, lesions)
    groups = unit_index(units, 40)
    assert counts == {"patient": 0, "lesion": 10, "image": 10}
    assert groups.max() + 1 == 20 and len(set(groups[:3])) == 1 and len(set(groups[30:])) == 10

    result = bootstrap_rates(truth, positive, units, BootstrapSettings(resamples=200, seed=7))

    draws = np.random.default_rng(7).integers(0, 20, size=(200, 20))
    sens, spec = [], []
    for replicate in draws:
        members = np.concatenate([np.flatnonzero(groups == g) for g in replicate])
        t, p = truth[members], positive[members]
        if t.any():
            sens.append((t & p).sum() / t.sum())
        if (~t).any():
            spec.append((~t & ~p).sum() / (~t).sum())
    np.testing.assert_allclose(result["sensitivity"], np.percentile(sens, [2.5, 97.5]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["specificity"], np.percentile(spec, [2.5, 97.5]), rtol=0, atol=1e-12)
    # the same seed gives the same interval, another seed another one
    assert bootstrap_rates(truth, positive, units, BootstrapSettings(resamples=200, seed=7)) == result
    assert bootstrap_rates(truth, positive, units, BootstrapSettings(resamples=200, seed=8)) != result


# ----------------------------------------------------------------------------------- artifact


def _tiny_artifact(out_dir, classes):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=2, num_classes=len(classes))
    torch.nn.init.normal_(model.head.weight, std=1.0)  # clearly non-uniform probabilities
    return save_artifact(model, out_dir / "model", classes=list(classes), preprocess=PreprocessConfig(image_size=32))


def _points(classes):
    rng = np.random.default_rng(0)
    points, _ = fit_operating_points(rng.dirichlet(np.ones(len(classes)), 300), rng.integers(0, len(classes), 300),
                                     classes)
    return points


def test_stored_points_are_validated_on_load(tmp_path):
    classes = ISIC2019.to_list()
    model_dir = _tiny_artifact(tmp_path, classes)
    set_operating_points(model_dir, _points(classes), fitted_on="data:val", default="melanoma@spec90")
    stored = load_model(model_dir).operating_points
    assert stored.default == "melanoma@spec90" and len(stored.points) == 12 and stored.temperature == 1.0
    good = json.loads((model_dir / "config.json").read_text())

    def broken(edit, match):
        config = json.loads(json.dumps(good))
        edit(config["operating_points"])
        (model_dir / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelError, match=match):
            load_model(model_dir)

    def set_threshold(ops):
        ops["points"]["cancer@sens95"]["threshold"] = 1.5

    def rename(ops):
        ops["points"]["cancer@sens80"] = ops["points"].pop("cancer@sens95")

    def unknown_class(ops):
        ops["points"]["cancer@sens95"]["positive_classes"] = ["MEL", "XYZ"]

    def drop_default(ops):
        ops["default"] = "cancer@sens99"

    def typo(ops):
        ops["points"]["cancer@sens95"]["treshold"] = 0.5

    def other_temperature(ops):
        ops["temperature"] = 1.7

    broken(set_threshold, r"config.json: field 'operating_points.points.cancer@sens95.threshold'")
    broken(rename, r"point 'cancer@sens80' describes 'cancer@sens95'")
    broken(unknown_class, r"positive_classes': XYZ not among the model's classes")
    broken(drop_default, r"default 'cancer@sens99' is not one of the points")
    broken(typo, r"operating_points.points.cancer@sens95.treshold")
    broken(other_temperature, r"chosen at softmax temperature 1.7 but the model now uses 1")

    # a new temperature removes the points chosen at the old one
    (model_dir / "config.json").write_text(json.dumps(good))
    assert set_calibration(model_dir, 1.3, fitted_on="data:val") is True
    assert load_model(model_dir).operating_points is None


# ------------------------------------------------------------------------- real images, CLI


@pytest.fixture(scope="module")
def evaluated(ham_small, tmp_path_factory):
    """A tiny random ViT with the HAM10000 classes, evaluated on the real 400-image dataset with
    `evaluate --operating-point`."""
    run = tmp_path_factory.mktemp("op") / "run"
    model_dir = _tiny_artifact(run, HAM10000.names)
    out = run / "eval"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(ham_small), "--operating-point",
                 "--workers", "0", "--out", str(out)]) == 0
    return model_dir, out


def _split_probs(model_dir, data_dir, split):
    loaded = load_model(model_dir)
    outputs = split_outputs(loaded, data_dir, split, num_workers=0, progress=False)
    return loaded.probabilities(torch.from_numpy(outputs.logits)).numpy(), outputs


def test_evaluate_chooses_on_val_and_applies_unchanged_on_test(evaluated, ham_small):
    model_dir, out = evaluated
    config = json.loads((model_dir / "config.json").read_text())
    ops = config["operating_points"]
    assert ops["default"] == "cancer@sens95" and ops["fitted_on"] == f"{ham_small}:val"
    names = HAM10000.to_list()

    # validation: each threshold is the one a brute-force search over the validation scores gives
    val_probs, val = _split_probs(model_dir, ham_small, "val")
    for name, point in ops["points"].items():
        truth = np.isin(val.labels, [names.index(c) for c in point["positive_classes"]])
        scores = val_probs[:, [names.index(c) for c in point["positive_classes"]]].sum(1) / val_probs.sum(1)
        candidates = np.unique(scores)
        sens = np.array([(scores[truth] >= t).mean() for t in candidates])
        spec = np.array([(scores[~truth] < t).mean() for t in candidates])
        if point["target"] == "sensitivity":
            expected = candidates[sens >= point["level"]].max()
        else:
            expected = candidates[spec >= point["level"]].min()
        assert point["threshold"] == pytest.approx(expected, abs=1e-7), name

    # test: the achieved rates at the stored thresholds, with intervals around them
    test_probs, test = _split_probs(model_dir, ham_small, "test")
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["operating_points"]
    manifest = pd.read_csv(ham_small / "manifest.csv")
    lesions = manifest.loc[manifest["split"] == "test", "group"].nunique()
    assert result["units"] == f"{lesions} lesions" and set(result["points"]) == set(ops["points"])
    for name, point in result["points"].items():
        assert point["threshold"] == ops["points"][name]["threshold"]
        truth = np.isin(test.labels, [names.index(c) for c in point["positive_classes"]])
        scores = test_probs[:, [names.index(c) for c in point["positive_classes"]]].sum(1) / test_probs.sum(1)
        decided = scores >= point["threshold"]
        assert point["positives"] == truth.sum() and point["negatives"] == (~truth).sum()
        assert point["sensitivity"] == pytest.approx(decided[truth].mean(), abs=1e-9)
        assert point["specificity"] == pytest.approx((~decided[~truth]).mean(), abs=1e-9)
        low, high = point["specificity_ci"]
        assert low <= point["specificity"] <= high and high - low > 0
    # the same draws as the report's other intervals
    assert point["bootstrap"] == {"replicates": 1000, "seed": metrics["intervals"]["seed"], "units": lesions}
    report = (out / "report.md").read_text()
    assert "## Operating points" in report and "cancer@sens95 (default)" in report and "bcc + mel" in report


def test_evaluate_operating_point_refuses_what_it_cannot_choose(ham_small, tmp_path):
    from skindistil.errors import DataError
    from skindistil.evaluation.evaluate import evaluate_model, store_operating_points

    model_dir = _tiny_artifact(tmp_path / "ham", HAM10000.names)
    with pytest.raises(ConfigError, match="--operating-point mel@sens95: not a point of this model"):
        evaluate_model(model_dir, ham_small, operating_point="mel@sens95", num_workers=0, progress=False)
    assert "operating_points" not in json.loads((model_dir / "config.json").read_text())  # nothing stored

    rng = np.random.default_rng(0)
    benign = load_model(_tiny_artifact(tmp_path / "benign", ["NV", "BKL"]))
    with pytest.raises(DataError, match="no operating point can be chosen.*no cancer"):
        store_operating_points(benign, rng.dirichlet([1, 1], 50), rng.integers(0, 2, 50), "auto", "d:val")
    # a validation split without any cancer image: nothing can be chosen, and the reason is given
    isic = load_model(_tiny_artifact(tmp_path / "isic", ISIC2019.names))
    with pytest.raises(DataError, match="cancer@sens80 left out: needs positive and negative samples, got 0"):
        store_operating_points(isic, rng.dirichlet(np.ones(8), 50), np.full(50, 1), "auto", "d:val")


def test_predict_reports_decisions_at_the_stored_point(evaluated, ham_root, tmp_path, capsys):
    model_dir, _ = evaluated
    images = sorted((ham_root / "images").glob("*.jpg"))[:12]
    ops = json.loads((model_dir / "config.json").read_text())["operating_points"]["points"]
    probs = load_model(model_dir).predict(images)
    names = HAM10000.to_list()

    out = tmp_path / "pred.json"
    assert main(["predict", "--no-progress", "--model", str(model_dir), *map(str, images), "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert list(document["operating_points"]) == ["cancer@sens95"]
    threshold = ops["cancer@sens95"]["threshold"]
    cancer = probs[:, [names.index("bcc"), names.index("mel")]].sum(1) / probs.sum(1)
    for i, prediction in enumerate(document["predictions"]):
        decision = prediction["decisions"]["cancer@sens95"]
        assert decision["score"] == pytest.approx(cancer[i], abs=1e-6) and decision["threshold"] == threshold
        assert decision["positive"] == (decision["score"] >= threshold)
    assert {p["decisions"]["cancer@sens95"]["positive"] for p in document["predictions"]} == {True, False}

    csv_out = tmp_path / "pred.csv"
    assert main(["predict", "--no-progress", "--model", str(model_dir), *map(str, images), "--out", str(csv_out),
                 "--operating-point", "melanoma@spec90"]) == 0
    assert list(pd.read_csv(csv_out).columns) == ["image", *names]  # the ISIC file is unchanged
    decisions = pd.read_csv(tmp_path / "pred.decisions.csv")
    assert list(decisions.columns) == ["image", "melanoma@spec90_score", "melanoma@spec90"]
    melanoma = probs[:, names.index("mel")] / probs.sum(1)
    np.testing.assert_allclose(decisions["melanoma@spec90_score"], melanoma, atol=1e-6)
    np.testing.assert_array_equal(decisions["melanoma@spec90"],
                                  (decisions["melanoma@spec90_score"] >= ops["melanoma@spec90"]["threshold"]).astype(int))

    capsys.readouterr()
    assert main(["predict", "--no-progress", "--model", str(model_dir), str(images[0]), "--operating-point",
                 "x@sens1"]) == 1
    assert "--operating-point x@sens1: not stored in" in capsys.readouterr().err
    assert main(["predict", "--no-progress", "--model", str(model_dir), str(images[0]), "--tta",
                 "--operating-point", "cancer@sens95"]) == 1
    assert "the thresholds were chosen without TTA; drop --tta" in capsys.readouterr().err
    tta_out = tmp_path / "tta.json"
    assert main(["predict", "--no-progress", "--model", str(model_dir), str(images[0]), "--tta",
                 "--out", str(tta_out)]) == 0
    assert "decisions" not in json.loads(tta_out.read_text())["predictions"][0]
    assert "no operating-point decision" in capsys.readouterr().err


def test_serve_reports_the_decision_beside_the_probabilities(evaluated, ham_root, tmp_path):
    model_dir, _ = evaluated
    image = sorted((ham_root / "images").glob("*.jpg"))[0]
    ops = json.loads((model_dir / "config.json").read_text())["operating_points"]["points"]
    with TestClient(create_app(model_dir, operating_point="all")) as client:
        body = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}).json()
        info = client.get("/v1/model").json()
    decisions = {d["name"]: d for d in body["operating_points"]}
    assert set(decisions) == set(ops) and info["serving"]["operating_points"] == list(ops)
    probs = body["probabilities"]
    for name, decision in decisions.items():
        score = sum(probs[c] for c in ops[name]["positive_classes"]) / sum(probs.values())
        assert decision["score"] == pytest.approx(score, abs=1e-6)
        assert decision["threshold"] == ops[name]["threshold"]
        assert decision["positive"] == (decision["score"] >= decision["threshold"])
    assert info["operating_points"]["default"] == "cancer@sens95"

    with pytest.raises(ConfigError, match="--operating-point melanoma@sens99: not stored"):
        create_app(model_dir, operating_point="melanoma@sens99")
    plain = _tiny_artifact(tmp_path, HAM10000.names)
    with TestClient(create_app(plain)) as client:
        body = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}).json()
    assert body["operating_points"] == []


def test_cli_refuses_operating_point_without_a_model_split(tmp_path, capsys):
    for extra in (["--predictions", str(tmp_path / "p.csv"), "--truth", str(tmp_path / "t.csv")],
                  ["--model", str(tmp_path), "--data", str(tmp_path), "--sweep-exits"]):
        assert main(["evaluate", *extra, "--operating-point"]) == 1
        assert "--operating-point goes with --model DIR --data DATA_DIR" in capsys.readouterr().err
