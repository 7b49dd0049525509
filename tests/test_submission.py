"""`evaluate --predictions --truth` on files laid out as the ISIC challenges ship them: archive names vs
ISIC 2019's `_downsampled` names, prediction rows absent from the truth, score columns the truth has no
class for, and an ISIC 2019 test-style truth (UNK rows, score_weight) scored against the official scorer."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from conftest import serving_artifact
from skindistil.cli import main
from skindistil.data.vocab import ISIC2019
from skindistil.evaluation.submission import unknown_scores

CLASSES = ISIC2019.to_list()
WITH_UNK = [*CLASSES, "UNK"]


def _evaluate(*argv) -> int:
    return main(["evaluate", *map(str, argv)])


def _official(truth_csv, pred_csv) -> ClassificationScore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClassificationScore.from_file(truth_csv, pred_csv, ClassificationMetric.BALANCED_ACCURACY)


def _assert_official_parity(saved: dict, score: ClassificationScore, names) -> None:
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(score.overall, abs=1e-12)
    for name in names:
        official, ours = score.per_category.loc[name], saved["per_class"][name]
        assert ours["auc"] == pytest.approx(official["auc"], abs=1e-12), name
        assert ours["auc_sens_80"] == pytest.approx(official["auc_sens_80"], abs=1e-12), name
        assert ours["average_precision"] == pytest.approx(official["ap"], abs=1e-12), name


# --------------------------------------------------------------------------- names and rows


def test_archive_names_match_downsampled_truth_and_extra_rows_are_noted(tmp_path, uda_root, ham_root, capsys):
    """80 UDA-1 images (40 that ISIC 2019 calls ISIC_X_downsampled) saved under their ISIC archive names
    (ISIC_X.jpg), plus 3 HAM10000 images, predicted by a model and scored against their ISIC 2019
    truth rows."""
    truth = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    downsampled = truth["image"].str.endswith("_downsampled")
    truth = pd.concat([truth[downsampled].head(40), truth[~downsampled].head(40)]).sort_values("image")
    truth_csv = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    truth.to_csv(truth_csv, index=False)
    archive = tmp_path / "archive"
    archive.mkdir()
    for image in truth["image"]:
        (archive / f"{image.replace('_downsampled', '')}.jpg").symlink_to(uda_root / "images" / f"{image}.jpg")
    strangers = sorted((ham_root / "images").glob("*.jpg"))[:3]
    for path in strangers:
        (archive / path.name).symlink_to(path)
    model = serving_artifact(tmp_path)
    pred_csv = tmp_path / "archive_preds.csv"
    assert main(["predict", "--no-progress", "--model", str(model), str(archive), "--out", str(pred_csv)]) == 0
    predicted = pd.read_csv(pred_csv, float_precision="round_trip")
    assert len(predicted) == 83 and not predicted["image"].str.endswith("_downsampled").any()
    capsys.readouterr()

    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "archive_preds_eval" / "metrics.json").read_text())
    assert saved["num_samples"] == 80
    assert saved["scoring"]["matched_by_downsampled_name"] == 40
    assert saved["scoring"]["prediction_rows_not_in_truth"] == [p.stem for p in strangers]
    for text in (printed, "\n".join(saved["notes"]),
                 (tmp_path / "archive_preds_eval" / "report.md").read_text()):
        text = " ".join(text.split())  # the terminal wraps long notes
        assert "40 prediction row(s) matched to the truth by the ISIC 2019 name with or without _downsampled" in text
        assert ("3 prediction row(s) not in the truth, not scored (the official scorer refuses such a file): "
                f"{', '.join(p.stem for p in strangers)}") in text

    # The same scores under the truth's own names, without the strangers: identical metrics, and the
    # official scorer's balanced accuracy and per-class ranking metrics.
    renamed = predicted.set_index("image").loc[[i.replace("_downsampled", "") for i in truth["image"]]]
    renamed.index = truth["image"].to_numpy()
    renamed_csv = tmp_path / "renamed.csv"
    renamed.rename_axis("image").reset_index().to_csv(renamed_csv, index=False)
    assert _evaluate("--predictions", renamed_csv, "--truth", truth_csv) == 0
    plain = json.loads((tmp_path / "renamed_eval" / "metrics.json").read_text())
    assert plain["headline"] == saved["headline"] and plain["per_class"] == saved["per_class"]
    official = isic.balanced_multiclass_accuracy(truth[CLASSES].reset_index(drop=True),
                                                 renamed[CLASSES].reset_index(drop=True), pd.Series(np.ones(80)))
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(official, abs=1e-12)
    for name in ("MEL", "NV"):
        ours = saved["per_class"][name]["auc"]
        assert ours == pytest.approx(isic.auc(truth[name], renamed[name].to_numpy(), None), abs=1e-12)
    written = pd.read_csv(tmp_path / "archive_preds_eval" / "predictions.csv")
    assert written["image"].tolist() == truth["image"].tolist()  # truth names, truth order


def test_one_image_under_both_names_is_refused(tmp_path, uda_root, capsys):
    truth_csv = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    truth = pd.read_csv(truth_csv)
    pred = truth[["image", *CLASSES]].copy()
    twin = pred.iloc[[17]].assign(image=pred["image"].iloc[17].replace("_downsampled", ""))
    assert pred["image"].iloc[17].endswith("_downsampled")
    pred_csv = tmp_path / "pred.csv"
    pd.concat([pred, twin]).to_csv(pred_csv, index=False)
    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{pred_csv}, line 338, column 'image'.*'ISIC_\d+' \(first on line 19 as "
                     r"'ISIC_\d+_downsampled', the same ISIC image\)", err)


def test_a_score_column_without_truth_class_counts_where_it_wins(tmp_path, uda_root, capsys):
    """8-class predictions against a MEL/NV-only truth: a row whose top score is BCC is wrong, not
    re-decided between MEL and NV; the same holds for a UNK column against the training truth."""
    truth = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    rng = np.random.default_rng(5)
    pred = pd.DataFrame(rng.dirichlet(np.ones(9), size=len(truth)), columns=WITH_UNK)
    pred.insert(0, "image", truth["image"])
    two_class = tmp_path / "mel_nv.csv"
    truth[["image", "MEL", "NV"]].to_csv(two_class, index=False)
    pred_csv = tmp_path / "pred.csv"
    pred.to_csv(pred_csv, index=False)

    assert _evaluate("--predictions", pred_csv, "--truth", two_class, "--out", tmp_path / "a") == 0
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["classes"] == ["MEL", "NV", *CLASSES[2:], "UNK"]
    assert saved["scoring"]["columns_without_truth_class"] == [*CLASSES[2:], "UNK"]
    official = isic.balanced_multiclass_accuracy(  # the official decision over all nine columns
        truth[WITH_UNK].assign(**{c: 0.0 for c in [*CLASSES[2:], "UNK"]}), pred[WITH_UNK], pd.Series(np.ones(len(truth))))
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(official, abs=1e-12)
    mel_nv_only = pred[["MEL", "NV"]].to_numpy().argmax(axis=1)
    naive = np.mean([np.mean(mel_nv_only[truth[c].to_numpy() == 1] == k) for k, c in enumerate(["MEL", "NV"])])
    assert saved["headline"]["balanced_accuracy"] < naive - 0.2  # what silently dropping the columns gave
    assert "prediction column BCC has no truth class but is the top score" in " ".join(capsys.readouterr().out.split())

    # A UNK column that never wins is ignored, as before, and changes nothing.
    pred["UNK"] = 0.0
    pred.to_csv(pred_csv, index=False)
    assert _evaluate("--predictions", pred_csv, "--truth", uda_root / "ISIC_2019_Training_GroundTruth.csv",
                     "--out", tmp_path / "b") == 0
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "UNK" not in saved["classes"] and "ignored prediction column(s): UNK" in saved["notes"]


# --------------------------------------------------------------------------- ISIC 2019 test-style truth


@pytest.fixture(scope="module")
def test_style_truth(ham_root, uda_root, tmp_path_factory):
    """An ISIC 2019 test-style truth (image, MEL..SCC, UNK, score_weight, validation_weight) from real
    ids: 900 HAM10000 rows with their ISIC 2019 labels (every class), and the 336 UDA-1 images, from
    another collection, as UNK. 40 rows have score_weight 0, validation_weight marks a random half; the
    row ISIC_0035068 checks the official scorer's rule that this image is never scored."""
    ham = pd.read_csv(ham_root / "ISIC_2019_Training_GroundTruth.csv")
    ham = pd.concat([ham[ham[c] == 1].head(20) for c in CLASSES] + [ham.sample(n=900 - 160, random_state=0)])
    ham = ham.drop_duplicates("image").head(900)
    uda = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    uda[CLASSES] = 0.0
    uda["UNK"] = 1.0
    special = pd.DataFrame([{"image": "ISIC_0035068", **{c: 0.0 for c in CLASSES}, "MEL": 1.0, "UNK": 0.0}])
    # Sorted by image, as ISIC ships its truth files: isic-challenge-scoring 5.6 sorts the probabilities
    # by image but not the weights, so on an unsorted file with zero weights it scores the wrong rows.
    truth = pd.concat([ham, uda, special], ignore_index=True).sort_values("image", ignore_index=True)
    rng = np.random.default_rng(2)
    truth["score_weight"] = 1.0
    others = np.flatnonzero(truth["image"] != "ISIC_0035068")
    truth.loc[rng.choice(others, size=40, replace=False), "score_weight"] = 0.0
    truth["validation_weight"] = (rng.random(len(truth)) < 0.5).astype(float)
    path = tmp_path_factory.mktemp("test_truth") / "ISIC_2019_Test_GroundTruth.csv"
    truth.to_csv(path, index=False)
    return path, truth


def _eight_class_predictions(truth: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Informative 8-class probabilities (the true class favoured; UNK images uniform-ish), rounded to
    two decimals so that exact ties occur."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(truth), 8)) + 1.5 * truth[CLASSES].to_numpy()
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = pd.DataFrame(np.round(probs, 2), columns=CLASSES)
    pred.insert(0, "image", truth["image"].to_numpy())
    return pred


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_eight_class_model_on_test_truth_reaches_unk_by_the_stated_rule(tmp_path, test_style_truth, threshold,
                                                                         capsys):
    truth_csv, truth = test_style_truth
    pred = _eight_class_predictions(truth, seed=3)
    pred_csv = tmp_path / "pred.csv"
    pred.to_csv(pred_csv, index=False)
    out = tmp_path / "eval"
    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv, "--unk-threshold", threshold, "--out", out) == 0
    printed = " ".join(capsys.readouterr().out.split())
    saved = json.loads((out / "metrics.json").read_text())

    scored = truth[(truth["score_weight"] == 1) & (truth["image"] != "ISIC_0035068")]
    assert saved["classes"] == WITH_UNK and saved["num_samples"] == len(scored) == len(truth) - 40 - 1
    rule = f"an image is UNK when its top class score is below {threshold:g}"
    assert saved["scoring"]["unk"]["threshold"] == threshold and rule in saved["scoring"]["unk"]["rule"]
    assert rule in printed and rule in " ".join((out / "report.md").read_text().split())
    assert "ISIC_0035068 not scored: the official scorer gives it weight 0" in printed

    # The decisions follow the rule: UNK exactly where the top class score is below the threshold; a top
    # score equal to it ties with UNK (ISIC 'undecided', wrong), as do ties between classes above it.
    scores = pred.set_index("image").loc[scored["image"], CLASSES].to_numpy()
    top = scores.max(axis=1)
    class_tie = (scores == top[:, None]).sum(axis=1) > 1
    counts = np.asarray(saved["confusion_matrix"]["counts"])
    assert counts[:, WITH_UNK.index("UNK")].sum() == (top < threshold).sum() > 0
    assert saved["undecided"] == ((top == threshold) | ((top > threshold) & class_tie)).sum()
    assert (top == threshold).sum() > 0

    # Parity: the official scorer on the 9-column predictions written (derived UNK included).
    written = pd.read_csv(out / "predictions.csv", float_precision="round_trip")
    assert written.columns.tolist() == ["image", *WITH_UNK]
    np.testing.assert_array_equal(written["UNK"], unknown_scores(written[CLASSES].to_numpy(), threshold))
    for_official = tmp_path / "for_official.csv"
    pd.concat([written, pred[pred["image"].isin(truth["image"]) & ~pred["image"].isin(written["image"])]
               .assign(UNK=0.0)]).to_csv(for_official, index=False)
    _assert_official_parity(saved, _official(truth_csv, for_official), WITH_UNK)
    # The cancer view is about diagnoses: the UNK images and the UNK score are left out.
    assert saved["cancer"]["unknown_left_out"] == int(scored["UNK"].sum())
    assert sum(saved["cancer"]["support"].values()) == len(scored) - int(scored["UNK"].sum())


def test_predictions_with_their_own_unk_column_match_the_official_scorer(tmp_path, test_style_truth, capsys):
    truth_csv, truth = test_style_truth
    pred = _eight_class_predictions(truth, seed=4)
    rng = np.random.default_rng(4)
    pred["UNK"] = np.round(rng.random(len(pred)) * 0.4 + 0.4 * truth["UNK"].to_numpy(), 2)
    pred_csv = tmp_path / "pred.csv"
    pred.sample(frac=1.0, random_state=5).to_csv(pred_csv, index=False)
    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv, "--out", tmp_path / "eval") == 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["scoring"]["unk"] == {"source": "predictions column"}
    _assert_official_parity(saved, _official(truth_csv, pred_csv), WITH_UNK)
    assert "UNK scored from the UNK column of pred.csv" in capsys.readouterr().out


def test_unk_rule_misuse_is_refused(tmp_path, test_style_truth, uda_root, capsys):
    truth_csv, truth = test_style_truth
    pred = _eight_class_predictions(truth, seed=6)
    pred_csv = tmp_path / "pred.csv"
    pred.to_csv(pred_csv, index=False)

    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{pred_csv}: no UNK column, but {truth_csv} has UNK rows" in err and "--unk-threshold T" in err

    training_truth = uda_root / "ISIC_2019_Training_GroundTruth.csv"
    assert _evaluate("--predictions", pred_csv, "--truth", training_truth, "--unk-threshold", 0.5) == 1
    assert f"{training_truth} has no UNK rows" in " ".join(capsys.readouterr().err.split())

    pred.assign(UNK=0.1).to_csv(pred_csv, index=False)
    assert _evaluate("--predictions", pred_csv, "--truth", truth_csv, "--unk-threshold", 0.5) == 1
    assert f"{pred_csv} has its own UNK column" in " ".join(capsys.readouterr().err.split())
    for bad in (0, 1, 1.5):
        assert _evaluate("--predictions", pred_csv.with_name("x.csv"), "--truth", truth_csv,
                         "--unk-threshold", bad) == 1
    assert not (tmp_path / "pred_eval").exists()


def test_unknown_scores_rule():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.1], [0.3, 0.7], [1.0, 0.0], [0.0, 0.0], [0.35, 0.1]])
    np.testing.assert_allclose(unknown_scores(probs, 0.5), 1 - probs.max(axis=1))
    for threshold in (0.2, 0.3, 0.35, 0.8):
        u = unknown_scores(probs, threshold)
        top = probs.max(axis=1)
        assert ((u >= 0) & (u <= 1)).all()
        np.testing.assert_array_equal(u > top, top < threshold)
        np.testing.assert_array_equal(u == top, top == threshold)  # the tie at the threshold is exact
        assert np.all(np.diff(u[np.argsort(top)]) <= 0)  # falls as the top score rises
