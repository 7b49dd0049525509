"""`skindistil distill`: distill a teacher artifact into SkinDistilViT or a family of lighter models."""

from __future__ import annotations

import argparse

from skindistil.config import BLOCK_SELECTIONS  # config imports no heavy library

FLAG_KEYS = {
    "teacher": "teacher",
    "teacher_store": "teacher_store",
    "data": "data.dir",
    "method": "method",
    "keep_blocks": "keep_blocks",
    "block_selection": "block_selection",
    "min_depth": "min_depth",
    "name": "name",
    "out_dir": "out_dir",
    "epochs": "trainer.max_epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "a_task": "loss.a_task",
    "a_kd": "loss.a_kd",
    "temperature": "loss.temperature",
    "a_mse": "loss.a_mse",
    "a_cos": "loss.a_cos",
    "a_chain": "loss.a_chain",
    "a_dist": "loss.a_dist",
    "dist_token": "loss.distillation_token",
    "student_init": "student_init",
    "imbalance": "data.imbalance",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "workers": "data.num_workers",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["distilvit", "fcvit", "fcvit-probs", "cascade", "full"])
    p.add_argument("--min-depth", type=int, help="cascade: depth of the last member (default 1)")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="continue from this checkpoint, e.g. RUN/checkpoints/last-prev.ckpt (not for cascade)")
    add_gate_argument(p)
    add_student_arguments(p)


def add_gate_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-class-retention", action="append", metavar="CLASS=RATIO",
                   help="retention gate: a distilled model fails when its recall of CLASS falls below RATIO x the "
                        "teacher's on the test split (e.g. MEL=0.97; repeat or comma-separate; config key "
                        "min_class_retention); a failure is reported and the exit code is 1")


def add_student_arguments(p: argparse.ArgumentParser) -> None:
    """Teacher, data, student shape, loss weights and trainer options (shared with `ablate`)."""
    p.add_argument("--teacher", help="teacher model/ or run directory")
    p.add_argument("--teacher-store", help="stored teacher outputs (`skindistil store-teacher`): students train "
                                           "without running the teacher")
    p.add_argument("--data", help="prepared dataset directory")
    p.add_argument("--config", help="YAML recipe; flags and overrides apply on top")
    p.add_argument("--student-init", metavar="DIR|TIMM_VIT",
                   help="the ViT the student starts from instead of the teacher's blocks (needed for a non-ViT "
                        "teacher): a ViT model/ or run directory, or a timm ViT name (random weights; NAME.TAG: "
                        "timm's pretrained weights); shape via student_kwargs={...}, input via student_preprocess={...}")
    p.add_argument("--dist-token", choices=["none", "soft", "hard"],
                   help="DeiT distillation token: soft (KL at --temperature) or hard (CE on the teacher's top "
                        "class) through the token's own head (loss.distillation_token)")
    p.add_argument("--keep-blocks", "--keep", dest="keep_blocks", type=_keep_blocks,
                   help="distilvit: blocks to keep, a number (default 6) or a list like 0,2,4,7,9,11 (keep_blocks)")
    p.add_argument("--block-selection", choices=BLOCK_SELECTIONS,
                   help="which blocks a number of --keep-blocks keeps: the first ones (default) or spread uniformly, "
                        "first and last included (block_selection)")
    p.add_argument("--name", help="run name: the run directory is OUT_DIR/NAME")
    p.add_argument("--out-dir", help="parent of run directories (default runs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    for term in ("a-task", "a-kd", "temperature", "a-mse", "a-cos", "a-chain", "a-dist"):
        p.add_argument(f"--{term}", type=float, help=f"loss.{term.replace('-', '_')}")
    p.add_argument("--imbalance", choices=["none", "weighted-loss", "balanced-sampler"])
    p.add_argument("--devices")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--strategy", "--ddp-strategy", dest="strategy",
                   help="Lightning's strategy, trainer.strategy (auto, ddp, ...), as on train")
    p.add_argument("--accelerator")
    p.add_argument("--precision")
    p.add_argument("--workers", type=int)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. loss.cos_tokens=cls")


def _keep_blocks(text: str):
    parts = [p for p in text.split(",") if p.strip()]
    return int(parts[0]) if len(parts) == 1 else "[" + ",".join(str(int(p)) for p in parts) + "]"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.commands.common import resolve_config
    from skindistil.config import DistillConfig
    from skindistil.evaluation.retention import parse_retention_gate
    from skindistil.training.distill_run import distill

    cfg = resolve_config(args, DistillConfig, FLAG_KEYS)
    if args.min_class_retention:
        cfg.min_class_retention = {**parse_retention_gate(cfg.min_class_retention),
                                   **parse_retention_gate(args.min_class_retention)}
    gate = _checked_gate(cfg)
    console = Console()
    for result in distill(cfg, resume=args.resume, resume_from=args.resume_from):
        if result.model_dir is not None:
            bma = "n/a" if result.best_val_bma is None else f"{result.best_val_bma:.4f}"
            console.print(f"[bold]model[/bold] {result.model_dir}  best val BMA {bma}")
    if not gate:
        return 0
    from skindistil.evaluation.compare import gate_students

    models = sorted(cfg.run_dir.glob("cascade/depth-*/model")) if cfg.method == "cascade" else [cfg.run_dir / "model"]
    result = gate_students(cfg.teacher, models, cfg.data.dir, GATE_SPLIT, gate, cfg.run_dir / "eval" / GATE_SPLIT,
                           num_workers=cfg.data.num_workers, progress=cfg.trainer.progress)
    for row in result["students"]:
        console.print(row["comparison"]["verdict"])
        status = "[red]FAILS[/red] " + "; ".join(row["failures"]) if row["failures"] else "[green]passes[/green]"
        console.print(f"[bold]retention gate[/bold] {row['model']}: {status}")
    console.print(f"retention report: {cfg.run_dir / 'eval' / GATE_SPLIT / 'retention.md'}")
    return 0 if result["passed"] else 1


GATE_SPLIT = "test"


def _checked_gate(cfg) -> dict[str, float]:
    """The gate of `cfg`, with its classes checked against the teacher's before any training."""
    from skindistil.evaluation.retention import parse_retention_gate

    if not cfg.min_class_retention:
        return {}
    import json

    from skindistil.models.artifact import CONFIG_FILE, resolve_model_dir

    if not cfg.teacher:
        return parse_retention_gate(cfg.min_class_retention)
    classes = json.loads((resolve_model_dir(cfg.teacher) / CONFIG_FILE).read_text())["classes"]
    return parse_retention_gate(cfg.min_class_retention, classes)
