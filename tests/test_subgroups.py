"""Subgroup metrics from real HAM10000 metadata, and intervals + subgroups in an evaluation of a real split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from skindistil.data.prepare import load_manifest
from skindistil.errors import DataError
from skindistil.evaluation import metrics as M
from skindistil.evaluation.bootstrap import BootstrapSettings
from skindistil.evaluation.subgroups import (
    MISSING,
    age_band,
    ita_category,
    subgroup_attributes,
    subgroup_metrics,
)


@pytest.mark.parametrize("age, band", [("0", "<30"), ("29.9", "<30"), ("30", "30-44"), ("44", "30-44"),
                                       ("45", "45-59"), ("59", "45-59"), ("60", "60-74"), ("74.5", "60-74"),
                                       ("75", "75+"), ("85", "75+"), ("", MISSING)])
def test_age_bands(age, band):
    assert age_band(age) == band


@pytest.mark.parametrize("ita, category", [("60", "very light"), ("55", "light"), ("41", "intermediate"),
                                           ("28", "tan"), ("10", "brown"), ("-30", "dark"), ("-45", "dark"),
                                           ("", MISSING)])
def test_ita_categories(ita, category):
    assert ita_category(ita) == category


def test_bad_metadata_names_the_image_and_column():
    frame = pd.DataFrame({"image_id": ["ISIC_1", "ISIC_2"], "age": ["40", "forty"], "sex": ["male", ""]})
    with pytest.raises(DataError, match=r"manifest.csv, image ISIC_2, column 'age': 'forty' is not a number"):
        subgroup_attributes(frame, "manifest.csv")
    frame = pd.DataFrame({"image_id": ["ISIC_1"], "ita": ["120"]})
    with pytest.raises(DataError, match="ITA '120' is outside"):
        subgroup_attributes(frame)


def test_attributes_and_counts_follow_the_real_metadata(ham_small, ham_root):
    manifest, _ = load_manifest(ham_small)
    attributes = subgroup_attributes(manifest)
    assert set(attributes) == {"sex", "age band", "site"}  # HAM10000 has no skin type column
    source = pd.read_csv(ham_root / "HAM10000_metadata.csv").set_index("image_id").loc[manifest["image_id"]]
    assert pd.Series(attributes["sex"]).value_counts().to_dict() == \
        source["sex"].replace("unknown", MISSING).fillna(MISSING).value_counts().to_dict()
    assert pd.Series(attributes["site"]).value_counts().to_dict() == \
        source["localization"].replace("unknown", MISSING).value_counts().to_dict()
    ages = source["age"].to_numpy()
    bands = np.select([np.isnan(ages), ages < 30, ages < 45, ages < 60, ages < 75],
                      [MISSING, "<30", "30-44", "45-59", "60-74"], "75+")
    assert attributes["age band"] == list(bands)
    # a skin type column, when a dataset provides one, becomes an attribute of its own
    typed = manifest.assign(fitzpatrick=["II" if i % 2 else "IV" for i in range(len(manifest))])
    assert subgroup_attributes(typed)["skin type"][:2] == ["IV", "II"]


def test_subgroup_metrics_counts_small_groups_and_the_gap():
    rng = np.random.default_rng(0)
    n = 230
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n) + 0.6 * np.eye(3)[labels] * (np.arange(n) < 120)[:, None]
    probs[190:] = np.eye(3)[labels[190:]]  # the images without a value: perfect, yet never part of the gap
    groups = ["a"] * 120 + ["b"] * 50 + ["c"] * 20 + [""] * 40
    result = subgroup_metrics(probs, labels, ["x", "y", "z"], {"g": groups}, settings=BootstrapSettings(100),
                              min_size=30)
    rows = {r["group"]: r for r in result["attributes"]["g"]["groups"]}
    assert [r["group"] for r in result["attributes"]["g"]["groups"]] == ["a", "b", "c", MISSING]
    assert {g: r["count"] for g, r in rows.items()} == {"a": 120, "b": 50, "c": 20, MISSING: 40}
    assert rows[MISSING]["scored"] and rows[MISSING]["balanced_accuracy"] == 1.0
    assert not rows["c"]["scored"] and rows["c"]["balanced_accuracy"] is None and rows["c"]["balanced_accuracy_interval"] is None
    preds = M.decide(probs)
    assert rows["b"]["balanced_accuracy"] == pytest.approx(M.balanced_accuracy(labels[120:170], preds[120:170], 3))
    gap = result["attributes"]["g"]["gap"]
    assert (gap["best"], gap["worst"]) == ("a", "b")
    assert gap["value"] == pytest.approx(rows["a"]["balanced_accuracy"] - rows["b"]["balanced_accuracy"])
    assert gap["interval"][0] > 0  # group a is far better by construction
    low, high = rows["a"]["balanced_accuracy_interval"]
    assert low <= rows["a"]["balanced_accuracy"] <= high


def test_evaluation_of_a_real_split_has_intervals_by_lesion_and_subgroups(ham_small, tmp_path):
    import torch

    from skindistil.config import PreprocessConfig
    from skindistil.evaluation.evaluate import evaluate_model
    from skindistil.models import create_teacher, save_artifact

    _, info = load_manifest(ham_small)
    torch.manual_seed(0)
    model = create_teacher("vit_base_patch16_224", num_classes=len(info["classes"]), embed_dim=32, depth=1,
                           num_heads=2, patch_size=16, img_size=32)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    artifact = save_artifact(model, tmp_path / "m" / "model", classes=info["classes"],
                             preprocess=PreprocessConfig(image_size=32))
    metrics = evaluate_model(artifact, ham_small, "test", tmp_path / "eval", num_workers=0, progress=False,
                             bootstrap=BootstrapSettings(resamples=200), subgroup_min_size=10)
    manifest, _ = load_manifest(ham_small)
    test = manifest[manifest["split"] == "test"]
    intervals = metrics["intervals"]
    assert intervals["units"] == test["group"].nunique()  # resampled by lesion (HAM10000 lesion_id)
    assert intervals["unit"] == f"{test['group'].nunique()} lesions"
    low, high = intervals["headline"]["balanced_accuracy"]
    assert low <= metrics["headline"]["balanced_accuracy"] <= high and low < high
    sex = {r["group"]: r["count"] for r in metrics["subgroups"]["attributes"]["sex"]["groups"]}
    assert sex == test["sex"].replace("", MISSING).value_counts().to_dict()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["intervals"]["headline"]["balanced_accuracy"] == pytest.approx([low, high])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| balanced_accuracy |" in report and f"[{low:.4f}, {high:.4f}]" in report
    assert "## Subgroups" in report and "largest BMA gap" in report
    assert (tmp_path / "eval" / "subgroups.png").stat().st_size > 5000


def test_skin_type_columns_of_a_csv_reach_the_manifest_and_the_subgroups(ham_root, tmp_path):
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source

    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    meta = meta[[(ham_root / "images" / f"{i}.jpg").is_file() for i in meta["image_id"]]].head(24)
    types = ["I", "II", "III", "IV", "V", "VI"]
    table = pd.DataFrame({
        "path": [str(ham_root / "images" / f"{i}.jpg") for i in meta["image_id"]], "image_id": meta["image_id"],
        "label": meta["dx"],
        "lesion_id": meta["lesion_id"], "sex": meta["sex"],
        "fitzpatrick": [types[i % 6] for i in range(len(meta))],
        "ita": [str(60 - 5 * i) if i % 5 else "" for i in range(len(meta))]})
    table.to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "prepared"
    prepare_dataset(build_source("csv", tmp_path / "list.csv"), out, short_side=32, workers=0, progress=False)
    manifest, _ = load_manifest(out)
    attributes = subgroup_attributes(manifest.set_index("image_id").loc[meta["image_id"]].reset_index())
    assert attributes["skin type"] == [types[i % 6] for i in range(len(meta))]
    assert attributes["ITA"] == [ita_category(v) for v in table["ita"].fillna("")]
    assert pd.Series(attributes["ITA"]).value_counts()[MISSING] == 5
    assert (manifest.set_index("image_id").loc[meta["image_id"], "lesion_id"] == meta["lesion_id"].to_numpy()).all()
