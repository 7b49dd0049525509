"""Batched prediction over image files, PIL images or arrays, with optional flip TTA.

Preprocessing is the artifact's own eval policy (`LoadedModel.preprocess_images`: black-border crop
when the model was trained with it, shorter side to `resize_size`, centre crop, normalise), so a
prediction here equals `skindistil.load_model(path).predict(images)`.

Test-time augmentation (TTA) averages the class probabilities of four views of each preprocessed
image: identity, horizontal flip, vertical flip, and both flips (a 180 degree rotation). Dermoscopic
images have no canonical orientation, so these views are all equally valid photographs of the
lesion. The set is closed under flips, so the TTA prediction is invariant to flipping the model's
input, and to flipping the photograph itself whenever the centre crop is symmetric (even margins).

Decoding and preprocessing run in a thread pool (Pillow and PyTorch release the GIL) one batch ahead
of the model, which runs batched under `torch.inference_mode` (or onnxruntime).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skindistil.data.imageio import as_image_list
from skindistil.data.records import Problem
from skindistil.devices import usable_cores
from skindistil.errors import ConfigError, ImageError, SkinDistilError
from skindistil.files import write_csv, write_json
from skindistil.models.artifact import LoadedModel, load_model

# TTA views as the image axes to flip: identity, horizontal, vertical, both (see the module docstring).
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
# `backend="torch"` is the plain PyTorch module in fp32 (the registry's "eager").
BACKEND_ALIASES = {"torch": "eager"}


# ------------------------------------------------------------------------------------------- result


def select_operating_points(loaded: LoadedModel, choice: str | None = None, *, tta: bool = False
                            ) -> tuple[dict[str, dict], str | None]:
    """The stored operating points whose decisions predict and serve report, as {name: point}.

    choice None: the artifact's default point when it stores any (none, with a warning, under TTA);
    "none": no point; "all": every stored point; else the point of that name. Returns (points,
    warning or None). Raises ConfigError when an asked-for point is not stored, or is asked for with
    TTA: thresholds are chosen on single-view probabilities, which TTA changes.
    """
    stored = loaded.operating_points
    if choice == "none" or (choice is None and stored is None):
        return {}, None
    if choice is None and tta:
        return {}, ("no operating-point decision: the thresholds were chosen without TTA; "
                    "predict without --tta to report them")
    where = loaded.path or "this model"
    if stored is None:
        raise ConfigError(f"--operating-point {choice}: {where} stores no operating points; choose them with "
                          "`skindistil evaluate --model MODEL --data DATA_DIR --operating-point`")
    if tta:
        raise ConfigError(f"--operating-point {choice}: the thresholds were chosen without TTA; drop --tta")
    names = list(stored.points) if choice == "all" else [choice or stored.default]
    unknown = [n for n in names if n not in stored.points]
    if unknown:
        raise ConfigError(f"--operating-point {choice}: not stored in {where} "
                          f"(stored: {', '.join(stored.points)}; or all, none)")
    return {n: {**stored.points[n].model_dump(), "fitted_on": stored.fitted_on} for n in names}, None


@dataclass
class PredictionResult:
    """Predictions for a list of files: ids (file stems), their paths, probabilities [N, C] in
    `classes` order, the inputs that could not be predicted (`errors`, with reasons), and the
    files input discovery did not take (`skipped`, with reasons; see `skindistil.data.discovery`), and the
    operating points to report decisions at ({name: point}, `select_operating_points`)."""

    ids: list[str]
    probs: np.ndarray
    errors: list[Problem] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    operating_points: dict[str, dict] = field(default_factory=dict)

    def decisions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{point name: (scores (N,) float64, positive (N,) bool)} at each of `operating_points`."""
        from skindistil.evaluation.operating_points import decide

        return {name: decide(self.probs, self.classes, point) for name, point in self.operating_points.items()}

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the `k` most probable (class, probability) pairs, most probable first."""
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [
            [(self.classes[c], float(row[c])) for c in cols]
            for row, cols in zip(self.probs, order, strict=True)
        ]


def decisions_csv_path(out: str | Path) -> Path:
    """The sidecar of operating-point decisions for predictions file `out`: FILE.csv -> FILE.decisions.csv
    (the predictions CSV itself keeps the ISIC format, which the official scorer checks column by column)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.decisions.csv")


def errors_csv_path(out: str | Path) -> Path:
    """The sidecar listing unreadable inputs for predictions file `out`: FILE.csv -> FILE.errors.csv."""
    out = Path(out)
    return out.with_name(f"{out.stem}.errors.csv")


def write_errors_csv(path: str | Path, errors: Sequence[Problem]) -> Path:
    """Write `where,reason` rows."""
    path = Path(path)
    return write_csv(path, pd.DataFrame([e.to_dict() for e in errors], columns=["where", "reason"]))


def write_predictions(
    result: PredictionResult, out: str | Path, *, top_k: int = 3, meta: dict | None = None
) -> list[Path]:
    """Write `result` to `out` (.csv or .json); returns the files written.

    .csv: ISIC challenge format (`image` = file stem, one probability column per class in the
    artifact's order) plus, only when some input was not predicted, the sidecar FILE.errors.csv
    (`where,reason`: errors, then files not taken; a stale one from an earlier run is removed) and, with
    operating points, FILE.decisions.csv (`image`, then per point `<name>_score` and `<name>`: 1 positive,
    0 negative). .json: {"classes", "predictions": [{"image", "path", "top_k": [{"class", "prob"}],
    "probs": {class: prob}, "decisions": {name: {"score", "threshold", "positive"}}}], "operating_points":
    {name: point}, "errors" and "skipped": [{"where", "reason"}], **meta}.
    """
    from skindistil.evaluation.report import write_predictions_csv

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"{out}: the output file must end in .csv or .json")
    out.parent.mkdir(parents=True, exist_ok=True)
    decisions = result.decisions()
    if suffix == ".csv":
        write_predictions_csv(out, result.ids, result.probs, result.classes)
        written = [out]
        sidecar, unpredicted = errors_csv_path(out), [*result.errors, *result.skipped]
        if unpredicted:
            written.append(write_errors_csv(sidecar, unpredicted))
        else:
            sidecar.unlink(missing_ok=True)  # an earlier run's failures must not read as this run's
        if decisions:
            table = pd.DataFrame({"image": result.ids})
            for name, (scores, positive) in decisions.items():
                table[f"{name}_score"] = scores
                table[name] = positive.astype(int)
            write_csv(decisions_csv_path(out), table)
            written.append(decisions_csv_path(out))
        else:
            decisions_csv_path(out).unlink(missing_ok=True)
        return written
    thresholds = {name: point["threshold"] for name, point in result.operating_points.items()}
    predictions = [
        {
            "image": image_id,
            "path": path,
            "top_k": [{"class": name, "prob": prob} for name, prob in top],
            "probs": dict(zip(result.classes, map(float, row), strict=True)),
            **({"decisions": {name: {"score": float(scores[i]), "threshold": thresholds[name],
                                     "positive": bool(positive[i])}
                              for name, (scores, positive) in decisions.items()}} if decisions else {}),
        }
        for i, (image_id, path, row, top) in enumerate(zip(
            result.ids, result.paths, result.probs, result.top_k(top_k), strict=True
        ))
    ]
    document = {
        **(meta or {}),
        "classes": result.classes,
        "num_predicted": len(result.ids),
        "num_errors": len(result.errors),
        "num_skipped": len(result.skipped),
        **({"operating_points": result.operating_points} if decisions else {}),
        "predictions": predictions,
        "errors": [e.to_dict() for e in result.errors],
        "skipped": [e.to_dict() for e in result.skipped],
    }
    write_json(out, document)
    return [out]


# ---------------------------------------------------------------------------------------- predictor


def tta_probabilities(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean softmax(logits / temperature) over the `TTA_FLIPS` views of a preprocessed batch
    [B, 3, H, W] -> [B, C]. The views go through `logits_fn` as one batch of 4B images.
    """
    views = torch.cat([images.flip(dims) if dims else images for dims in TTA_FLIPS])
    probs = (torch.as_tensor(logits_fn(views)).float() / temperature).softmax(dim=-1)
    return probs.reshape(len(TTA_FLIPS), len(images), -1).mean(dim=0)


class Predictor:
    """Class probabilities for raw images from a model artifact.

    model: a LoadedModel or an artifact path (model/ or run directory).
    backend: "torch" (PyTorch fp32, = "eager") or any name of `skindistil.inference.backends.BACKENDS`
    ("onnx", "onnx-int8", "bf16", "compile", "bf16-compile", "fast"); the ONNX ones export the model first.
    tta: average over flips (see the module docstring). workers: decoding threads (default: the CPU
    count, at most 8). threads: onnxruntime intra-op threads.
    """

    def __init__(
        self,
        model: LoadedModel | str | Path,
        device: str | torch.device = "cpu",
        backend: str = "torch",
        batch_size: int = 32,
        tta: bool = False,
        workers: int | None = None,
        threads: int | None = None,
    ):
        from skindistil.inference.backends import BACKENDS, build_backend, check_backends

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.device = torch.device(device)
        (self.backend,) = check_backends([BACKEND_ALIASES.get(backend, backend)])
        self.batch_size = int(batch_size)
        self.tta = bool(tta)
        self.workers = max(1, workers if workers is not None else min(8, usable_cores()))
        self._logits = build_backend(self.backend, self.loaded, self.device, threads=threads)
        # PyTorch backends take the batch on the model's device; onnxruntime takes host memory.
        self._batch_device = self.device if BACKENDS[self.backend].runtime == "torch" else torch.device("cpu")

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    def warm_up(self, max_batch: int | None = None) -> list[int]:
        """Run the model once at each batch size `warmup_batch_sizes` names for batches up to max_batch
        (default: batch_size), so that no later call pays for compilation or kernel set-up. Returns
        those sizes (TTA then runs 4x as many views per call, which are powers of two as well)."""
        from skindistil.inference.backends import warmup_batch_sizes

        sizes = warmup_batch_sizes(self.backend, max_batch or self.batch_size)
        size = self.loaded.preprocess.image_size
        for batch in sizes:
            self.probabilities(torch.zeros(batch, 3, size, size, dtype=torch.uint8))
        return sizes

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities [B, C] (float32) for a preprocessed batch [B, 3, S, S]: float32 model input,
        or uint8 from `LoadedModel.prepare_image`, normalised here on the model's device (a quarter of
        the bytes to move, one vectorised operation for the batch). ModelError if any is not finite."""
        images = images.to(self._batch_device)
        if images.dtype == torch.uint8:
            images = self.loaded.normalize(images)
        # the artifact's calibration temperature (1.0 when uncalibrated), as LoadedModel.predict applies it
        if self.tta:
            probs = self.loaded.require_finite(tta_probabilities(self._logits, images, self.loaded.temperature))
        else:
            probs = self.loaded.probabilities(torch.as_tensor(self._logits(images)))
        return probs.cpu().numpy()

    def predict(self, images) -> np.ndarray:
        """Probabilities [N, C] for raw images, in input order: one image or a sequence of them (paths,
        PIL images of any mode, arrays; see `LoadedModel.predict`).

        Raises ImageError (naming the input) if any image cannot be read.
        """
        images = as_image_list(images)
        out = []
        for _, batch, problems in self._batches(images, [_describe(img, i) for i, img in enumerate(images)]):
            if problems:
                raise ImageError(problems[0].where, problems[0].reason)
            out.append(batch)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict_files(
        self, paths: Iterable[str | Path], on_progress: Callable[[int, int], None] | None = None
    ) -> PredictionResult:
        """Predict image files, listing the unreadable ones in `errors` instead of failing.

        on_progress(done, total) is called after every batch.
        """
        paths = [Path(p) for p in paths]
        ids, rows, kept, errors = [], [], [], []
        done = 0
        for positions, probs, problems in self._batches(paths, [str(p) for p in paths]):
            rows.append(probs)
            ids.extend(paths[i].stem for i in positions)
            kept.extend(str(paths[i]) for i in positions)
            errors.extend(problems)
            done += len(positions) + len(problems)
            if on_progress is not None:
                on_progress(done, len(paths))
        probs = np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)
        return PredictionResult(ids, probs, errors, list(self.classes), kept)

    def _prepare(self, image, where: str) -> torch.Tensor | Problem:
        try:
            return self.loaded.prepare_image(image, where)
        except ImageError as exc:
            return Problem(exc.where, exc.reason)
        except (SkinDistilError, OSError) as exc:  # e.g. an unsupported input type, a permission error
            return Problem(where, str(exc))

    def _batches(
        self, items: Sequence, names: Sequence[str]
    ) -> Iterator[tuple[list[int], np.ndarray, list[Problem]]]:
        """Yield (input positions, probabilities, problems) per chunk of `batch_size` inputs, in order.

        The thread pool preprocesses chunk k + 1 while the model runs on chunk k.
        """
        starts = range(0, len(items), self.batch_size)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="skindistil-decode") as pool:

            def submit(start: int) -> list:
                stop = min(start + self.batch_size, len(items))
                return [pool.submit(self._prepare, items[i], names[i]) for i in range(start, stop)]

            pending = submit(0) if items else []
            for start in starts:
                prepared = [f.result() for f in pending]
                if start + self.batch_size < len(items):
                    pending = submit(start + self.batch_size)
                positions = [start + j for j, x in enumerate(prepared) if isinstance(x, torch.Tensor)]
                problems = [x for x in prepared if isinstance(x, Problem)]
                if positions:
                    probs = self.probabilities(torch.stack([prepared[i - start] for i in positions]))
                else:
                    probs = np.zeros((0, len(self.classes)), dtype=np.float32)
                yield positions, probs, problems


def _describe(image, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image {index} ({type(image).__name__})"
