"""`skindistil evaluate --predictions --truth`, end to end on the real ISIC 2019 ground-truth CSVs."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from skindistil.cli import main
from skindistil.data.vocab import ISIC2019

CLASSES = ISIC2019.to_list()


def _random_predictions(truth: pd.DataFrame, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(truth))
    pred = pd.DataFrame(probs, columns=CLASSES)
    pred.insert(0, "image", truth["image"].to_numpy())
    return pred


def test_cli_scores_uda_ground_truth_with_absent_classes(tmp_path, uda_root, capsys):
    truth_csv = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    truth = pd.read_csv(truth_csv)
    pred = _random_predictions(truth, seed=0)
    pred["UNK"] = 0.0
    shuffled = pred.sample(frac=1.0, random_state=1)
    shuffled["image"] = shuffled["image"] + ".jpg"  # the ISIC scorer accepts file names too
    pred_csv = tmp_path / "pred.csv"
    shuffled.to_csv(pred_csv, index=False)

    assert main(["evaluate", "--predictions", str(pred_csv), "--truth", str(truth_csv)]) == 0
    out = tmp_path / "pred_eval"  # the default output directory
    for name in (
        "metrics.json",
        "report.md",
        "predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
    ):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_samples"] == 336 and saved["absent_classes"] == CLASSES[2:]
    assert saved["inputs"] == {"predictions": str(pred_csv), "truth": str(truth_csv)}

    truth_df = truth[CLASSES]
    official = isic.balanced_multiclass_accuracy(truth_df, pred[CLASSES], pd.Series(np.ones(len(truth))))
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(official, abs=1e-6)
    assert saved["per_class"]["BCC"]["auc"] is None and saved["per_class"]["MEL"]["auc"] is not None

    # predictions.csv is in truth order, with the class columns only
    written = pd.read_csv(out / "predictions.csv")
    assert (
        written.columns.tolist() == ["image", *CLASSES]
        and written["image"].tolist() == truth["image"].tolist()
    )

    printed = capsys.readouterr().out
    assert "balanced_accuracy" in printed and "no truth samples for BCC" in printed
    assert "ignored prediction column(s): UNK" in printed


def test_cli_matches_official_classification_score_on_all_classes(tmp_path, ham_root):
    truth = pd.read_csv(ham_root / "ISIC_2019_Training_GroundTruth.csv").sample(n=2000, random_state=0)
    truth_csv = tmp_path / "gt.csv"
    # The official scorer cannot score a category that never occurs (UNK), so its copy has no UNK.
    truth.drop(columns="UNK").to_csv(truth_csv, index=False)
    pred = _random_predictions(truth, seed=2)
    pred[CLASSES] = np.round(pred[CLASSES], 2)  # ties, within and across rows
    pred_csv = tmp_path / "pred.csv"
    pred.to_csv(pred_csv, index=False)

    out = tmp_path / "out"
    assert (
        main(["evaluate", "--predictions", str(pred_csv), "--truth", str(truth_csv), "--out", str(out)]) == 0
    )
    saved = json.loads((out / "metrics.json").read_text())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = ClassificationScore.from_file(truth_csv, pred_csv, ClassificationMetric.BALANCED_ACCURACY)
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(score.overall, abs=1e-6)
    for name in CLASSES:
        official = score.per_category.loc[name]
        ours = saved["per_class"][name]
        assert ours["auc"] == pytest.approx(official["auc"], abs=1e-6)
        assert ours["auc_sens_80"] == pytest.approx(official["auc_sens_80"], abs=1e-6)
        assert ours["average_precision"] == pytest.approx(official["ap"], abs=1e-6)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.drop(columns="SCC"), r"missing class column\(s\) SCC"),
        (lambda p: p.iloc[1:], r"no prediction for 1 image\(s\) of the truth: ISIC_0000000"),
        (
            lambda p: pd.concat([p, p.iloc[[5]]]),
            r"line 338, column 'image'.*duplicate image id 'ISIC_\d+' \(first on line 7\)",
        ),
        (
            lambda p: p.assign(MEL=["x"] + p["MEL"].tolist()[1:]),
            r"line 2, column 'MEL'.*not a finite number: 'x'",
        ),
    ],
    ids=["missing-column", "missing-image", "duplicate-image", "non-numeric"],
)
def test_cli_bad_predictions_exit_1_with_named_error(tmp_path, uda_root, capsys, edit, message):
    truth_csv = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    pred_csv = tmp_path / "pred.csv"
    edit(_random_predictions(pd.read_csv(truth_csv), seed=3)).to_csv(pred_csv, index=False)
    assert main(["evaluate", "--predictions", str(pred_csv), "--truth", str(truth_csv)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("skindistil evaluate: error: ")
    assert str(pred_csv) in err
    assert re.search(message, err)
    assert not (tmp_path / "pred_eval").exists()


def test_cli_usage_errors_exit_1(tmp_path, uda_root, capsys):
    truth_csv = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    assert main(["evaluate", "--predictions", str(truth_csv)]) == 1
    assert "--truth" in capsys.readouterr().err
    assert main(["evaluate"]) == 1
    assert "--predictions" in capsys.readouterr().err
    missing = tmp_path / "nope.csv"
    assert main(["evaluate", "--predictions", str(missing), "--truth", str(truth_csv)]) == 1
    assert f"{missing}: file not found" in capsys.readouterr().err
