"""`skindistil train`: train a teacher (or any timm ViT classifier) on a prepared dataset."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="prepared dataset directory (from `skindistil prepare`)")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); flags and overrides apply on top")
    p.add_argument("--model", help="timm architecture, e.g. vit_base_patch16_224")
    p.add_argument("--pretrained", help="timm hub tag, local weights (.safetensors; .pth/.pth.tar/.ckpt from timm's "
                   "train.py, Lightning or DDP, read weights-only) or a Hugging Face ViT checkpoint")
    p.add_argument("--ema", action="store_true", default=None,
                   help="load the EMA weights of the --pretrained checkpoint (error if it has none)")
    p.add_argument("--name", help="run name: the run directory is OUT_DIR/NAME")
    p.add_argument("--out-dir", help="parent of run directories (default runs)")
    p.add_argument("--epochs", type=int, help="trainer.max_epochs")
    p.add_argument("--batch-size", type=int, help="data.batch_size")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--imbalance", choices=["none", "weighted-loss", "balanced-sampler"], help="data.imbalance")
    p.add_argument("--devices", help="trainer.devices (auto, N, or a list)")
    p.add_argument("--num-nodes", type=int, help="trainer.num_nodes")
    p.add_argument("--strategy", help="trainer.strategy (auto, ddp, ...)")
    p.add_argument("--accelerator", help="trainer.accelerator (auto, cpu, gpu)")
    p.add_argument("--precision", help="trainer.precision (auto: bf16-mixed on GPU, 32-true on CPU)")
    p.add_argument("--workers", type=int, help="data.num_workers")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.ckpt if it exists")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="continue from this checkpoint, e.g. RUN/checkpoints/last-prev.ckpt (the one before last)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.schedule=cosine")


# flag -> dotted config key
FLAG_KEYS = {
    "data": "data.dir",
    "model": "model.name",
    "pretrained": "model.pretrained",
    "ema": "model.pretrained_ema",
    "name": "name",
    "out_dir": "out_dir",
    "epochs": "trainer.max_epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "imbalance": "data.imbalance",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "strategy": "trainer.strategy",
    "accelerator": "trainer.accelerator",
    "precision": "trainer.precision",
    "workers": "data.num_workers",
}


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from rich.console import Console

    from skindistil.commands.common import resolve_config
    from skindistil.config import TrainConfig
    from skindistil.training.teacher import train_classifier

    cfg = resolve_config(args, TrainConfig, FLAG_KEYS)
    # Say which weights --pretrained loaded (file entry, EMA or raw, head kept or new).
    weights_log, handler = logging.getLogger("skindistil.models.teacher"), logging.StreamHandler(sys.stderr)
    weights_log.setLevel(logging.INFO)
    weights_log.addHandler(handler)
    try:
        result = train_classifier(cfg, resume=args.resume, resume_from=args.resume_from)
    finally:
        weights_log.removeHandler(handler)
    if result.model_dir is not None:
        Console().print(
            f"[bold]run[/bold] {result.run_dir}  [bold]model[/bold] {result.model_dir}  "
            f"best val BMA {result.best_val_bma:.4f}  train {result.images_per_second:.1f} img/s"
        )
    return 0
