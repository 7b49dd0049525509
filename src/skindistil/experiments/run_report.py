"""The run report (RUN/report.md + report.html): data, teacher vs students, curves, maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skindistil.config import RunConfig
from skindistil.evaluation.document import Document
from skindistil.evaluation.plots import plot_training_curves
from skindistil.evaluation.report import (
    SUBGROUP_HEADER,
    format_interval,
    headline_rows,
    incomplete_warning,
    interval,
    interval_note,
    subgroup_gaps,
    subgroup_rows,
)
from skindistil.files import write_bytes
from skindistil.metric_keys import BALANCED_ACCURACY, read_results
from skindistil.models.artifact import architecture_of, weight_files

DISCLAIMER = ("Research software: these models are not medical devices and their outputs are not diagnoses. "
              "Figures below are measured in this run on the data it names.")


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def build_report(cfg: RunConfig, run_dir: Path, data_dir: Path, models, bench: dict, timings: dict,
                 assets: Path, comparisons: dict | None = None, gate_failures: dict | None = None) -> Document:
    from skindistil.data.prepare import load_manifest

    doc = Document(f"skindistil run: {cfg.name}", preface=[DISCLAIMER])
    manifest, info = load_manifest(data_dir)
    split = cfg.split

    # --- data
    section = doc.section("Data")
    section.text(f"Source: {info.get('source')} ({info.get('root')}); {len(manifest)} images, classes "
                 f"{', '.join(info['classes'])}; cached at a shorter side of {info.get('short_side')} px; "
                 "splits stratified by class and grouped by lesion where lesion ids exist.")
    counts = manifest.groupby(["split", "class_name"]).size().unstack(fill_value=0).reindex(columns=info["classes"],
                                                                                            fill_value=0)
    rows = [[name, *[int(counts.loc[name, c]) if name in counts.index else 0 for c in info["classes"]],
             int(counts.loc[name].sum()) if name in counts.index else 0] for name in ("train", "val", "test")]
    section.table(["split", *info["classes"], "total"], rows)

    # --- teacher vs students
    teacher = models[0]
    teacher_bma = teacher.metrics["headline"]["balanced_accuracy"]
    speed = _speed_table(bench)
    section = doc.section(f"Teacher vs students ({split} split)")
    warning = incomplete_warning(teacher.metrics)
    if warning:
        section.text(warning)
    bma = dict(headline_rows(teacher.metrics))
    bma_label = next(k for k in bma if k.startswith("balanced_accuracy")).replace("balanced_accuracy", "BMA")
    header = ["model", "depth", "params", "size (MB)", bma_label, "accuracy", "macro F1", "retention %"]
    speed_cols = sorted({(d, b) for (_, d, b) in speed})
    header += [f"{d} ms/img @ {b}" for d, b in speed_cols]
    rows = []
    for entry in models:
        config = _config(entry.model_dir)
        headline = entry.metrics["headline"]
        size_mb = sum(path.stat().st_size for path in weight_files(entry.model_dir)) / 1e6
        retention = 100 * headline["balanced_accuracy"] / teacher_bma if teacher_bma else float("nan")
        depth = architecture_of(config)["kwargs"].get("depth", "-") if config.get("kind") != "timm" else "-"
        row = [entry.label, depth, f"{config['num_parameters']:,}",
               f"{size_mb:.2f}", _fmt(headline["balanced_accuracy"]), _fmt(headline["accuracy"]),
               _fmt(headline["macro_f1"]), f"{retention:.1f}"]
        row += [_fmt(_speed_of(speed, entry.model_dir, run_dir, d, b), 3) for d, b in speed_cols]
        rows.append(row)
    section.table(header, rows)
    _noise_sentences(section, models, comparisons or {}, manifest, split)
    for ratio in bench.get("ratios", []):
        if ratio["backend"] == "eager":
            section.text(f"Student vs teacher ({ratio['device']}, eager, batch {ratio['batch_size']}): "
                         f"{ratio['smaller']:.1%} smaller, {ratio['faster']:.1%} faster "
                         f"(speed-up {ratio['speedup']:.2f}x, t_teacher / t_student - 1).")
    machine = bench.get("machine", {})
    section.text(f"Speed measured on {machine.get('device_name', machine.get('device', '?'))} with "
                 f"{machine.get('threads', '?')} threads, median of repeated timed calls after warm-up "
                 "(RUN/benchmark/bench.md has the full table).")
    _operating_point_sections(doc, split, models)

    _uncertainty_sections(doc, cfg, models, comparisons or {}, gate_failures or {})
    _subgroup_section(doc, cfg, run_dir, models, assets)

    # --- curves
    histories = {e.label: h for e in models if e.role in ("teacher", "student") and (h := epoch_history(e.run_dir))}
    if histories:
        plot_training_curves(histories, assets / "training_curves.png")
        doc.section("Training curves").figure("report_assets/training_curves.png",
                                              "Training loss and validation BMA by epoch")
    _family_sections(doc, cfg, run_dir, data_dir, models, assets)
    _calibration_section(doc, cfg, run_dir, models, assets)

    # --- confusion matrices
    section = doc.section(f"Confusion matrices ({split})")
    for entry in models:
        if entry.role not in ("teacher", "student"):
            continue
        src = entry.run_dir / "eval" / split / "confusion_matrix.png"
        if src.is_file():
            shutil.copyfile(src, assets / f"confusion_{entry.label}.png")
            section.figure(f"report_assets/confusion_{entry.label}.png", f"{entry.label}: counts and per-class recall")

    # --- attention maps
    _attention_section(doc, cfg, data_dir, manifest, models, assets)
    _localization_section(doc, cfg, data_dir, info, models)

    section = doc.section("Run")
    section.table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
    section.text("Re-run with the same command: finished stages are skipped. Configuration: config.yaml.")
    return doc


def _operating_point_sections(doc, split: str, models) -> None:
    """Per view (melanoma vs rest, cancer vs non-cancer): the teacher's and student's operating points,
    thresholds chosen on val and applied unchanged on `split`, with bootstrap intervals."""
    scored = [(e, e.metrics["operating_points"]) for e in models
              if e.role in ("teacher", "student") and e.metrics.get("operating_points")]
    if not scored:
        return
    views = {"melanoma": "melanoma vs rest", "cancer": "cancer vs non-cancer"}

    for view, title in views.items():
        rows = [[entry.label, name, " + ".join(p["positive_classes"]), f"{p['threshold']:.4g}",
                 _interval_cell(p["sensitivity"], p["sensitivity_ci"]), _interval_cell(p["specificity"], p["specificity_ci"]),
                 f"{p['positives']} / {p['negatives']}"]
                for entry, result in scored for name, p in result["points"].items() if p["view"] == view]
        if not rows:
            continue
        section = doc.section(f"Operating points: {title} ({split} split)")
        first = next(iter(scored[0][1]["points"].values()))
        section.text(f"Thresholds chosen on val (sensN: the largest threshold with sensitivity >= N% there; "
                     f"specN: the smallest with specificity >= N%), applied unchanged on {split}. 95% intervals: "
                     f"percentile bootstrap over {scored[0][1]['units']}, {first['bootstrap']['replicates']} "
                     f"replicates, seed {first['bootstrap']['seed']}.")
        section.table(["model", "point", "positive classes", "threshold", "sensitivity [95% CI]",
                       "specificity [95% CI]", "positives / negatives"], rows)


def _interval_cell(value: float | None, bounds) -> str:
    return f"{_fmt(value)} {format_interval(bounds)}" if bounds else _fmt(value)


def _noise_sentences(section, models, comparisons: dict, manifest, split: str) -> None:
    """Under the table: whether each student's retention is more than noise, and how the teacher's
    validation BMA (its checkpoint selection) compares with its test interval."""
    for entry in models[1:]:
        c = comparisons.get(entry.label)
        if c is not None and entry.role == "student":
            ret = c["balanced_accuracy"]["retention"]
            bounds = ret["interval"]
            span = f" (interval {100 * bounds[0]:.1f}% to {100 * bounds[1]:.1f}%)" if bounds else ""
            section.text(f"{entry.label} keeps {100 * ret['value']:.1f}% of the teacher's BMA{span}. {c['verdict']}")
    teacher = models[0]
    # optional: a teacher trained elsewhere (timm, the teacher store) has no validation entry
    trained = teacher.model_dir / "metrics.json"
    val_bma = (read_results(trained).get("val") or {}).get(BALANCED_ACCURACY) if trained.is_file() else None
    bounds = interval(teacher.metrics, "balanced_accuracy")
    if val_bma is not None and bounds:
        n_val = int((manifest["split"] == "val").sum())
        inside = bounds[0] <= val_bma <= bounds[1]
        section.text(f"Teacher checkpoint selected on validation BMA {val_bma:.4f} ({n_val} images); {split} BMA "
                     f"{_fmt(teacher.metrics['headline']['balanced_accuracy'])}, interval {format_interval(bounds)}: "
                     + ("the validation figure lies inside it." if inside else
                        "the validation figure lies outside it, so one of the two splits misleads (a small "
                        "validation split makes checkpoint selection noisy)."))


def _uncertainty_sections(doc, cfg, models, comparisons: dict, gate_failures: dict) -> None:
    """Every model's headline with intervals; each distilled model against the teacher (paired bootstrap,
    McNemar, agreement, retention gate), the verdicts in words, and per-class retention."""
    teacher = models[0]
    section = doc.section(f"How sure: intervals ({cfg.split})")
    note = interval_note(teacher.metrics)
    if note is None:
        section.text("No bootstrap intervals (bootstrap: 0): no difference below can be told from noise.")
        return
    section.text(note)
    keys = [("balanced_accuracy", "BMA"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
            ("macro_auc", "macro AUC"), ("macro_auc_sens_80", "macro AUC > 80% sens.")]
    section.table(["model", *[label for _, label in keys]],
                  [[e.label, *[_interval_cell(e.metrics["headline"].get(k), interval(e.metrics, k)) for k, _ in keys]]
                   for e in models])
    if not comparisons:
        return
    section = doc.section(f"What each student loses ({cfg.split})")
    section.text("Paired against the teacher on the same images and the same resampled units: BMA difference "
                 "(student - teacher) and retention (student BMA / teacher BMA) with their intervals; McNemar's "
                 "exact test on the images exactly one of the two gets right; top-1 agreement with the teacher, "
                 "and agreement on the images either flags as MEL, BCC or SCC.")
    gate = cfg.distill.min_class_retention
    header = ["model", "BMA - teacher", "retention %", "McNemar p", "top-1 agreement", "cancer agreement"]
    header += ["retention gate"] if gate else []
    rows = []
    for label, c in comparisons.items():
        diff, ret = c["balanced_accuracy"]["difference"], c["balanced_accuracy"]["retention"]
        ret_bounds = [100 * b for b in ret["interval"]] if ret["interval"] else None
        row = [label, f"{diff['value']:+.4f} {format_interval(diff['interval'])}",
               f"{100 * ret['value']:.1f} " + (f"[{ret_bounds[0]:.1f}, {ret_bounds[1]:.1f}]" if ret_bounds else ""),
               f"{c['mcnemar']['p_value']:.3g} ({c['mcnemar']['teacher_only_correct']} vs "
               f"{c['mcnemar']['student_only_correct']})",
               _fmt(c["agreement"]["top1"]), f"{_fmt(c['agreement']['cancer'])} (n={c['agreement']['cancer_images']})"]
        if gate:
            failures = gate_failures.get(label) or []
            row.append("FAIL: " + "; ".join(failures) if failures else "pass")
        rows.append(row)
    section.table(header, rows)
    for label, c in comparisons.items():
        section.text(f"{label}: {c['verdict']}")
    classes = teacher.metrics["classes"]
    section.text("Per-class retention (student recall / teacher recall, interval in brackets); n/a where the "
                 "teacher never recalls the class.")
    section.table(["model", *classes],
                  [[label, *[_interval_cell(c["per_class"][n]["retention"], c["per_class"][n]["interval"])
                             for n in classes]] for label, c in comparisons.items()])
    failing = [label for label, f in gate_failures.items() if f]
    if gate:
        section.text(f"Retention gate ({', '.join(f'{k} >= {v:g}' for k, v in gate.items())}): "
                     + (f"FAILED by {', '.join(failing)}; the run exits with code 1." if failing else "every model passes."))


def _subgroup_section(doc, cfg, run_dir, models, assets) -> None:
    """Subgroup tables (sex, age band, site, skin type) of the teacher and the SkinDistilViT student."""
    shown = [e for e in models if e.role in ("teacher", "student") and e.metrics.get("subgroups")]
    if not shown:
        return
    section = doc.section(f"Subgroups ({cfg.split})")
    section.text(f"From the manifest's metadata. BMA averages the classes present in each group (column `classes`); "
                 f"groups with fewer than {shown[0].metrics['subgroups']['min_size']} images are not scored; "
                 "the gap is between the best and the worst scored group, with its interval.")
    for entry in shown:
        subgroups = entry.metrics["subgroups"]
        section.text(f"**{entry.label}**")
        section.table(SUBGROUP_HEADER, [[_fmt(c) if isinstance(c, float) else c for c in row]
                                        for row in subgroup_rows(subgroups)])
        for gap in subgroup_gaps(subgroups):
            section.text(f"{entry.label}, {gap}")
        src = entry.run_dir / "eval" / cfg.split / "subgroups.png"
        if src.is_file():
            shutil.copyfile(src, assets / f"subgroups_{entry.label}.png")
            section.figure(f"report_assets/subgroups_{entry.label}.png", f"{entry.label}: BMA by subgroup")


def _calibration_section(doc, cfg, run_dir, models, assets) -> None:
    """ECE of every model, family member and exit (15 equal-width bins of top-1 confidence)."""
    rows = [[e.label, "", _fmt(e.metrics["headline"].get("ece"))] for e in models]
    family = run_dir / "family" / "family.json"
    if family.is_file():
        for fam in read_results(family)["families"]:
            rows += [[fam["label"], f"depth {r['depth']}", _fmt(r.get("ece"))] for r in fam["rows"]]
    for entry in models:
        path = entry.run_dir / "eval" / cfg.split / "early_exit.json"
        if path.is_file():
            result = read_results(path)
            rows += [[entry.label, f"exit {d} alone", _fmt(ece)] for d, ece in result.get("per_exit_ece", {}).items()]
            rows += [[entry.label, f"early exit at {p['threshold']}", _fmt(p.get("ece"))] for p in result["points"]]
    section = doc.section(f"Calibration ({cfg.split})")
    section.text("Expected calibration error (ECE) of the top-1 confidence over 15 equal-width bins; the reliability "
                 "bins of each model are in its eval/<split>/metrics.json, of each family member in family/family.json.")
    section.table(["model", "depth / exit", "ECE"], rows)
    for entry in models:
        src = entry.run_dir / "eval" / cfg.split / "reliability.png"
        if entry.role in ("teacher", "student") and src.is_file():
            shutil.copyfile(src, assets / f"reliability_{entry.label}.png")
            section.figure(f"report_assets/reliability_{entry.label}.png", f"{entry.label}: reliability")


def _speed_of(speed: dict, model_dir: Path, run_dir: Path, device: str, batch: int) -> float | None:
    """The ms per image of `model_dir` in `speed` (`_speed_table`). bench.json names models by the path they
    had when it was written: after the run directory was copied or moved (or the report is made from another
    folder, for relative paths), the one model whose path ends with the same path inside the run is it."""
    exact = speed.get((str(model_dir.resolve()), device, batch))
    if exact is not None:
        return exact
    try:
        inside = model_dir.resolve().relative_to(run_dir.resolve()).parts
    except ValueError:
        return None
    same = [ref for (ref, d, b) in speed if d == device and b == batch and Path(ref).parts[-len(inside):] == inside]
    return speed[(same[0], device, batch)] if len(same) == 1 else None


def _speed_table(bench: dict) -> dict[tuple[str, str, int], float]:
    """(model ref, device, batch size) -> ms per image of the eager backend."""
    refs = {s["label"]: s.get("ref", s["label"]) for s in bench.get("models", [])}
    table = {}
    for cell in bench.get("results", []):
        if cell["backend"] == "eager":
            ref = str(Path(refs.get(cell["model"], cell["model"])).resolve())
            table[(ref, cell["device"], int(cell["batch_size"]))] = cell["ms_per_image"]
    return table


def _family_sections(doc, cfg, run_dir, data_dir, models, assets) -> None:
    """Per-depth BMA (cascade members, FCViT exits) and the early-exit curves, when the run has them."""
    family = run_dir / "family" / "family.json"
    if family.is_file():
        result = read_results(family)
        depths = sorted({r["depth"] for f in result["families"] for r in f["rows"]})
        section = doc.section(f"Per-depth BMA ({cfg.split})")
        section.text("One model per depth: cascade members (each distilled from the one a block deeper) and "
                     "the exits of per-depth-head models; the teacher is the dashed line.")
        rows = []
        for fam in result["families"]:
            by_depth = {r["depth"]: r["balanced_accuracy"] for r in fam["rows"]}
            rows.append([fam["label"], *[_fmt(by_depth.get(d)) if d in by_depth else "" for d in depths]])
        for teacher in result.get("teachers", []):
            rows.append(["teacher", *[_fmt(teacher["balanced_accuracy"]) if d == (teacher.get("depth") or depths[-1])
                                      else "" for d in depths]])
        section.table(["method", *map(str, depths)], rows)
        shutil.copyfile(run_dir / "family" / "family.png", assets / "family.png")
        section.figure("report_assets/family.png", "BMA by depth, one line per method")
    curves = [(e, e.run_dir / "eval" / cfg.split / "early_exit.json") for e in models]
    curves = [(e, path) for e, path in curves if path.is_file()]
    if curves:
        section = doc.section(f"Early exit ({cfg.split})")
        section.text("A sample stops at the first block whose top softmax probability reaches the threshold; "
                     "'full' runs every block.")
        for entry, path in curves:
            result = read_results(path)
            section.table(["threshold", "BMA", "accuracy", "mean depth"],
                          [[p["threshold"] if isinstance(p["threshold"], str) else f"{p['threshold']:.2f}",
                            _fmt(p["balanced_accuracy"]), _fmt(p["accuracy"]), f"{p['mean_depth']:.2f}"]
                           for p in result["points"]])
            name = f"early_exit_{entry.label}.png"
            shutil.copyfile(path.with_suffix(".png"), assets / name)
            section.figure(f"report_assets/{name}", f"{entry.label}: BMA against mean depth used")


def _attention_section(doc, cfg, data_dir, manifest, models, assets) -> None:
    from skindistil.data.datamodule import load_cached_image
    from skindistil.data.names import safe_file_stem
    from skindistil.inference.explain import explain_png
    from skindistil.models import load_model

    if cfg.explain_images <= 0:
        return
    test = manifest[manifest["split"] == cfg.split].head(cfg.explain_images)
    # the same images for every model: read once, through the one cache reader (named errors)
    images = [Image.fromarray(load_cached_image(Path(data_dir) / row["cache_file"], (int(row["height"]), int(row["width"]))))
              for _, row in test.iterrows()]
    section = doc.section("Attention maps (attention rollout)")
    for entry in models:
        if entry.role not in ("teacher", "student"):
            continue
        loaded = load_model(entry.model_dir)
        for (_, row), image in zip(test.iterrows(), images, strict=True):
            png, top, prob = explain_png(loaded, image, "rollout")
            name = f"attention_{safe_file_stem(entry.label)}_{safe_file_stem(row['image_id'])}.png"
            write_bytes(assets / name, png)
            section.figure(f"report_assets/{name}",
                           f"{entry.label} on {row['image_id']} (true {row['class_name']}): {top} {prob:.2f}")


def _localization_section(doc, cfg, data_dir, info, models) -> None:
    """Where the teacher and the students look, scored against the lesion masks of the split (when the
    data was prepared with masks): the table, then the questions it answers, each with its numbers."""
    from skindistil.inference.localization import evaluate_localization

    if not info.get("num_masks") or cfg.localization_images <= 0:
        return
    entries = [e for e in models if e.role in ("teacher", "student")]
    teacher = next((e for e in entries if e.role == "teacher"), None)
    results = {}
    for entry in entries:
        reference = teacher.model_dir if teacher is not None and entry is not teacher else None
        results[entry.label] = evaluate_localization(entry.model_dir, data_dir, cfg.split,
                                                     entry.run_dir / "eval" / cfg.split, reference=reference,
                                                     limit=cfg.localization_images)
    first = next(iter(results.values()))
    section = doc.section(f"Where the models look ({cfg.split}, lesion masks)")
    s = first["settings"]
    section.text(f"{first['images']} masked images. Mass ratio = share of the map's mass inside the lesion / the "
                 f"lesion's share of the input (uniform map = 1); pointing game within {s['pointing_tolerance_px']} px; "
                 "pixel AUC of the map against the mask. Mean [95% bootstrap interval]; * = above both baselines. "
                 "Per-image scores: RUN/eval/SPLIT/localization.csv of each model.")
    rows = []
    for label, summary in results.items():
        for e in summary["methods"]:
            if e["method"] in ("random", "centre-prior") and label != next(iter(results)):
                continue
            name = e["method"] if e["method"] in ("random", "centre-prior") else f"{label}: {e['method']}"
            rows.append([name, *[_interval(e[m]) + ("*" if e["beats_baselines"][m] else "")
                                 for m in ("mass_ratio", "pointing_hit", "pixel_auc")]])
    section.table(["model: method", "mass ratio", "pointing game", "pixel AUC"], rows)
    for label, summary in results.items():
        for e in summary["correct_vs_wrong"]:
            if e["method"] not in ("random", "centre-prior"):
                section.text(f"{label}, {e['method']}: mass in lesion {_interval(e['correct'])} on correct and "
                             f"{_interval(e['wrong'])} on wrong predictions (difference "
                             f"{_interval(e['difference'], 'difference')}).")
        for e in summary["reference"]:
            section.text(f"{label} against the teacher, {e['method']}: map correlation {_interval(e['map_correlation'])}, "
                         f"mass-in-lesion retention {_interval(e['retention'], 'ratio')} (correct "
                         f"{_interval(e['retention_correct'], 'ratio')}, wrong {_interval(e['retention_wrong'], 'ratio')}).")


def _interval(stats: dict, key: str = "mean") -> str:
    from skindistil.evaluation.localization import format_interval

    return format_interval(stats, key)


def epoch_history(run_dir: Path) -> dict[str, list[float]] | None:
    """Training loss and validation BMA by epoch from a run's logs/metrics.csv (an earlier version's
    `val/bma` column read as `val/balanced_accuracy`, see `read_history`); None when the run has no
    such log or the log lacks one of the columns (no curves then)."""
    from skindistil.training.logs import read_history

    path = Path(run_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return None
    columns, rows = read_history(path, before_step=None)
    frame = pd.DataFrame(rows, columns=columns).apply(pd.to_numeric, errors="coerce")
    needed = {"epoch", "train/loss_epoch", "val/balanced_accuracy"}
    if not needed <= set(frame.columns):
        return None
    by_epoch = frame.groupby("epoch").max(numeric_only=True)
    return {"epoch": by_epoch.index.to_numpy(dtype=int).tolist(),
            "train_loss": by_epoch["train/loss_epoch"].to_numpy(dtype=float).tolist(),
            "val_balanced_accuracy": by_epoch["val/balanced_accuracy"].to_numpy(dtype=float).tolist()}
