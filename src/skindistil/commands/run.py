"""`skindistil run`: the main job from a recipe: prepare, teacher, students, evaluation, benchmark, report."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument("--config", required=default_config is None, default=default_config,
                   help="recipe: a YAML file or the name of a built-in one (quickstart, ham10000-scratch, "
                        "paper-isic2019)" + (f"; default {default_config}" if default_config else ""))
    p.add_argument("--data", help="images to use instead of the recipe's: an ISIC 2016-2020 or 2024 challenge folder, "
                                  "a HAM10000 folder, a DermaMNIST .npz, a CSV of paths, an ImageFolder tree "
                                  "(train/val/test folders are splits) or a prepared DATA_DIR")
    p.add_argument("--name", help="run name (RUN = OUT_DIR/NAME)")
    p.add_argument("--out-dir", help="parent of run directories (default runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--min-class-retention", action="append", metavar="CLASS=RATIO",
                   help="retention gate: a distilled model fails when its recall of CLASS on the evaluated split "
                        "falls below RATIO x the teacher's (e.g. MEL=0.97; repeat or comma-separate; config key "
                        "distill.min_class_retention); failures are marked in the report and the exit code is 1")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. teacher.trainer.max_epochs=3 methods=[distilvit,cascade]")


def recipe_path(config: str) -> Path:
    """A YAML path as given, or a built-in recipe by name (skindistil/configs/NAME.yaml)."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml"


def run(args: argparse.Namespace) -> int:
    from skindistil.config import RunConfig, apply_overrides, load_yaml, upgrade_keys
    from skindistil.experiments.pipeline import detect_source, run_pipeline

    recipe = recipe_path(args.config)
    data = upgrade_keys(RunConfig, load_yaml(recipe), origin=str(recipe))
    if args.data:
        kind, root = detect_source(args.data)
        data.setdefault("data", {}).update({"source": kind, "root": root, "options": {}})
    for key in ("name", "out_dir"):
        if getattr(args, key):
            data[key] = str(getattr(args, key))
    cfg = RunConfig.from_dict(apply_overrides(data, list(args.overrides), RunConfig))
    if args.min_class_retention:
        from skindistil.evaluation.retention import parse_retention_gate

        cfg.distill.min_class_retention = {**parse_retention_gate(cfg.distill.min_class_retention),
                                           **parse_retention_gate(args.min_class_retention)}
    pipeline = run_pipeline(cfg, progress=not args.no_progress)
    return 1 if any(pipeline.gate_failures.values()) else 0
