"""SIIM-ISIC 2020 and ISIC 2024 scoring: the 2024 partial AUC against the challenge's published definition,
and `evaluate --predictions --truth` on submissions built from the real ISIC 2019 files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from skindistil.cli import main
from skindistil.errors import CSVError, DataError
from skindistil.evaluation.challenges import evaluate_submission
from skindistil.evaluation.metrics import partial_auc_above_tpr


def official_pauc(y_true, y_pred, min_tpr=0.80):
    """The ISIC 2024 metric as the challenge publishes it: labels and scores flipped, sklearn's
    McClish-standardised partial AUC up to max_fpr = 1 - min_tpr, standardisation undone."""
    v_gt = abs(np.asarray(y_true) - 1)
    v_pred = np.array([1.0 - x for x in y_pred])
    max_fpr = abs(1 - min_tpr)
    partial_auc_scaled = roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return 0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (partial_auc_scaled - 0.5)


def test_partial_auc_on_constructed_curves():
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    ranked = np.linspace(1.0, 0.1, 10)
    assert partial_auc_above_tpr(y, ranked) == pytest.approx(0.2)  # perfect: the whole band
    assert partial_auc_above_tpr(y, ranked[::-1]) == pytest.approx(0.0)  # reversed: nothing
    assert partial_auc_above_tpr(y, np.full(10, 0.5)) == pytest.approx(0.02)  # all tied: the diagonal
    # ROC (FPR, TPR): (0, .5) (.5, .5) (.5, 1) (1, 1); over TPR in [.8, 1] the curve is at FPR .5,
    # so the area under it in the band is 0.2 * (1 - 0.5)
    assert partial_auc_above_tpr([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1]) == pytest.approx(0.1)
    assert np.isnan(partial_auc_above_tpr([1, 1], [0.2, 0.3]))


def test_partial_auc_matches_the_official_definition_on_random_inputs_with_ties():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(400):
        n = int(rng.integers(4, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
        if y.min() == y.max():
            continue
        scores = rng.random(n) if trial % 3 == 0 else np.round(rng.random(n), int(rng.integers(1, 3)))  # ties
        min_tpr = [0.8, 0.5, 0.9, 0.95][trial % 4]
        assert partial_auc_above_tpr(y, scores, min_tpr) == pytest.approx(official_pauc(y, scores, min_tpr),
                                                                        abs=1e-12)
        checked += 1
    assert checked > 350


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def uda_tables(uda_root):
    """The real ISIC 2019 ground truth and metadata of the 336 UDA images (83 melanomas)."""
    truth = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    meta = pd.read_csv(uda_root / "ISIC_2019_Training_Metadata.csv")
    table = truth.merge(meta, on="image")
    assert len(table) == 336
    return table


def _submission(table, id_column, seed):
    rng = np.random.default_rng(seed)
    # informative but imperfect scores, rounded to 2 decimals so that many tie
    scores = np.clip(np.round(0.35 * table["MEL"].to_numpy() + 0.65 * rng.random(len(table)), 2), 0, 1)
    return pd.DataFrame({id_column: table["image"], "target": scores}).sample(frac=1.0, random_state=seed)


def _truth_2020(table):
    target = table["MEL"].astype(int)
    return pd.DataFrame({
        "image_name": table["image"], "patient_id": "IP_" + table.index.astype(str), "sex": table["sex"],
        "age_approx": table["age_approx"], "anatom_site_general_challenge": table["anatom_site_general"],
        "diagnosis": np.where(target == 1, "melanoma", "nevus"),
        "benign_malignant": np.where(target == 1, "malignant", "benign"), "target": target,
    })


def _truth_2024(table):
    return pd.DataFrame({
        "isic_id": table["image"], "target": table["MEL"].astype(int), "patient_id": "IP_" + table.index.astype(str),
        "age_approx": table["age_approx"], "sex": table["sex"], "anatom_site_general": table["anatom_site_general"],
        "lesion_id": table["lesion_id"],
    })


def test_cli_scores_a_2020_submission_with_the_melanoma_auc(uda_tables, tmp_path, capsys):
    truth = _truth_2020(uda_tables)
    truth.to_csv(tmp_path / "train.csv", index=False)
    pred = _submission(uda_tables, "image_name", seed=1)
    pred.to_csv(tmp_path / "submission.csv", index=False)

    assert main(["evaluate", "--predictions", str(tmp_path / "submission.csv"),
                 "--truth", str(tmp_path / "train.csv")]) == 0
    saved = json.loads((tmp_path / "submission_eval" / "metrics.json").read_text())
    aligned = truth.merge(pred, on="image_name", suffixes=("_true", "_pred"))
    official = roc_auc_score(aligned["target_true"], aligned["target_pred"])
    assert saved["challenge"] == "isic2020" and list(saved["headline"]) == ["auc"]
    assert saved["headline"]["auc"] == pytest.approx(official, abs=1e-12)
    assert saved["support"] == {"benign": 253, "malignant": 83} and saved["num_samples"] == 336
    printed = capsys.readouterr().out
    assert "auc" in printed and f"{official:.4f}" in printed
    assert "SIIM-ISIC 2020" in (tmp_path / "submission_eval" / "report.md").read_text()


def test_cli_scores_a_2024_submission_with_the_partial_auc(uda_tables, tmp_path):
    truth = _truth_2024(uda_tables)
    truth.to_csv(tmp_path / "train-metadata.csv", index=False)
    pred = _submission(uda_tables, "isic_id", seed=2)
    extra = pd.DataFrame({"isic_id": ["ISIC_9999999"], "target": [0.5]})  # not in the truth: left out
    pd.concat([pred, extra]).to_csv(tmp_path / "submission.csv", index=False)

    out = tmp_path / "scored"
    assert main(["evaluate", "--predictions", str(tmp_path / "submission.csv"),
                 "--truth", str(tmp_path / "train-metadata.csv"), "--out", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    aligned = truth.merge(pred, on="isic_id", suffixes=("_true", "_pred"))
    official = official_pauc(aligned["target_true"].to_numpy(), aligned["target_pred"].to_numpy())
    assert saved["challenge"] == "isic2024"
    assert saved["headline"]["partial_auc_above_80_tpr"] == pytest.approx(official, abs=1e-12)
    assert 0.02 < saved["headline"]["partial_auc_above_80_tpr"] < 0.2
    assert saved["headline"]["auc"] == pytest.approx(roc_auc_score(aligned["target_true"], aligned["target_pred"]))
    assert saved["notes"] == ["1 prediction(s) of images not in train-metadata.csv left out"]


def _write(path, text):
    path.write_text(text)
    return path


def test_mismatched_and_malformed_submissions_are_refused(uda_root, tmp_path):
    real_2019 = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    sub_2020 = _write(tmp_path / "s2020.csv", "image_name,target\nISIC_0000000,0.3\nISIC_0000001,0.9\n")
    truth_2020 = _write(tmp_path / "t2020.csv", "image_name,target,sex\nISIC_0000000,0,male\nISIC_0000001,1,female\n")
    out = tmp_path / "out"
    cases = [
        (sub_2020, real_2019, CSVError, r"SIIM-ISIC 2020 submission \(image_name,target\) but this truth has no "
                                        r"'image_name' column; it looks like isic2019 ground truth"),
        (_write(tmp_path / "s2024.csv", "isic_id,target\nISIC_0000000,0.3\n"), truth_2020, CSVError,
         r"ISIC 2024 \(SLICE-3D\) submission .* no 'isic_id' column; it looks like isic2020"),
        (_write(tmp_path / "both.csv", "image,image_name,target\na,a,0.1\n"), truth_2020, CSVError,
         r"it has 2 \(image, image_name\) of the id columns"),
        (_write(tmp_path / "none.csv", "name,target\na,0.1\n"), truth_2020, CSVError, r"it has none of the id columns"),
        (_write(tmp_path / "range.csv", "image_name,target\nISIC_0000000,0.3\nISIC_0000001,1.2\n"), truth_2020,
         CSVError, r"range.csv, line 3, column 'target': target 1.2 is outside \[0, 1\]"),
        (_write(tmp_path / "text.csv", "image_name,target\nISIC_0000000,high\nISIC_0000001,0.2\n"), truth_2020,
         CSVError, r"text.csv, line 2, column 'target': not a finite number: 'high'"),
        (_write(tmp_path / "cols.csv", "image_name,target,MEL\nISIC_0000000,0.3,0.3\n"), truth_2020, CSVError,
         r"exactly the columns image_name,target; found: image_name, target, MEL"),
        (_write(tmp_path / "dup.csv", "image_name,target\nISIC_0000000,0.3\nISIC_0000000.jpg,0.2\n"), truth_2020,
         CSVError, r"dup.csv, line 3, column 'image_name': duplicate image id 'ISIC_0000000'"),
        (_write(tmp_path / "short.csv", "image_name,target\nISIC_0000000,0.3\n"), truth_2020, CSVError,
         r"no prediction for 1 of the 2 image\(s\) of t2020.csv: ISIC_0000001"),
        (sub_2020, _write(tmp_path / "soft.csv", "image_name,target\nISIC_0000000,0\nISIC_0000001,0.5\n"), CSVError,
         r"soft.csv, line 3, column 'target': target must be 0 or 1"),
        (sub_2020, _write(tmp_path / "notarget.csv", "image_name,benign_malignant\nISIC_0000000,benign\n"), CSVError,
         r"notarget.csv: missing column 'target'"),
        (sub_2020, _write(tmp_path / "onlybenign.csv", "image_name,target\nISIC_0000000,0\nISIC_0000001,0\n"),
         DataError, r"onlybenign.csv: 2 truth rows, 0 with target 1 and 2 with target 0: the AUC needs both"),
    ]
    for predictions, truth, error, match in cases:
        with pytest.raises(error, match=match):
            evaluate_submission(predictions, truth, out)
    assert not out.exists()  # nothing written for a refused submission
