"""Stored teacher outputs: run the frozen teacher once over the planned epochs, then train students
without it (TinyViT's fast distillation, for skindistil's replayable augmentation).

A training sample's augmentation is a function of (seed, epoch, row) (`CachedImageDataset`), so the
teacher's output for it is too. `write_teacher_store` runs the teacher over every training row of every
planned epoch, augmented exactly as training will augment it, and keeps the outputs; a distillation run
given the store (`DistillConfig.teacher_store`) reads them by sample key (epoch * rows + row) instead
of running the teacher. Students of any depth, every variant of a loss ablation and the first member of
a cascade (later members distill from the previous member, not the teacher) reuse one store.

Layout of STORE/:

    store.json                 header: what the outputs depend on (`store_identity`: seed, teacher
                               weights, preprocessing, augmentation, training split), epochs planned and
                               written, contents (classes, hidden tokens), precision, sizes
    epoch-0000-logits.npy      float16 [rows, classes]: the teacher's logits (all classes) in epoch 0
    epoch-0000-hidden.npy      float16 [rows, T, width]: the teacher's last-block tokens before the final
                               norm (T = 1: the class token; T = all tokens), when stored

Every file is written to a temporary name and renamed; store.json records an epoch only once its
files are complete, so an interrupted store continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skindistil.config import DistillConfig
from skindistil.errors import ConfigError, ModelError
from skindistil.files import save_npy, write_json

STORE_FORMAT = 1
HEADER_FILE = "store.json"
HIDDEN_CHOICES = ("none", "cls", "all")
# What the outputs depend on; a store whose value of any of these differs from the run's is refused by name.
IDENTITY_FIELDS = {
    "seed": "seed (trainer.seed)",
    "teacher": "teacher (weights sha256)",
    "preprocess": "preprocessing",
    "augmentation": "augmentation",
    "dataset": "dataset (training split)",
}


def epoch_file(epoch: int, what: str) -> str:
    """File name of one epoch's outputs: what is "logits" or "hidden"."""
    return f"epoch-{epoch:04d}-{what}.npy"


def store_identity(cfg: DistillConfig, teacher, datamodule, student_preprocess) -> dict[str, Any]:
    """What a run's teacher outputs depend on, as plain JSON: seed, teacher weights (sha256 of its
    model.safetensors) and classes, preprocessing (the student's, which makes each augmented view, and
    the teacher's, which it sees that view through), augmentation (settings and where it runs) and the
    training split (`SkinDataModule.fingerprint`: rows, images, labels, fold)."""
    from skindistil.models.artifact import weights_sha256

    return {
        "seed": int(cfg.trainer.seed),
        "teacher": {"weights_sha256": weights_sha256(teacher.path), "classes": list(teacher.classes)},
        "preprocess": {"student": student_preprocess.to_dict(), "teacher": teacher.preprocess.to_dict()},
        "augmentation": {"augment_on": datamodule.augment_on, **dataclasses.asdict(datamodule.augment)},
        "dataset": {"train_fingerprint": datamodule.fingerprint("train"), "fold": datamodule.fold,
                    "rows": len(datamodule.labels("train"))},
    }


def identity_mismatches(recorded: dict, expected: dict) -> list[str]:
    """One line per identity field whose stored value differs from the run's, naming the field and
    the sub-fields that differ (values shown for short ones)."""
    problems = []
    for field, label in IDENTITY_FIELDS.items():
        old, new = recorded.get(field), expected.get(field)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            old, new = _flatten(old), _flatten(new)
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = "; ".join(f"{k}: store {_short(old.get(k))}, run {_short(new.get(k))}" for k in keys)
        else:
            detail = f"store {_short(old)}, run {_short(new)}"
        problems.append(f"{label} differs ({detail})")
    return problems


def _flatten(values: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys ({"student": {"mean": m}} -> {"student.mean": m})."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:12] + "..."


def needed_hidden(method: str, a_cos: float, cos_tokens: str) -> str:
    """The hidden tokens a distillation needs from the teacher: "none" without the cosine term,
    else `cos_tokens` ("cls" or "all"). Methods without a teacher term need nothing."""
    if method not in ("distilvit", "full", "cascade") or not a_cos:
        return "none"
    return cos_tokens


def _check_supported(cfg: DistillConfig, where: str) -> None:
    if cfg.data.augment_on != "cpu":
        raise ConfigError(
            f"{where}: data.augment_on={cfg.data.augment_on!r} draws each batch's augmentation from the global "
            "random stream, which no later run replays; stored teacher outputs need data.augment_on=cpu "
            "(augmentation seeded per (seed, epoch, sample))"
        )


# ------------------------------------------------------------------------------------------- writing


def _autocast(device: torch.device, precision: str):
    """The teacher's forward precision under `precision` (Lightning's names), as Lightning would run it."""
    if precision in ("32-true", "32", "64-true", "64"):
        return contextlib.nullcontext()
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"trainer.precision: {precision!r} is not supported for a teacher store "
                          f"(use 32-true, bf16-mixed or 16-mixed)")
    return torch.autocast(device.type, dtype=dtypes[precision])


def write_teacher_store(cfg: DistillConfig, out_dir: str | Path, *, hidden: str | None = None,
                        device: str | None = None, progress: bool = False) -> Path:
    """Run the teacher `cfg.teacher` over `cfg.trainer.max_epochs` epochs of the training split of
    `cfg.data.dir`, augmented as a distillation run with this config augments it, and store its outputs
    under `out_dir` (see the module docstring). Returns `out_dir`.

    hidden: "none", "cls" or "all" tokens of the last block (default: what cfg.loss needs, see
    `needed_hidden`; "cls" also serves loss.cos_tokens=cls, "all" serves both). device: default cuda when
    available and trainer.accelerator allows it, else cpu. Precision: trainer.precision (auto: bf16-mixed
    on a GPU, 32-true on the CPU), as the online teacher would run. An existing `out_dir` of the same
    identity continues (epochs already written are kept); one of another identity is refused by name.
    Raises ConfigError (unsupported settings, mismatched store), ModelError/DataError (teacher, data).
    """
    from skindistil.data.sampling import EpochSampler
    from skindistil.data.transforms import reprocess
    from skindistil.distill.start import student_start
    from skindistil.models import load_model
    from skindistil.models.distilled import without_distillation_token
    from skindistil.models.multi_exit import vit_logits_and_hidden
    from skindistil.training.teacher import build_datamodule
    from skindistil.training.trainer import resolve_precision

    out_dir = Path(out_dir)
    if not cfg.teacher:
        raise ConfigError("teacher: give the teacher's model/ or run directory (--teacher DIR)")
    _check_supported(cfg, str(out_dir))
    hidden = hidden or needed_hidden("distilvit", cfg.loss.a_cos, cfg.loss.cos_tokens)
    if hidden not in HIDDEN_CHOICES:
        raise ConfigError(f"hidden: {hidden!r} is not one of {', '.join(HIDDEN_CHOICES)}")
    epochs = int(cfg.trainer.max_epochs)
    if epochs < 1:
        raise ConfigError(f"trainer.max_epochs: {epochs}; a store needs at least one epoch")
    if device is None:
        gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
        device = "cuda" if gpu else "cpu"
    device = torch.device(device)
    precision = resolve_precision(cfg.trainer.precision, "gpu" if device.type == "cuda" else "cpu")

    teacher = load_model(cfg.teacher, device=device)
    if hidden != "none" and not isinstance(getattr(teacher.model, "blocks", None), torch.nn.Sequential):
        raise ModelError(f"{teacher.path}: hidden states are stored for timm ViT teachers (with blocks); this is "
                         f"a {type(teacher.model).__name__}: store its logits only (--hidden none)")
    # the views are the student's (its preprocessing and augmentation); the teacher sees them through its own
    student_preprocess = student_start(cfg, teacher).preprocess
    datamodule = build_datamodule(cfg, student_preprocess)
    datamodule.setup("fit")
    if datamodule.vocab.to_list() != teacher.classes:
        raise ConfigError(f"data.dir: the dataset's classes {datamodule.vocab.to_list()} differ from the "
                          f"teacher's {teacher.classes}")
    identity = store_identity(cfg, teacher, datamodule, student_preprocess)
    header = {
        "format": STORE_FORMAT,
        **identity,
        "epochs": epochs,
        "epochs_written": 0,
        "hidden": hidden,
        "num_classes": len(teacher.classes),
        "precision": precision,
        "teacher_path": str(teacher.path),
        "data_dir": str(cfg.data.dir),
        "bytes": 0,
    }
    header_path = out_dir / HEADER_FILE
    if header_path.is_file():
        recorded = read_header(out_dir)
        problems = identity_mismatches(recorded, identity)
        if problems or recorded.get("hidden") != hidden:
            if recorded.get("hidden") != hidden:
                problems.append(f"hidden tokens differ (store {recorded.get('hidden')}, run {hidden})")
            raise ConfigError(f"{out_dir}: holds a teacher store of another run: {'; '.join(problems)}; "
                              "write this one to another --out")
        header["epochs_written"] = int(recorded.get("epochs_written", 0))
        header["epochs"] = max(epochs, int(recorded.get("epochs", 0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(header_path, header)

    dataset = datamodule.dataset("train", train=True)
    rows = len(dataset)
    model = teacher.model.eval()
    for epoch in range(header["epochs_written"], epochs):
        sampler = EpochSampler(rows, seed=datamodule.seed, tag_epoch=True)  # natural order: row i at position i
        sampler.set_epoch(epoch)
        loader = datamodule.loader(dataset, datamodule.eval_batch_size, sampler=sampler)
        logits_out = hidden_out = None
        start = 0
        with torch.inference_mode():
            for images, _ in _maybe_progress(loader, progress, f"teacher store: epoch {epoch + 1}/{epochs}"):
                views = reprocess(images.to(device, non_blocking=True), student_preprocess, teacher.preprocess)
                with _autocast(device, precision):
                    if hidden == "none":
                        logits, tokens = model(views), None
                    else:
                        logits, tokens = vit_logits_and_hidden(model, views)
                        tokens = without_distillation_token(model, tokens)
                if logits_out is None:
                    logits_out = np.empty((rows, logits.shape[1]), dtype=np.float16)
                    if hidden != "none":
                        count = 1 if hidden == "cls" else tokens.shape[1]
                        hidden_out = np.empty((rows, count, tokens.shape[2]), dtype=np.float16)
                stop = start + len(images)
                logits_out[start:stop] = logits.float().cpu().numpy()
                if hidden_out is not None:
                    kept = tokens[:, :1] if hidden == "cls" else tokens
                    hidden_out[start:stop] = kept.float().cpu().numpy()
                start = stop
        save_npy(out_dir / epoch_file(epoch, "logits"), logits_out)
        if hidden_out is not None:
            save_npy(out_dir / epoch_file(epoch, "hidden"), hidden_out)
        header["epochs_written"] = epoch + 1
        header["bytes"] = store_bytes(out_dir)
        write_json(header_path, header)
    header["bytes"] = store_bytes(out_dir)
    write_json(header_path, header)
    return out_dir


def _maybe_progress(loader, progress: bool, description: str):
    if not progress:
        return loader
    from rich.progress import track

    return track(loader, description=description, total=len(loader))


def store_bytes(store_dir: str | Path) -> int:
    """Bytes of the stored outputs (all epoch files) under `store_dir`."""
    return sum(p.stat().st_size for p in Path(store_dir).glob("epoch-*.npy"))


# ------------------------------------------------------------------------------------------- reading


def read_header(store_dir: str | Path) -> dict:
    """store.json of a store directory; ConfigError naming the path when missing, unreadable or of
    another format."""
    path = Path(store_dir) / HEADER_FILE
    if not path.is_file():
        raise ConfigError(f"{store_dir}: not a teacher store (no {HEADER_FILE}); write one with "
                          "`skindistil store-teacher`")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable teacher store header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != STORE_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ConfigError(f"{path}: unsupported teacher store format {found!r} (expected {STORE_FORMAT})")
    return header


class TeacherStore:
    """Read access to a store checked against a run: `outputs(keys)` gives the teacher's outputs for
    the training samples named by `keys` (epoch * rows + row, as `SkinDataModule(train_keys=True)`
    yields them). Epoch files are memory-mapped on first use."""

    def __init__(self, store_dir: str | Path, header: dict, needs_hidden: str = "none"):
        self.path = Path(store_dir)
        self.header = header
        self.rows = int(header["dataset"]["rows"])
        self.needs_hidden = needs_hidden
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @classmethod
    def open(cls, store_dir: str | Path, identity: dict, *, epochs: int, hidden: str = "none") -> TeacherStore:
        """Open `store_dir` for a run of `identity` (`store_identity`) training `epochs` epochs that needs
        `hidden` tokens ("none", "cls", "all"). ConfigError naming every field that differs (seed,
        teacher, preprocessing, augmentation, dataset), missing epochs or missing hidden states."""
        header = read_header(store_dir)
        problems = identity_mismatches(header, identity)
        if problems:
            raise ConfigError(f"teacher store {store_dir} was made for another run: {'; '.join(problems)}")
        written = int(header.get("epochs_written", 0))
        if written < epochs:
            raise ConfigError(f"teacher store {store_dir}: holds {written} complete epoch(s), the run trains {epochs} "
                              f"(write the store with --epochs {epochs} or more; an interrupted one continues)")
        stored = header.get("hidden", "none")
        if hidden != "none" and not (stored == hidden or stored == "all"):
            raise ConfigError(f"teacher store {store_dir}: the loss needs the teacher's hidden states ({hidden} tokens, "
                              f"loss.a_cos > 0) but the store holds {stored!r}; write it with --hidden {hidden}")
        return cls(store_dir, header, hidden)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}  # memory maps are reopened in each process

    def _array(self, epoch: int, what: str) -> np.ndarray:
        key = (epoch, what)
        if key not in self._maps:
            path = self.path / epoch_file(epoch, what)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: missing or unreadable teacher store file ({exc})") from None
            if array.shape[0] != self.rows or array.dtype != np.float16:
                raise ConfigError(f"{path}: holds {array.dtype} {array.shape}, expected float16 with {self.rows} rows")
            self._maps[key] = array
        return self._maps[key]

    def outputs(self, keys: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits float32 [B, C] and, when the run needs them, hidden tokens float32 [B, T, E]
        (else None) for sample keys [B] (int), in the keys' order, on `device`."""
        keys = keys.detach().cpu().numpy().astype(np.int64)
        epochs, rows = np.divmod(keys, self.rows)
        logits = np.empty((len(keys), self.header["num_classes"]), dtype=np.float16)
        hidden = None
        for epoch in np.unique(epochs):
            at = epochs == epoch
            # memmap fancy indexing reads the rows it needs; sorted rows read the file in order
            logits[at] = self._array(int(epoch), "logits")[rows[at]]
            if self.needs_hidden != "none":
                tokens = self._array(int(epoch), "hidden")[rows[at]]
                tokens = tokens[:, :1] if self.needs_hidden == "cls" else tokens
                if hidden is None:
                    hidden = np.empty((len(keys), *tokens.shape[1:]), dtype=np.float16)
                hidden[at] = tokens
        to = {"device": device, "dtype": torch.float32, "non_blocking": True}
        return (torch.from_numpy(logits).to(**to),
                None if hidden is None else torch.from_numpy(hidden).to(**to))


def bytes_per_thousand_images_epoch(header: dict, bytes_total: int | None = None) -> float:
    """Store size per 1,000 images per epoch (bytes), from a header (its recorded size by default)."""
    total = header.get("bytes", 0) if bytes_total is None else bytes_total
    images = int(header["dataset"]["rows"]) * int(header.get("epochs_written", 0))
    return 1000.0 * total / images if images else math.nan
