"""Teacher vs student on a split of a prepared dataset: paired comparison and the retention gate.

`compare_eval_dirs` works from two finished evaluations (their predictions.csv, see `evaluate_model`);
`gate_students` scores the models itself (used by `distill --min-class-retention`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skindistil.errors import DataError
from skindistil.evaluation.bootstrap import BootstrapSettings
from skindistil.evaluation.report import format_interval, read_predictions_csv, write_metrics_json
from skindistil.evaluation.retention import check_retention_gate, compare_models
from skindistil.markdown import markdown_table


def split_labels(data_dir: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """The manifest's label of each of `image_ids` (DataError naming the manifest for an unknown id)."""
    from skindistil.data.prepare import MANIFEST_CSV, load_manifest

    manifest, _ = load_manifest(data_dir)
    label = dict(zip(manifest["image_id"], manifest["label"], strict=True))
    missing = [i for i in image_ids if i not in label]
    if missing:
        raise DataError(Path(data_dir) / MANIFEST_CSV, f"no row for image(s) {', '.join(missing[:5])}")
    return np.array([label[i] for i in image_ids], dtype=np.int64)


def compare_eval_dirs(teacher_eval: str | Path, student_eval: str | Path, data_dir: str | Path,
                      bootstrap: BootstrapSettings | None = None) -> dict:
    """`retention.compare_models` of two evaluations of the same split (EVAL/metrics.json and
    EVAL/predictions.csv each), with labels, lesions and patients from DATA_DIR's manifest. DataError
    when the two evaluations do not cover the same images and classes."""
    from skindistil.evaluation.evaluate import split_metadata

    teacher_eval, student_eval = Path(teacher_eval), Path(student_eval)
    classes = json.loads((teacher_eval / "metrics.json").read_text())["classes"]
    student_classes = json.loads((student_eval / "metrics.json").read_text())["classes"]
    if student_classes != classes:
        raise DataError(student_eval / "metrics.json", f"classes {student_classes} differ from the teacher's {classes}")
    ids, teacher_probs, _ = read_predictions_csv(teacher_eval / "predictions.csv", classes)
    student_ids, student_probs, _ = read_predictions_csv(student_eval / "predictions.csv", classes)
    if sorted(student_ids) != sorted(ids):
        raise DataError(student_eval / "predictions.csv", f"scores other images than {teacher_eval / 'predictions.csv'}")
    _, student_probs, _ = read_predictions_csv(student_eval / "predictions.csv", classes, ids)
    meta = split_metadata(data_dir, ids)
    return compare_models(teacher_probs, student_probs, split_labels(data_dir, ids), classes, meta.units,
                          bootstrap or BootstrapSettings(), meta.unit_counts)


def gate_students(teacher: str | Path, students: Sequence[str | Path], data_dir: str | Path, split: str,
                  gate: dict[str, float], out_dir: str | Path, *, bootstrap: BootstrapSettings | None = None,
                  batch_size: int = 64, num_workers: int | None = None, device: str = "cpu",
                  progress: bool = True) -> dict:
    """Score the teacher and each student artifact on `split`, compare them (`compare_models`) and check
    the retention `gate` (class -> minimum ratio). Writes out_dir/retention.json and retention.md.
    Returns {"split", "gate", "students": [{"model", "comparison", "failures"}], "passed": bool}."""
    from skindistil.evaluation.evaluate import split_metadata, split_outputs
    from skindistil.models import load_model

    loaded = load_model(teacher, device=device)
    outputs = split_outputs(loaded, data_dir, split, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
    teacher_probs = loaded.probabilities(_tensor(outputs.logits)).numpy()
    meta = split_metadata(data_dir, outputs.image_ids)
    rows = []
    for student in students:
        model = load_model(student, device=device)
        scored = split_outputs(model, data_dir, split, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)
        probs = model.probabilities(_tensor(scored.logits)).numpy()
        comparison = compare_models(teacher_probs, probs, outputs.labels, loaded.classes, meta.units,
                                    bootstrap or BootstrapSettings(), meta.unit_counts)
        rows.append({"model": str(model.path), "comparison": comparison,
                     "failures": check_retention_gate(comparison, gate)})
    result = {"teacher": str(loaded.path), "data": str(data_dir), "split": split, "gate": gate, "students": rows,
              "passed": not any(r["failures"] for r in rows)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out / "retention.json", result)
    (out / "retention.md").write_text(retention_markdown(result))
    return result


def retention_markdown(result: dict) -> str:
    """A page per gate check: each student's BMA difference, verdict, per-class retention and gate."""
    gate = ", ".join(f"{k} >= {v:g}" for k, v in result["gate"].items()) or "none"
    lines = [f"# Retention on {result['split']}", "", f"Teacher: `{result['teacher']}`. Gate: {gate}.", ""]
    for row in result["students"]:
        comparison = row["comparison"]
        status = "FAILS the gate: " + "; ".join(row["failures"]) if row["failures"] else "passes the gate"
        lines += [f"## `{row['model']}`", "", comparison["verdict"], "", f"Retention gate: {status}.", "",
                  markdown_table(["class", "teacher recall", "student recall", "retention", "interval"],
                                 [[name, _f(cls["teacher_recall"]), _f(cls["student_recall"]), _f(cls["retention"]),
                                   format_interval(cls["interval"])] for name, cls in comparison["per_class"].items()]),
                  ""]
    return "\n".join(lines)


def _tensor(array):
    import torch

    return torch.from_numpy(array)


def _f(value) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"
