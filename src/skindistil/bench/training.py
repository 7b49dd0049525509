"""Training throughput of `skindistil train` / `skindistil distill` against the raw train step.

Definitions
- raw img/s: the train step alone on synthetic tensors already on the device (normal images, random
  labels), AdamW (`build_optimizer`, as the trainer builds it), gradient-norm clipping and bf16
  autocast as the trainer applies them. The timed steps are split into windows of equal length; the
  device is synchronised at each window's ends; img/s = batch size x steps per window / median
  window seconds. Teacher mode: cross-entropy on the model's logits. Distillation mode (a `teacher`
  given): the teacher's forward under no_grad, then the student's forward, `DistillationLoss` with
  the default `LossConfig` weights (hidden pair included, as SkinDistilViT's step passes it), the
  student's backward and step.
- skindistil img/s: what `TrainThroughput` writes to RUN/logs/throughput.json during a real run on a
  prepared dataset: data loading and augmentation included, validation and the first batches
  excluded.
- ratio = skindistil img/s / raw img/s: the share of the raw step's speed that the whole training
  loop keeps (the issues' target is >= 0.90 for ViT-B/16, bf16, batch 256 on one H100).

The raw figure is measured right before and right after the real run, on a fresh model each time,
and the mean of the two is reported, so a machine whose load drifts during the run (a shared CPU)
biases the ratio less.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skindistil.config import DistillConfig, LossConfig, OptimConfig, PreprocessConfig, TrainConfig
from skindistil.data.prepare import default_workers, load_manifest, prepare_dataset
from skindistil.data.sources import build_source
from skindistil.devices import parse_device
from skindistil.distill.losses import DistillationLoss
from skindistil.errors import ConfigError
from skindistil.files import write_json, write_text
from skindistil.markdown import markdown_table as render_table
from skindistil.measure import device_sync, time_calls
from skindistil.models import create_teacher, extract_student, save_artifact
from skindistil.models.multi_exit import vit_logits_and_hidden
from skindistil.training.distill_run import distill
from skindistil.training.optim import build_optimizer
from skindistil.training.teacher import train_classifier
from skindistil.training.trainer import resolve_precision

MODES = ("teacher", "distill")
# issue 3 section 4 and issue 4 section 6: on one H100, ViT-B/16 (-> 6 blocks), bf16, batch 256
GPU_TARGET_RATIO = 0.90
RESULT_FORMAT = 1

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "32-true": None, "32": None}


# ------------------------------------------------------------------------------------ raw step


def autocast_for(precision: str, device: torch.device):
    """The autocast context Lightning's `precision` puts around the forward: bf16 for bf16-mixed,
    none for full precision (the only two the raw step reproduces)."""
    if precision not in _AUTOCAST_DTYPES:
        raise ConfigError(f"precision {precision!r}: the raw step supports {', '.join(_AUTOCAST_DTYPES)}")
    dtype = _AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def raw_train_step_throughput(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    steps: int = 20,
    warmup: int = 5,
    precision: str = "32-true",
    device: str | torch.device = "cpu",
    teacher: nn.Module | None = None,
    *,
    windows: int = 5,
    gradient_clip_val: float | None = 1.0,
    optim: OptimConfig | None = None,
    loss: LossConfig | None = None,
    seed: int = 0,
) -> float:
    """Images per second of the bare train step of `model` (see the module doc for the definition).

    `model` (a timm ViT; the student when `teacher` is given) is moved to `device` and trained by
    the steps; `teacher` is moved to `device` and only run forward under no_grad, its weights are
    left as they were. Both modules get their train/eval mode back at the end. `steps` timed steps
    (after `warmup` untimed ones) are split into `windows` windows of steps // windows steps each.
    """
    if batch_size < 1 or steps < 1 or warmup < 0 or windows < 1:
        raise ConfigError("raw step: need batch_size >= 1, steps >= 1, warmup >= 0 and windows >= 1")
    device = torch.device(device)
    windows = min(windows, steps)
    per_window = steps // windows
    sync = device_sync(device)

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    targets = torch.randint(model.num_classes, (batch_size,), generator=generator).to(device)

    was_training = model.training
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, optim or OptimConfig())
    if teacher is not None:
        teacher_was_training = teacher.training
        teacher.to(device).eval()
        loss_cfg = loss or LossConfig()
        kd = DistillationLoss(
            a_task=loss_cfg.a_task, a_kd=loss_cfg.a_kd, temperature=loss_cfg.temperature, a_mse=loss_cfg.a_mse,
            a_cos=loss_cfg.a_cos, cos_tokens=loss_cfg.cos_tokens,
        )

    def step() -> None:
        with autocast_for(precision, device):
            if teacher is None:
                value = F.cross_entropy(model(images), targets)
            else:
                with torch.no_grad():
                    teacher_logits, teacher_hidden = vit_logits_and_hidden(teacher, images)
                logits, hidden = vit_logits_and_hidden(model, images)
                value, _ = kd(logits, teacher_logits, targets, hidden_pairs=[(hidden, teacher_hidden)])
        value.backward()
        if gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def window(_) -> None:
        for _ in range(per_window):
            step()

    try:
        for _ in range(warmup):
            step()
        if sync:
            sync()
        seconds = time_calls(window, None, warmup=0, repeats=windows, min_repeats=windows, max_seconds=math.inf, sync=sync)
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    return batch_size * per_window / statistics.median(seconds)


# ------------------------------------------------------------------------------- comparison runner


@dataclass
class ComparisonSettings:
    """One comparison run. `model_name` + `model_kwargs` are a timm architecture (random weights; its
    `img_size` is the input size). `data_dir` None: a synthetic dataset of `images` images cached at
    a shorter side of `short_side` (None: 8/7 of the input size, i.e. 256 for 224, at least the
    resize size) is prepared under `out_dir`. `workers` None: all cores on CUDA, the data module's
    default (cores - 1) on the CPU. `keep_blocks`: student blocks (distillation, the first ones); None:
    half the model's blocks (12 -> 6, the paper's student)."""

    model_name: str = "vit_base_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 256
    epochs: int = 5
    data_dir: str | None = None
    images: int = 4000
    short_side: int | None = None
    augment_on: str = "device"
    workers: int | None = None
    keep_blocks: int | None = None
    modes: tuple[str, ...] = MODES
    raw_steps: int = 20
    raw_warmup: int = 5
    progress: bool = False
    out_dir: str = "runs/train_throughput"
    seed: int = 42

    def validate(self) -> None:
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ConfigError(f"modes {list(self.modes)}: choose from {', '.join(MODES)}")
        if self.batch_size < 1 or self.epochs < 1 or self.images < 8:
            raise ConfigError("need batch_size >= 1, epochs >= 1 and images >= 8 (one per class)")
        parse_device(self.device)


@dataclass
class ThroughputRow:
    """One model's figures: raw step (before and after the real run) and skindistil's training loop."""

    mode: str
    model: str
    device: str
    precision: str
    batch_size: int
    raw_before: float
    raw_after: float
    skindistil: float
    target: float | None
    run_dir: str

    @property
    def raw(self) -> float:
        return (self.raw_before + self.raw_after) / 2

    @property
    def ratio(self) -> float:
        return self.skindistil / self.raw

    def to_dict(self) -> dict:
        return {**asdict(self), "raw": self.raw, "ratio": self.ratio}


def trainer_device(device: torch.device) -> tuple[str, int | list[int]]:
    """(accelerator, devices) for Lightning from a torch device."""
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    return "cpu", 1


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def default_short_side(image_size: int) -> int:
    """8/7 of the input size (256 for 224, the cache size the recipes use), at least the resize size."""
    return max(PreprocessConfig(image_size=image_size).resize_size, round(image_size * 8 / 7))


def prepare_synthetic(out_dir: str | Path, images: int, short_side: int, seed: int = 42,
                      workers: int | None = None) -> Path:
    """The synthetic source, `images` images rendered and cached at `short_side`, prepared once under
    `out_dir` (reused when already there)."""
    data_dir = Path(out_dir) / f"synthetic-{images}-{short_side}"
    if not (data_dir / "dataset.json").is_file():
        source = build_source("synthetic", str(images), image_size=short_side, seed=seed)
        prepare_dataset(source, data_dir, short_side=short_side, workers=workers, progress=False)
    return data_dir


def _model_label(name: str, kwargs: dict) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")


class _ComparisonRun:
    """The state one `run_comparison` call shares between its modes."""

    def __init__(self, settings: ComparisonSettings, log: Callable[[str], None]):
        self.s = settings
        self.log = log
        self.device = torch.device(settings.device)
        self.accelerator, self.devices = trainer_device(self.device)
        self.precision = resolve_precision(settings.precision, self.accelerator)
        self.out_dir = Path(settings.out_dir)
        probe = self.build_model(num_classes=2)
        self.image_size = int(probe.patch_embed.img_size[0])
        self.keep_blocks = settings.keep_blocks or max(1, len(probe.blocks) // 2)
        if settings.data_dir:
            self.data_dir = Path(settings.data_dir)
        else:
            short_side = settings.short_side or default_short_side(self.image_size)
            log(f"preparing {settings.images} synthetic images at a shorter side of {short_side} px")
            self.data_dir = prepare_synthetic(self.out_dir / "data", settings.images, short_side, settings.seed)
        self.classes = list(load_manifest(self.data_dir)[1]["classes"])
        if settings.workers is not None:
            self.workers = settings.workers
        else:
            self.workers = default_workers() if self.device.type == "cuda" else None

    def build_model(self, num_classes: int | None = None) -> nn.Module:
        return create_teacher(self.s.model_name, num_classes or len(self.classes), pretrained=None,
                              **self.s.model_kwargs)

    def common(self) -> dict:
        """Config sections a teacher run and a distillation run share."""
        data = {"dir": str(self.data_dir), "batch_size": self.s.batch_size, "num_workers": self.workers,
                "augment_on": self.s.augment_on}
        trainer = {"max_epochs": self.s.epochs, "precision": self.precision, "accelerator": self.accelerator,
                   "devices": self.devices, "progress": self.s.progress, "seed": self.s.seed}
        return {"out_dir": str(self.out_dir), "data": data, "trainer": trainer}

    def raw(self, teacher_mode: bool) -> float:
        """The raw step on a fresh model (and student), freed afterwards."""
        model = self.build_model()
        student, teacher = (model, None) if teacher_mode else (extract_student(model, self.keep_blocks).model, model)
        try:
            return raw_train_step_throughput(student, self.s.batch_size, self.image_size, self.s.raw_steps,
                                             self.s.raw_warmup, self.precision, self.device, teacher,
                                             gradient_clip_val=TrainConfig().trainer.gradient_clip_val)
        finally:
            del model, student, teacher
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def real_teacher(self) -> Path:
        cfg = TrainConfig.from_dict({
            "name": "teacher", **self.common(),
            "model": {"name": self.s.model_name, "kwargs": dict(self.s.model_kwargs)},
            "preprocess": {"image_size": self.image_size},
        })
        train_classifier(cfg)
        return cfg.run_dir

    def real_distill(self) -> Path:
        """SkinDistilViT (distilvit) from a random-weights teacher artifact of the model."""
        teacher_dir = self.out_dir / "distill-teacher" / "model"
        preprocess = PreprocessConfig(image_size=self.image_size)
        arch = {"name": self.s.model_name,
                "kwargs": {**self.s.model_kwargs, "img_size": self.image_size, "num_classes": len(self.classes)}}
        save_artifact(self.build_model().eval(), teacher_dir, arch=arch, classes=self.classes, preprocess=preprocess,
                      extra={"role": "teacher", "note": "random weights for the throughput benchmark"})
        cfg = DistillConfig.from_dict({
            "name": "distill", **self.common(), "teacher": str(teacher_dir), "method": "distilvit",
            "keep_blocks": self.keep_blocks, "block_selection": "first",
        })
        distill(cfg)
        return cfg.run_dir

    def measure(self, mode: str) -> ThroughputRow:
        teacher_mode = mode == "teacher"
        name = "teacher" if teacher_mode else "distill"
        shutil.rmtree(self.out_dir / name, ignore_errors=True)  # a fresh run, not a resumed or versioned one
        self.log(f"{mode}: raw step (before)")
        raw_before = self.raw(teacher_mode)
        self.log(f"{mode}: raw {raw_before:.1f} img/s; skindistil run ({self.s.epochs} epochs)")
        run_dir = self.real_teacher() if teacher_mode else self.real_distill()
        real = json.loads((run_dir / "logs" / "throughput.json").read_text())["images_per_second"]
        self.log(f"{mode}: skindistil {real:.1f} img/s; raw step (after)")
        raw_after = self.raw(teacher_mode)
        label = _model_label(self.s.model_name, self.s.model_kwargs)
        if not teacher_mode:
            label += f" -> {self.keep_blocks} blocks"
        return ThroughputRow(
            mode=mode, model=label, device=device_label(self.device), precision=self.precision,
            batch_size=self.s.batch_size, raw_before=raw_before, raw_after=raw_after, skindistil=float(real),
            target=GPU_TARGET_RATIO if self.device.type == "cuda" else None, run_dir=str(run_dir),
        )


def run_comparison(settings: ComparisonSettings, log: Callable[[str], None] | None = None) -> list[ThroughputRow]:
    """Measure the raw step and the real training loop for each of `settings.modes`; one row each."""
    settings.validate()
    run = _ComparisonRun(settings, log or (lambda message: None))
    return [run.measure(mode) for mode in settings.modes]


# ------------------------------------------------------------------------------------------ reports

COLUMNS = ("mode", "model", "device", "precision", "batch", "raw img/s", "skindistil img/s", "ratio", "target")


def table_cells(row: ThroughputRow) -> list[str]:
    target = f">= {row.target:.2f}" if row.target is not None else "- (GPU only)"
    return [row.mode, row.model, row.device, row.precision, str(row.batch_size), f"{row.raw:.1f}",
            f"{row.skindistil:.1f}", f"{row.ratio:.3f}", target]


def markdown_table(rows: Sequence[ThroughputRow]) -> str:
    return render_table(COLUMNS, [table_cells(row) for row in rows]) + "\n"


def rich_table(rows: Sequence[ThroughputRow]):
    from rich.table import Table

    table = Table(title="Training throughput: skindistil vs the raw train step")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column not in ("mode", "model", "device") else "left")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


def write_results(rows: Sequence[ThroughputRow], settings: ComparisonSettings, out_dir: str | Path) -> dict[str, Path]:
    """train_throughput.json (settings, machine, rows) and train_throughput.md (the table) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "format": RESULT_FORMAT,
        "settings": asdict(settings),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": [row.to_dict() for row in rows],
    }
    files = {"json": out_dir / "train_throughput.json", "markdown": out_dir / "train_throughput.md"}
    write_json(files["json"], result)
    write_text(files["markdown"], markdown_table(rows))
    return files
