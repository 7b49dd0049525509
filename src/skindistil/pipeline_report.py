"""The run report (RUN/report.md + report.html): data, teacher vs students, curves, maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from skindistil.config import RunConfig
from skindistil.evaluation.document import Document
from skindistil.evaluation.plots import plot_training_curves
from skindistil.evaluation.report import headline_rows, incomplete_warning
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
                 assets: Path) -> Document:
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
        row = [entry.label, architecture_of(config)["kwargs"]["depth"], f"{config['num_parameters']:,}",
               f"{size_mb:.2f}", _fmt(headline["balanced_accuracy"]), _fmt(headline["accuracy"]),
               _fmt(headline["macro_f1"]), f"{retention:.1f}"]
        row += [_fmt(speed.get((str(entry.model_dir.resolve()), d, b)), 3) for d, b in speed_cols]
        rows.append(row)
    section.table(header, rows)
    for ratio in bench.get("ratios", []):
        if ratio["backend"] == "eager":
            section.text(f"Student vs teacher ({ratio['device']}, eager, batch {ratio['batch_size']}): "
                         f"{ratio['smaller']:.1%} smaller, {ratio['faster']:.1%} faster "
                         f"(speed-up {ratio['speedup']:.2f}x, t_teacher / t_student - 1).")
    machine = bench.get("machine", {})
    section.text(f"Speed measured on {machine.get('device_name', machine.get('device', '?'))} with "
                 f"{machine.get('threads', '?')} threads, median of repeated timed calls after warm-up "
                 "(RUN/benchmark/bench.md has the full table).")

    # --- curves
    from skindistil.pipeline import epoch_history

    histories = {e.label: h for e in models if e.role in ("teacher", "student") and (h := epoch_history(e.run_dir))}
    if histories:
        plot_training_curves(histories, assets / "training_curves.png")
        doc.section("Training curves").figure("report_assets/training_curves.png",
                                              "Training loss and validation BMA by epoch")
    _family_sections(doc, cfg, run_dir, data_dir, models, assets)

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

    section = doc.section("Run")
    section.table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
    section.text("Re-run with the same command: finished stages are skipped. Configuration: config.yaml.")
    return doc


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
        result = json.loads(family.read_text())
        depths = sorted({r["depth"] for f in result["families"] for r in f["rows"]})
        section = doc.section(f"Per-depth BMA ({cfg.split})")
        section.text("One model per depth: cascade members (each distilled from the one a block deeper) and "
                     "the exits of per-depth-head models; the teacher is the dashed line.")
        rows = []
        for fam in result["families"]:
            by_depth = {r["depth"]: r["bma"] for r in fam["rows"]}
            rows.append([fam["label"], *[_fmt(by_depth.get(d)) if d in by_depth else "" for d in depths]])
        for teacher in result.get("teachers", []):
            rows.append(["teacher", *[_fmt(teacher["bma"]) if d == teacher.get("depth", depths[-1]) else ""
                                      for d in depths]])
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
            result = json.loads(path.read_text())
            section.table(["threshold", "BMA", "accuracy", "mean depth"],
                          [[p["threshold"] if isinstance(p["threshold"], str) else f"{p['threshold']:.2f}",
                            _fmt(p["bma"]), _fmt(p["accuracy"]), f"{p['mean_depth']:.2f}"] for p in result["points"]])
            name = f"early_exit_{entry.label}.png"
            shutil.copyfile(path.with_suffix(".png"), assets / name)
            section.figure(f"report_assets/{name}", f"{entry.label}: BMA against mean depth used")


def _attention_section(doc, cfg, data_dir, manifest, models, assets) -> None:
    from skindistil.data.names import safe_file_stem
    from skindistil.inference.explain import explain_png
    from skindistil.models import load_model

    if cfg.explain_images <= 0:
        return
    test = manifest[manifest["split"] == cfg.split].head(cfg.explain_images)
    section = doc.section("Attention maps (attention rollout)")
    for entry in models:
        if entry.role not in ("teacher", "student"):
            continue
        loaded = load_model(entry.model_dir)
        for _, row in test.iterrows():
            image = Image.fromarray(np.load(Path(data_dir) / row["cache_file"]))
            png, top, prob = explain_png(loaded, image, "rollout")
            name = f"attention_{safe_file_stem(entry.label)}_{safe_file_stem(row['image_id'])}.png"
            (assets / name).write_bytes(png)
            section.figure(f"report_assets/{name}",
                           f"{entry.label} on {row['image_id']} (true {row['class_name']}): {top} {prob:.2f}")
