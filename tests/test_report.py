"""Reading and writing ISIC CSVs, metrics.json, report.md and plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skindistil.data.vocab import HAM10000, ISIC2019
from skindistil.errors import CSVError, DataError
from skindistil.evaluation.metrics import AbsentClassWarning
from skindistil.evaluation.report import (
    PER_CLASS_COLUMNS,
    evaluate_arrays,
    read_predictions_csv,
    read_truth_csv,
    render_report_md,
    write_predictions_csv,
)

CLASSES = ISIC2019.to_list()


def _write(path, text):
    path.write_text(text)
    return path


def _strict_json(path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_read_truth_csv_real_isic_ground_truth(uda_root):
    truth = read_truth_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    assert truth.class_names == CLASSES  # the training truth's UNK column is all zero: not a class
    assert len(truth.image_ids) == len(truth.labels) == 336 and truth.image_ids[0] == "ISIC_0000000"
    assert np.bincount(truth.labels, minlength=8).tolist() == [83, 253, 0, 0, 0, 0, 0, 0]
    assert not truth.has_unknown and truth.notes == ()


def test_read_truth_csv_errors_name_line_and_column(tmp_path):
    header = "image,MEL,NV,UNK\n"
    cases = {
        "two positives": (header + "a,1,0,0\nb,1,1,0\n", r"line 3.*2 positive classes"),
        "UNK and a class": (header + "a,1,0,0\nb,0,1,1\n", r"line 3.*2 positive classes.*one of MEL, NV, UNK"),
        "none": (header + "a,1,0,0\nb,0,0,0\n", r"line 3.*0 positive classes"),
        "one image twice": (header + "ISIC_1,1,0,0\nISIC_1_downsampled,1,0,0\n",
                            r"line 3.*'ISIC_1_downsampled' \(first on line 2 as 'ISIC_1', the same ISIC image\)"),
        "not binary": (header + "a,0.5,0.5,0\n", r"line 2, column 'MEL'.*0 or 1"),
        "non-numeric": (header + "a,1,x,0\n", r"line 2, column 'NV'.*not a finite number: 'x'"),
        "duplicate": (
            header + "a,1,0,0\na.jpg,0,1,0\n",
            r"line 3.*duplicate image id 'a' \(first on line 2\)",
        ),
        "no classes": ("image,UNK\na,1\n", r"no class columns"),
        "no image column": ("name,MEL,NV\na,1,0\n", r"missing column 'image'"),
        "no rows": (header, r"no data rows"),
        "bad weight": ("image,MEL,NV,score_weight\na,1,0,0.5\n", r"line 2, column 'score_weight'"),
    }
    for name, (text, pattern) in cases.items():
        path = _write(tmp_path / f"{name}.csv", text)
        with pytest.raises(CSVError, match=pattern):
            read_truth_csv(path)
    with pytest.raises(CSVError, match="file not found"):
        read_truth_csv(tmp_path / "nope.csv")


def test_read_truth_csv_drops_zero_score_weight_rows(tmp_path):
    path = _write(
        tmp_path / "gt.csv", "image,MEL,NV,score_weight,validation_weight\na,1,0,1,1\nb,0,1,0,1\nc,0,1,1,0\n"
    )
    truth = read_truth_csv(path)
    assert (truth.image_ids, truth.labels.tolist(), truth.class_names) == (["a", "c"], [0, 1], ["MEL", "NV"])
    assert truth.notes == ("1 truth row(s) with score_weight 0 are not scored (as in the official scorer)",)


def test_read_predictions_csv_aligns_to_truth_and_ignores_extras(tmp_path):
    path = _write(
        tmp_path / "pred.csv", "image,NV,UNK,MEL\nc.jpg,0.1,0.0,0.9\na,0.7,0.1,0.2\nb,0.5,0.2,0.5\n"
    )
    ids, scores, ignored = read_predictions_csv(path, ["MEL", "NV"], ["a", "b"])
    assert ids == ["a", "b"] and ignored == ["UNK"]
    np.testing.assert_array_equal(scores, [[0.2, 0.7], [0.5, 0.5]])
    ids, scores, _ = read_predictions_csv(path, ["MEL", "NV"])
    assert ids == ["c", "a", "b"] and scores.shape == (3, 2)


def test_read_predictions_csv_errors_name_the_fault(tmp_path):
    cases = {
        "missing column": ("image,MEL\na,0.5\n", r"missing class column\(s\) NV"),
        "missing image": ("image,MEL,NV\na,0.5,0.5\n", r"no prediction for 1 image\(s\) of the truth: b"),
        "duplicate image": (
            "image,MEL,NV\na,0.5,0.5\nb,0.1,0.9\na,0.2,0.8\n",
            r"line 4.*duplicate image id 'a'",
        ),
        "non-numeric": ("image,MEL,NV\na,0.5,0.5\nb,high,0.9\n", r"line 3, column 'MEL'.*'high'"),
        "empty cell": ("image,MEL,NV\na,0.5,\nb,0.1,0.9\n", r"line 2, column 'NV'.*''"),
        "nan": ("image,MEL,NV\na,0.5,nan\nb,0.1,0.9\n", r"line 2, column 'NV'.*not a finite number"),
        "out of range": ("image,MEL,NV\na,0.5,0.5\nb,1.5,0.9\n", r"line 3, column 'MEL'.*outside \[0, 1\]"),
        "duplicate column": (
            "image,MEL,NV,MEL\na,0.5,0.5,0.1\nb,0.1,0.9,0.1\n",
            r"duplicate column\(s\) MEL",
        ),
        "empty image id": ("image,MEL,NV\n,0.5,0.5\nb,0.1,0.9\n", r"line 2, column 'image'.*empty image id"),
        "ragged": ("image,MEL,NV\na,0.5,0.5\nb,0.1,0.9,7\n", r"cannot parse CSV"),
    }
    for name, (text, pattern) in cases.items():
        path = _write(tmp_path / f"{name}.csv", text)
        with pytest.raises(CSVError, match=pattern):
            read_predictions_csv(path, ["MEL", "NV"], ["a", "b"])


def test_write_predictions_csv_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=50).astype(np.float32)
    probs[3] = probs[3, 0]  # an exact tie survives the round trip
    ids = [f"ISIC_{i:07d}" for i in range(50)]
    path = write_predictions_csv(tmp_path / "p.csv", ids, probs, CLASSES)
    assert pd.read_csv(path).columns.tolist() == ["image", *CLASSES]
    back_ids, back, _ = read_predictions_csv(path, CLASSES)
    assert back_ids == ids
    np.testing.assert_array_equal(back, probs.astype(np.float64))


def _informative_probs(labels, k, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), k)) + 2.0 * (labels[:, None] == np.arange(k))
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_evaluate_arrays_writes_every_output(tmp_path, ham_root):
    truth = pd.read_csv(ham_root / "ISIC_2019_Training_GroundTruth.csv")
    truth = truth.groupby(truth[CLASSES].to_numpy().argmax(axis=1)).head(100)  # all 8 classes, 770 rows
    labels = truth[CLASSES].to_numpy().argmax(axis=1)
    probs = _informative_probs(labels, 8)
    probs[0] = 0.125  # one undecided row
    out = tmp_path / "eval"
    result = evaluate_arrays(
        probs, labels, CLASSES, out, image_ids=truth["image"].tolist(), title="HAM subset"
    )

    names = {
        "metrics.json",
        "report.md",
        "predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (out / png).stat().st_size > 0
        with Image.open(out / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100

    saved = _strict_json(out / "metrics.json")
    assert (
        saved["title"] == "HAM subset"
        and saved["classes"] == CLASSES
        and saved["num_samples"] == len(truth) == 770
    )
    assert saved["undecided"] == 1 and saved["absent_classes"] == []
    assert saved["headline"]["balanced_accuracy"] == pytest.approx(result["headline"]["balanced_accuracy"])
    assert 0.5 < saved["headline"]["macro_auc"] <= 1.0
    assert saved["cancer"]["cancer_classes"] == ["MEL", "BCC", "SCC"]
    assert np.asarray(saved["confusion_matrix"]["counts"]).sum() == 769

    report = (out / "report.md").read_text()
    for heading in ("## Headline", "## Per class", "## Per-class recall and AUC with intervals",
                    "## Confusion matrix", "## Cancer vs non-cancer"):
        assert heading in report
    per_class_rows = [line for line in report.splitlines() if line.startswith(("| MEL |", "| SCC |"))]
    assert len(per_class_rows) == 6  # per-class, interval and confusion tables each have a MEL and an SCC row
    assert "| true \\ predicted | " + " | ".join(CLASSES) + " | undecided |" in report

    ids, back, _ = read_predictions_csv(out / "predictions.csv", CLASSES)
    assert ids == truth["image"].tolist()
    np.testing.assert_array_equal(back, probs)


def test_evaluate_arrays_absent_classes_and_no_cancer_class(tmp_path):
    names = HAM10000.to_list()
    labels = np.array([names.index("nv")] * 30 + [names.index("bkl")] * 20)
    probs = _informative_probs(labels, len(names), seed=1)
    with pytest.warns(AbsentClassWarning, match="akiec, bcc, df, mel, vasc"):
        result = evaluate_arrays(probs, labels, names, tmp_path / "e")
    saved = _strict_json(tmp_path / "e" / "metrics.json")
    assert saved["per_class"]["mel"]["auc"] is None and saved["per_class"]["nv"]["auc"] is not None
    assert saved["cancer"]["support"] == {"cancer": 0, "non_cancer": 50}
    assert saved["cancer"]["sensitivity"] is None
    assert result["headline"]["balanced_accuracy"] == pytest.approx(
        np.mean([result["per_class"][c]["sensitivity"] for c in ("nv", "bkl")])
    )
    report = (tmp_path / "e" / "report.md").read_text()
    assert "n/a" in report and "no truth samples for akiec" in report

    evaluate_arrays(np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 1]), ["NV", "BKL"], tmp_path / "b")
    assert "## Cancer vs non-cancer" not in (tmp_path / "b" / "report.md").read_text()
    assert "no cancer view" in (tmp_path / "b" / "report.md").read_text()


def test_evaluate_arrays_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(DataError, match="need scores"):
        evaluate_arrays(np.ones((3, 2)) / 2, np.array([0, 1]), ["a", "b"], tmp_path)
    with pytest.raises(DataError, match="image ids"):
        evaluate_arrays(np.ones((2, 2)) / 2, np.array([0, 1]), ["a", "b"], tmp_path, image_ids=["x"])


def test_render_report_md_formats_nan_as_na():
    metrics = {
        "classes": ["A"],
        "num_samples": 1,
        "headline": {"balanced_accuracy": 1.0, "macro_auc": float("nan")},
        "per_class": {
            "A": dict.fromkeys(
                PER_CLASS_COLUMNS,
                float("nan"),
            )
        },
        "confusion_matrix": {"counts": [[1]], "undecided": [0]},
        "cancer": None,
        "notes": [],
    }
    text = render_report_md(metrics, "T")
    assert "| macro_auc | n/a |" in text and "| balanced_accuracy | 1.0000 |" in text
