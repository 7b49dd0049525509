"""Model families: one model per depth, scored on a split, tabulated and plotted like the paper's figure.

A family is read from a run directory:

- a cascade run (RUN/cascade/depth-XX/model for each member): one model per depth, plus the teacher
  the cascade started from (recorded in the members' provenance) at the full depth when it exists;
- an artifact with per-depth heads (kind "depth_vit": fcvit, fcvit-probs, full): every exit is a
  model of that depth (`MultiExitViT.truncate`), all scored from one pass over the split;
- any other artifact (a SkinDistilViT student, a teacher): a family of one, at its own depth.

The teacher of a family (provenance "teacher") is scored too and drawn as a horizontal line.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skindistil.errors import ConfigError, ModelError
from skindistil.evaluation.bootstrap import BootstrapSettings
from skindistil.evaluation.metrics import (
    AbsentClassWarning,
    accuracy,
    balanced_accuracy,
    decide,
    expected_calibration_error,
    precision_recall_f1,
    reliability_bins,
)
from skindistil.evaluation.plots import plot_bma_by_depth
from skindistil.evaluation.report import write_metrics_json
from skindistil.evaluation.retention import compare_models
from skindistil.files import write_text
from skindistil.markdown import markdown_table
from skindistil.models import LoadedModel, MultiExitViT, load_model
from skindistil.models.artifact import CONFIG_FILE, count_parameters, resolve_model_dir
from skindistil.models.student import vit_depth


@dataclass(frozen=True)
class FamilyMember:
    """One model of a family: an artifact, or (with `exit_depth`) one exit of a depth_vit artifact."""

    model_dir: Path
    role: str  # "member" or "teacher"
    exit_depth: int | None = None


@dataclass(frozen=True)
class Family:
    method: str
    run: Path
    members: list[FamilyMember]
    teacher: Path | None
    teacher_missing: str | None = None  # the teacher its provenance names, when it is not found


def find_family(run: str | Path) -> Family:
    """The family stored in `run` (see the module docstring)."""
    run = Path(run)
    cascade = sorted(p.parent for p in run.glob(f"cascade/depth-*/model/{CONFIG_FILE}"))
    if cascade:
        teacher, missing = _teacher_of(cascade[0])
        members = [FamilyMember(p, "member") for p in cascade]
        if teacher is not None:
            members.append(FamilyMember(teacher, "teacher"))
        return Family("cascade", run, members, teacher, missing)
    model_dir = resolve_model_dir(run)
    loaded = load_model(model_dir)
    provenance = loaded.config.get("provenance", {})
    method = str(provenance.get("method") or provenance.get("role") or loaded.config["kind"])
    teacher, missing = _teacher_of(model_dir)
    if isinstance(loaded.model, MultiExitViT):
        return Family(method, run, [FamilyMember(model_dir, "member", d) for d in loaded.model.exits], teacher,
                      missing)
    return Family(method, run, [FamilyMember(model_dir, "member")], teacher, missing)


def _teacher_of(model_dir: Path) -> tuple[Path | None, str | None]:
    """(the teacher artifact recorded in a student's provenance, None) when it is still there; (None, the
    recorded path) with a warning naming it when it was moved or deleted since, or is a path relative to
    another folder: the family is then scored without its teacher, and its report says so."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    path = config.get("provenance", {}).get("teacher")
    if not path:
        return None, None
    try:
        return resolve_model_dir(path), None
    except ModelError:
        warnings.warn(f"{model_dir}: its teacher {path} (provenance) is not found from {Path.cwd()}; the family "
                      "is scored without the teacher and without the comparison to it", stacklevel=3)
        return None, str(path)


def scores(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """BMA, accuracy, macro F1 (ISIC tie rule) and calibration (ECE over 15 bins, and the reliability
    bins) of class scores [N, C] against labels [N]."""
    preds = decide(probs)
    bins = reliability_bins(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)  # classes absent from a small split
        return {
            "balanced_accuracy": balanced_accuracy(labels, preds, num_classes),
            "accuracy": accuracy(labels, preds),
            "macro_f1": float(precision_recall_f1(labels, preds, num_classes)["macro_f1"]),
            "ece": expected_calibration_error(probs, labels),
            "reliability": {key: value.tolist() for key, value in bins.items()},
        }


def score_family(family: Family, data_dir: str | Path, split: str = "test", *, batch_size: int = 64,
                 num_workers: int | None = None, device: str = "cpu", progress: bool = True,
                 cache: dict | None = None, bootstrap: BootstrapSettings | None = None) -> dict:
    """One row per member (depth, role, BMA, accuracy, macro F1, ECE and reliability, parameters, model)
    and the teacher's scores. With a teacher, each row also has "comparison": `retention.compare_models`
    against it (paired bootstrap, per-class retention, agreement), resampling the manifest's patients
    or lesions. `cache` (model dir -> outputs) lets several families share one pass over a teacher."""
    from skindistil.evaluation.evaluate import split_metadata, split_outputs

    cache = {} if cache is None else cache

    def outputs_of(model_dir: Path, all_exits: bool):
        key = (str(model_dir), all_exits)
        if key not in cache:
            loaded = load_model(model_dir, device=device)
            cache[key] = loaded, split_outputs(loaded, data_dir, split, batch_size=batch_size,
                                               num_workers=num_workers, all_exits=all_exits, progress=progress)
        return cache[key]

    teacher, teacher_probs = None, None
    if family.teacher is not None:
        loaded, outputs = outputs_of(family.teacher, False)
        teacher_probs = loaded.probabilities(torch.from_numpy(outputs.logits)).numpy()
        teacher = {"depth": _depth(loaded), **scores(teacher_probs, outputs.labels, len(loaded.classes)),
                   "params": int(loaded.config["num_parameters"]), "model": str(family.teacher)}
        teacher_ids = outputs.image_ids
    meta = None
    rows = []
    for member in family.members:
        loaded, outputs = outputs_of(member.model_dir, member.exit_depth is not None)
        if member.exit_depth is None:
            depth, logits, params = _depth(loaded), outputs.logits, loaded.config["num_parameters"]
            if depth is None:
                raise ConfigError(f"{member.model_dir}: a family is scored by depth in blocks, and this "
                                  f"{type(loaded.model).__name__} is not a ViT; evaluate it without --family")
        else:
            index = loaded.model.exits.index(member.exit_depth)
            depth, logits = member.exit_depth, outputs.logits[index]
            params = count_parameters(loaded.model.truncate(member.exit_depth))
        probs = loaded.probabilities(torch.from_numpy(logits)).numpy()
        row = {"depth": depth, "role": member.role, **scores(probs, outputs.labels, len(loaded.classes)),
               "params": int(params), "model": str(member.model_dir)}
        if teacher_probs is not None and member.role != "teacher":
            if outputs.image_ids != teacher_ids:
                raise ModelError(f"{member.model_dir}: scored on other images than its teacher {family.teacher}")
            meta = meta or split_metadata(data_dir, outputs.image_ids)
            row["comparison"] = compare_models(teacher_probs, probs, outputs.labels, loaded.classes, meta.units,
                                               bootstrap or BootstrapSettings(), meta.unit_counts)
        rows.append(row)
    rows.sort(key=lambda r: r["depth"])
    result = {"method": family.method, "run": str(family.run), "split": split, "rows": rows, "teacher": teacher}
    if family.teacher_missing is not None:
        result["teacher_missing"] = family.teacher_missing
    return result


def _depth(loaded: LoadedModel) -> int | None:
    """Depth in blocks; None for a model that is not a ViT (a convnet teacher)."""
    return vit_depth(loaded.model)


def family_report(runs: list[str | Path], data_dir: str | Path, split: str = "test",
                  out_dir: str | Path | None = None, **kwargs) -> dict:
    """Score the family of each run and write family.json, family.md and family.png (BMA by depth,
    one line per run, teachers dashed) to `out_dir` (default RUN/eval/SPLIT for a single run)."""
    if not runs:
        raise ConfigError("evaluate --family: give at least one run directory")
    if out_dir is None:
        if len(runs) > 1:
            raise ConfigError("evaluate --family with several runs needs --out DIR for the combined report")
        out_dir = _run_dir(Path(runs[0])) / "eval" / split
    cache: dict = {}
    families = [score_family(find_family(run), data_dir, split, cache=cache, **kwargs) for run in runs]
    _label(families)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teachers = {}
    for fam in families:
        if fam["teacher"] is not None and fam["teacher"]["model"] not in teachers:
            teachers[fam["teacher"]["model"]] = fam["teacher"]
    teacher_lines = {(f"teacher ({Path(m).parent.name})" if len(teachers) > 1 else "teacher"): t["balanced_accuracy"]
                     for m, t in teachers.items()}
    files = {"json": out / "family.json", "md": out / "family.md", "png": out / "family.png"}
    result = {"data": str(data_dir), "split": split, "families": families, "teachers": list(teachers.values())}
    write_metrics_json(files["json"], result)
    write_text(files["md"], family_markdown(families, teacher_lines, split))
    plot_bma_by_depth({f["label"]: {r["depth"]: r["balanced_accuracy"] for r in f["rows"]} for f in families},
                      teacher_lines,
                      files["png"], title=f"BMA by depth ({split})")
    return {**result, "files": {k: str(v) for k, v in files.items()}}


def _run_dir(run: Path) -> Path:
    """The run directory a family's reports go to: the cascade run itself, or the artifact's run."""
    return run if (run / "cascade").is_dir() else resolve_model_dir(run).parent


def _label(families: list[dict]) -> None:
    """Label each family by its method, adding the run's name where two runs share a method."""
    methods = [f["method"] for f in families]
    for fam in families:
        fam["label"] = fam["method"] if methods.count(fam["method"]) == 1 else f"{fam['method']} ({Path(fam['run']).name})"


def family_markdown(families: list[dict], teacher_lines: dict[str, float], split: str) -> str:
    """A depth-by-method BMA table (the paper's layout), then each family's full per-depth table."""
    depths = sorted({r["depth"] for f in families for r in f["rows"]})
    by_method = []
    for fam in families:
        by_depth = {r["depth"]: r["balanced_accuracy"] for r in fam["rows"]}
        by_method.append([fam["label"], *[f"{by_depth[d]:.4f}" if d in by_depth else "" for d in depths]])
    lines = [f"# BMA by depth ({split})", "", markdown_table(["method", *map(str, depths)], by_method)]
    for label, bma in teacher_lines.items():
        lines.append(f"\n{label}: BMA {bma:.4f}")
    for fam in families:
        lines += ["", f"## {fam['label']}", "", f"Run: `{fam['run']}`", ""]
        if fam.get("teacher_missing"):
            lines += [f"Teacher `{fam['teacher_missing']}` (from the provenance) not found: no comparison to it.", ""]
        lines.append(markdown_table(
            ["depth", "model", "BMA", "accuracy", "macro F1", "ECE", "BMA - teacher (CI)", "top-1 agreement", "params"],
            [[str(r["depth"]), r["role"], f"{r['balanced_accuracy']:.4f}", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
              f"{r['ece']:.4f}", _difference(r), _agreement(r), f"{r['params']:,}"] for r in fam["rows"]]))
    return "\n".join(lines) + "\n"


def _difference(row: dict) -> str:
    comparison = row.get("comparison")
    if not comparison:
        return ""
    diff = comparison["balanced_accuracy"]["difference"]
    low, high = diff["interval"] or (float("nan"), float("nan"))
    return f"{diff['value']:+.4f} ({low:+.4f} to {high:+.4f})"


def _agreement(row: dict) -> str:
    comparison = row.get("comparison")
    return f"{comparison['agreement']['top1']:.4f}" if comparison else ""
