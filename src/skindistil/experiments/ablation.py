"""Loss ablation of SkinDistilViT: the student trained with the full loss, then with each term removed.

Variants (`ablation_variants`): "full" is the configured loss, with the hidden-state cosine term
switched on at `cos_weight` when its configured weight is 0 (so that removing it is an ablation too);
"no-<term>" is "full" with that term's weight set to 0, for every term whose weight is non-zero
(task, kd, mse, cos). Every variant starts from the same teacher blocks, data order and seed, so the
variants differ only in their loss.

Layout: RUN/variants/<variant>/ is each variant's distillation run (a rerun skips variants whose
model/ exists); RUN/ablation/ablation.{md,json,png} is the report: validation and test BMA per
variant and retention = student test BMA / teacher test BMA, in %.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from skindistil.config import DistillConfig, LossConfig, dump_yaml
from skindistil.data.datamodule import SkinDataModule
from skindistil.errors import ConfigError
from skindistil.evaluation.metrics import AbsentClassWarning, balanced_accuracy, decide
from skindistil.evaluation.plots import plot_ablation
from skindistil.evaluation.report import write_metrics_json
from skindistil.files import write_text
from skindistil.markdown import markdown_table
from skindistil.models import load_model
from skindistil.models.artifact import CONFIG_FILE, resolve_model_dir
from skindistil.models.student import vit_depth
from skindistil.models.weights import read_json_object
from skindistil.training.distill_run import distill

ABLATION_TERMS = {"task": "a_task", "kd": "a_kd", "mse": "a_mse", "cos": "a_cos"}
DEFAULT_COS_WEIGHT = 0.1


def ablation_variants(loss: LossConfig, cos_weight: float = DEFAULT_COS_WEIGHT) -> dict[str, LossConfig]:
    """{"full": loss (cosine at `cos_weight` if it was off), "no-<term>": full without that term, ...}."""
    full = loss if loss.a_cos or not cos_weight else dataclasses.replace(loss, a_cos=float(cos_weight))
    variants = {"full": full}
    for term, field in ABLATION_TERMS.items():
        if getattr(full, field):
            variants[f"no-{term}"] = dataclasses.replace(full, **{field: 0.0})
    return variants


def run_ablation(cfg: DistillConfig, *, cos_weight: float = DEFAULT_COS_WEIGHT, resume: bool = False,
                 device: str | None = None) -> dict:
    """Train every variant of `cfg` (method distilvit) under cfg.run_dir/variants, score each on the
    validation and test splits, and write cfg.run_dir/ablation/. Returns the report's content (with
    "files"); on processes other than rank 0 of a distributed run, an empty dict."""
    if cos_weight and not cfg.loss.a_cos and cfg.teacher:
        teacher_config = read_json_object(resolve_model_dir(cfg.teacher) / CONFIG_FILE)
        if teacher_config.get("kind") == "timm":
            raise ConfigError(f"--cos-weight {cos_weight:g}: the teacher {cfg.teacher} is not a ViT, so there is no "
                              "hidden-state cosine term to ablate; pass --cos-weight 0")
    variants = ablation_variants(cfg.loss, cos_weight)
    cfg = dataclasses.replace(cfg, method="distilvit")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg.to_dict(), cfg.run_dir / "config.yaml")
    variant_dirs = {}
    for name, loss in variants.items():
        variant_cfg = dataclasses.replace(cfg, name=name, out_dir=str(cfg.run_dir / "variants"), loss=loss)
        variant_dirs[name] = variant_cfg.run_dir
        if not (variant_cfg.run_dir / "model" / CONFIG_FILE).is_file():
            distill(variant_cfg, resume=resume)
    if rank_zero_only.rank != 0:
        return {}
    return score_ablation(cfg, variants, variant_dirs, cos_weight=cos_weight, device=device)


def score_ablation(cfg: DistillConfig, variants: dict[str, LossConfig], variant_dirs: dict[str, Path], *,
                   cos_weight: float = DEFAULT_COS_WEIGHT, device: str | None = None) -> dict:
    """Validation and test BMA of the teacher and of each variant; retention; the report files."""
    device = device or ("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
                        else "cpu")
    teacher = load_model(cfg.teacher, device=device)
    datamodules: dict = {}

    def data_for(preprocess):  # each model is scored through its own preprocessing (a student's may differ)
        if preprocess not in datamodules:
            datamodules[preprocess] = SkinDataModule(
                cfg.data.dir, preprocess, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                num_workers=cfg.data.num_workers, persistent_workers=False)
        return datamodules[preprocess]

    teacher_bma = {split: split_bma(teacher.model, data_for(teacher.preprocess), split) for split in ("val", "test")}
    rows = []
    for name, loss in variants.items():
        student = load_model(variant_dirs[name], device=device)
        bma = {split: split_bma(student.model, data_for(student.preprocess), split) for split in ("val", "test")}
        rows.append({
            "variant": name,
            **{field: getattr(loss, field) for field in ABLATION_TERMS.values()},
            "val_balanced_accuracy": bma["val"],
            "test_balanced_accuracy": bma["test"],
            "retention_pct": 100.0 * bma["test"] / teacher_bma["test"] if teacher_bma["test"] else float("nan"),
            "depth": vit_depth(student.model),
            "model": str(student.path),
        })
    full_test = rows[0]["test_balanced_accuracy"]
    for row in rows:
        row["delta_test_balanced_accuracy"] = row["test_balanced_accuracy"] - full_test
    result = {
        "teacher": {"model": str(teacher.path), "val_balanced_accuracy": teacher_bma["val"],
                    "test_balanced_accuracy": teacher_bma["test"],
                    "depth": vit_depth(teacher.model)},
        "temperature": cfg.loss.temperature,
        "cos_weight": cos_weight,
        "cos_tokens": cfg.loss.cos_tokens,
        "keep": cfg.keep_blocks,  # the ablation.json key stays "keep" (an output format)
        "epochs": cfg.trainer.max_epochs,
        "data": str(cfg.data.dir),
        "variants": rows,
    }
    return {**result, "files": write_ablation_report(result, cfg.run_dir / "ablation")}


@torch.inference_mode()
def split_bma(model: torch.nn.Module, datamodule: SkinDataModule, split: str) -> float:
    """BMA of `model` on a whole split with the eval preprocessing (ISIC tie rule)."""
    device = next(model.parameters()).device
    preds, labels = [], []
    for images, targets, *_ in datamodule.loader(datamodule.dataset(split), datamodule.eval_batch_size):
        preds.append(decide(model(images.to(device)).float().softmax(dim=-1).cpu().numpy()))
        labels.append(targets.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)  # a small split may lack a class
        return balanced_accuracy(np.concatenate(labels), np.concatenate(preds), datamodule.num_classes)


def _blocks(depth: int | None) -> str:
    return f"{depth} blocks" if depth is not None else "not a ViT"


def write_ablation_report(result: dict, out_dir: str | Path) -> dict[str, str]:
    """ablation.json, ablation.md (one row per variant) and ablation.png (val/test BMA bars)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = result["teacher"]
    lines = [
        "# Loss ablation (SkinDistilViT)", "",
        f"Teacher ({_blocks(teacher['depth'])}): val BMA {teacher['val_balanced_accuracy']:.4f}, "
        f"test BMA {teacher['test_balanced_accuracy']:.4f}. "
        f"Students keep {result['keep']} blocks, {result['epochs']} epochs, T = {result['temperature']}. "
        "Retention = student test BMA / teacher test BMA.", "",
        markdown_table(["variant", "a_task", "a_kd", "a_mse", "a_cos", "val BMA", "test BMA", "retention %",
                        "test BMA vs full"],
                       [[r["variant"], f"{r['a_task']:g}", f"{r['a_kd']:g}", f"{r['a_mse']:g}", f"{r['a_cos']:g}",
                         f"{r['val_balanced_accuracy']:.4f}", f"{r['test_balanced_accuracy']:.4f}",
                         f"{r['retention_pct']:.2f}",
                         f"{r['delta_test_balanced_accuracy']:+.4f}"] for r in result["variants"]]),
    ]
    files = {"json": out / "ablation.json", "md": out / "ablation.md", "png": out / "ablation.png"}
    write_metrics_json(files["json"], result)
    write_text(files["md"], "\n".join(lines) + "\n")
    variants = result["variants"]
    plot_ablation([r["variant"] for r in variants], [r["val_balanced_accuracy"] for r in variants],
                  [r["test_balanced_accuracy"] for r in variants], files["png"],
                  teacher_bma=teacher["test_balanced_accuracy"])
    return {key: str(path) for key, path in files.items()}
