"""The model service: everything behind the endpoints, for one model artifact.

`ModelService` holds the loaded model and its `Predictor`, the micro-batcher that runs it
(`skindistil.serve.batching`), the pool of decoding threads, the decoding-memory budget and the
counters /v1/stats reports. It decides at start-up what /v1/explain can do with the model (501 with
the reason, or its methods) and which stored operating points /v1/predict reports, and runs the
backend's warm-up before the first request.

Decoding and preprocessing run per request in a thread pool, within the decoding budget
(`skindistil.serve.uploads.decode_cost`); the model runs on micro-batches of requests. Explanations
run one at a time on a private copy of the network, because attention rollout switches the
attention modules to their unfused path and hooks them. Failures are `ApiError`s: 4xx for the
upload, 503 when overloaded or not running, 501/422 for an explanation the model cannot give.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import UploadFile
from PIL import Image

from skindistil.devices import usable_cores
from skindistil.errors import ConfigError
from skindistil.evaluation.operating_points import decide
from skindistil.files import file_sha256, jsonable
from skindistil.inference.backends import warmup_batch_sizes
from skindistil.inference.explain import check_method, explain_png, explainable, methods_for
from skindistil.inference.predictor import Predictor, select_operating_points
from skindistil.models.artifact import CARD_FILE, WEIGHTS_FILE, LoadedModel, artifact_name, model_card
from skindistil.serve.batching import MicroBatcher, NotRunning, Overloaded
from skindistil.serve.errors import ApiError
from skindistil.serve.guard import GuardStats, MemoryBudget, ServerLimits
from skindistil.serve.schemas import ServingConfig
from skindistil.serve.uploads import UploadLimits, decode_cost, decode_upload, read_upload

log = logging.getLogger(__name__)

# Explanations waiting or running at once; more are refused with 503 (each one is a full forward
# and backward pass plus a matplotlib rendering).
MAX_PENDING_EXPLAINS = 8
# PyTorch's intra-op threads for the model, read before any decoding thread lowers the process-wide
# default (see ModelService.start).
MODEL_THREADS = torch.get_num_threads()


def weights_version(model_dir: Path | None) -> str:
    """First 12 hex digits of the sha256 of model_dir/model.safetensors ("unversioned" without one)."""
    path = model_dir / WEIGHTS_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return "unversioned"
    return file_sha256(path)[:12]


def model_ref(loaded: LoadedModel) -> dict:
    """{"name", "version", "role"}: runs/<name>/model is called <name>; other folders by their own name."""
    path = loaded.path
    name = loaded.architecture["name"] if path is None else artifact_name(path)
    return {"name": name, "version": weights_version(path), "role": loaded.config.get("provenance", {}).get("role")}


def _one_intra_op_thread() -> None:
    """Make the calling thread run PyTorch ops on one thread (other threads keep their own setting)."""
    # get first: a thread's first PyTorch call resets its thread count to the process default, which
    # would undo a set_num_threads made before it
    torch.get_num_threads()
    torch.set_num_threads(1)


class ModelService:
    """Everything behind the endpoints: upload checks, the decode pool, the batcher, explanations.

    Built from a loaded model and the serving settings (`skindistil.serve.app.create_app` documents
    them); `start` and `stop` run in the serving event loop (the app's lifespan). `serving` is the
    /v1/model settings document and `guard_stats` the connection counters the server fills in.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        backend: str,
        device: str,
        max_batch: int,
        max_wait_ms: float,
        limits: UploadLimits,
        tta: bool,
        workers: int | None,
        max_queue: int,
        server_limits: ServerLimits,
        decode_memory_mb: float,
        operating_point: str | None = None,
    ):
        self.loaded = loaded
        self.limits = limits
        # what /v1/explain can do with this model, decided once: why it cannot (501), else its methods
        self.explain_refusal = explainable(loaded.model)
        self.explain_methods = () if self.explain_refusal else methods_for(loaded.model)
        self.points, warning = select_operating_points(loaded, operating_point, tta=tta)
        if warning:
            log.warning(warning)
        self.predictor = Predictor(loaded, device=device, backend=backend, batch_size=max_batch, tta=tta)
        self.batcher = MicroBatcher(self._run_batch, max_batch, max_wait_ms, max_queue)
        self.workers = max(1, workers if workers is not None else min(8, usable_cores()))
        self.decode_memory = int(decode_memory_mb * 2**20)
        self.guard_stats = GuardStats()
        self.ref = model_ref(loaded)
        self.serving = ServingConfig(
            backend=self.predictor.backend,
            device=str(self.predictor.device),
            tta=tta,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_upload_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_pixels,
            min_side=limits.min_side,
            max_aspect=limits.max_aspect,
            warmup_batch_sizes=warmup_batch_sizes(self.predictor.backend, max_batch),
            max_connections=server_limits.max_connections,
            header_timeout_s=server_limits.header_timeout_s,
            body_timeout_s=server_limits.body_timeout_s,
            decode_memory_mb=decode_memory_mb,
            operating_points=list(self.points),
        )
        self.started_at: float | None = None
        self._budget: MemoryBudget | None = None
        self._explain_slot: asyncio.Semaphore | None = None
        self._decode_pool = None
        self._explain_pool = None
        self._explain_model: LoadedModel | None = None
        self._pending_explains = 0

    # --------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the decoding and explanation pools, warm the backend up for every batch size it
        compiles, then start the batcher. Model errors of the warm-up (e.g. ModelError for
        non-finite probabilities) propagate: the server must not start."""
        # One intra-op thread per decoding thread: the pool already preprocesses requests in parallel,
        # and splitting each small per-image op over every core oversubscribes the CPU the model needs
        # (measured on 2 busy cores: 3 ms per 224 px image with one thread, 25-60 ms with two).
        self._decode_pool = ThreadPoolExecutor(
            self.workers, thread_name_prefix="skindistil-decode", initializer=_one_intra_op_thread
        )
        # one explanation at a time: they share one copy of the network
        self._explain_pool = ThreadPoolExecutor(1, thread_name_prefix="skindistil-explain")
        # made here, in the loop that serves: they belong to it
        self._budget = MemoryBudget(self.decode_memory)
        self._explain_slot = asyncio.Semaphore(1)
        # before the first request: compiled backends build their graphs, the others set up kernels
        started = time.perf_counter()
        sizes = await asyncio.get_running_loop().run_in_executor(self._explain_pool, self._warm_up)
        log.info(
            "%s backend warmed up for batch sizes %s in %.1f s",
            self.predictor.backend, ", ".join(map(str, sizes)), time.perf_counter() - started,
        )
        await self.batcher.start()
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        """Stop the batcher (queued requests fail with NotRunning, a 503) and close the pools."""
        await self.batcher.stop()
        for pool in (self._decode_pool, self._explain_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._decode_pool = self._explain_pool = None
        self.started_at = None

    @property
    def healthy(self) -> bool:
        """True while the model worker runs (GET /health: 200, else 503)."""
        return self.batcher.running

    # ------------------------------------------------------------------------------------ work

    def _warm_up(self) -> list[int]:
        torch.set_num_threads(MODEL_THREADS)
        return self.predictor.warm_up(self.batcher.max_batch)

    def _run_batch(self, images: list[torch.Tensor]) -> np.ndarray:
        torch.set_num_threads(MODEL_THREADS)  # for this thread; the decoding threads lowered the default
        return self.predictor.probabilities(torch.stack(images))

    def _load_upload(self, data: bytes, name: str, preprocess: bool):
        """Decode (and preprocess) one upload in a pool thread; any failure is the upload's: a 4xx."""
        try:
            image = decode_upload(data, name, self.limits)
            # uint8: the batch is normalised at once, on the model's device (Predictor.probabilities)
            return self.loaded.prepare_image(image) if preprocess else image
        except ApiError:
            raise
        except Exception as exc:
            # a decoder or transform failing on these bytes (an exotic mode, a broken EXIF block) is a
            # property of the upload, never a reason for a 5xx
            log.warning("rejected upload %s", name, exc_info=True)
            raise ApiError(400, "invalid_image", f"{name}: cannot use this image ({type(exc).__name__}: {exc})") from None

    async def _in_pool(self, pool, fn, *args):
        if pool is None:
            raise ApiError(503, "unavailable", "the server is not running (starting up or shutting down)")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @asynccontextmanager
    async def decoding_memory(self, file: UploadFile):
        """Hold the upload's `decode_cost` of the decoding budget for the block (waiting for it first).

        Waiting uploads stay in Starlette's spooled temporary files: only those holding their share
        are read into memory and decoded."""
        if self._budget is None:
            raise ApiError(503, "unavailable", "the server is not running (starting up or shutting down)")
        cost = await self._in_pool(self._decode_pool, decode_cost, file.file, file.size or 0, self.limits)
        await self._budget.acquire(cost)
        try:
            yield
        finally:
            self._budget.release(cost)

    async def load_upload(self, file: UploadFile, preprocess: bool):
        """Read and decode (and preprocess) an upload within the decoding budget: (image, name).
        The upload's bytes are dropped on return; the prepared uint8 image is small."""
        async with self.decoding_memory(file):
            data, name = await read_upload(file, self.limits)
            return await self._in_pool(self._decode_pool, self._load_upload, data, name, preprocess), name

    async def predict(self, file: UploadFile) -> dict:
        """The /v1/predict document (`PredictResponse`) for one upload: probabilities in the model's
        class order (float64 summing to 1), top class, decisions, batch size, latencies in ms.
        ApiError: the upload's 4xx, 503 overloaded (queue full) or unavailable (not running)."""
        started = time.perf_counter()
        image, _ = await self.load_upload(file, preprocess=True)
        preprocessed = time.perf_counter()
        try:
            result = await self.batcher.submit(image)
        except Overloaded as exc:
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
        except NotRunning as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        probs = np.asarray(result.value, dtype=np.float64)
        top = int(probs.argmax())
        return {
            "model": self.ref,
            "top_class": self.loaded.classes[top],
            "top_probability": float(probs[top]),
            "probabilities": dict(zip(self.loaded.classes, map(float, probs), strict=True)),
            "operating_points": self.decisions(probs),
            "batch_size": result.batch_size,
            "latency_ms": {
                "preprocess": (preprocessed - started) * 1000,
                "queue": result.queue_ms,
                "model": result.model_ms,
                "total": (time.perf_counter() - started) * 1000,
            },
        }

    def decisions(self, probs: np.ndarray) -> list[dict]:
        """The decision at each reported operating point for one image's probabilities (C,)."""
        out = []
        for name, point in self.points.items():
            scores, positive = decide(probs[None], self.loaded.classes, point)
            out.append({"name": name, **{k: point[k] for k in ("view", "positive_classes", "target", "level", "threshold")},
                        "score": float(scores[0]), "positive": bool(positive[0])})
        return out

    def _explain(self, image: Image.Image, method: str, class_name: str | None) -> tuple[bytes, str, float]:
        torch.set_num_threads(MODEL_THREADS)
        if self._explain_model is None:
            self._explain_model = dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))
        return explain_png(self._explain_model, image, method=method, class_name=class_name)

    async def explain(self, file: UploadFile, method: str | None, class_name: str | None) -> tuple[bytes, str, float]:
        """(PNG bytes, top class, its probability) for one upload explained by `method` (default: the
        model's first) for `class_name` (default: the top class). ApiError: 501 for a model that
        cannot be explained, 422 for a method of the other architecture, the upload's 4xx, 503 when
        `MAX_PENDING_EXPLAINS` are running or waiting or the server is not running."""
        if self.explain_refusal is not None:
            raise ApiError(501, "not_supported", self.explain_refusal)
        method = method or self.explain_methods[0]
        if method not in self.explain_methods:
            try:
                check_method(self.loaded.model, method)  # raises, naming the methods that apply
            except ConfigError as exc:
                raise ApiError(422, "unsupported_method", str(exc)) from None
        if self._pending_explains >= MAX_PENDING_EXPLAINS:
            raise ApiError(
                503, "overloaded", f"{self._pending_explains} explanations are already running or waiting",
                headers={"Retry-After": "1"},
            )
        if self._explain_slot is None:
            raise ApiError(503, "unavailable", "the server is not running (starting up or shutting down)")
        self._pending_explains += 1
        try:
            # one explanation at a time holds its full-size image, within the decoding budget until it
            # is done; the waiting ones hold only their spooled upload
            async with self._explain_slot, self.decoding_memory(file):
                data, name = await read_upload(file, self.limits)
                image = await self._in_pool(self._decode_pool, self._load_upload, data, name, False)
                del data
                return await self._in_pool(self._explain_pool, self._explain, image, method, class_name)
        finally:
            self._pending_explains -= 1

    # ---------------------------------------------------------------------------------- reports

    def model_document(self) -> dict:
        """The /v1/model document (`ModelResponse`): the artifact's config, metrics, card, settings."""
        loaded = self.loaded
        card_path = loaded.path / CARD_FILE if loaded.path is not None else None
        card = card_path.read_text() if card_path is not None and card_path.is_file() else model_card(loaded.config, loaded.metrics)
        return {
            "model": self.ref,
            "kind": loaded.config.get("kind", "vit"),
            "architecture": jsonable(loaded.architecture),
            "num_parameters": loaded.config.get("num_parameters"),
            "classes": loaded.classes,
            "preprocess": loaded.preprocess.to_dict(),
            "calibration": jsonable(loaded.config.get("calibration")),
            "operating_points": jsonable(loaded.config.get("operating_points")),
            "metrics": jsonable(loaded.metrics),
            "model_card": card,
            "serving": self.serving,
        }

    def stats_document(self) -> dict:
        """The /v1/stats document (`StatsResponse`): batcher, decoding and connection counters."""
        stats = self.batcher.stats
        return {
            "requests": stats.requests,
            "batches": stats.batches,
            "mean_batch_size": stats.mean_batch_size,
            "max_batch_size": stats.max_batch_size,
            "failed_batches": stats.failed_batches,
            "rejected": stats.rejected,
            "queue_depth": self.batcher.queue_depth,
            "max_batch": self.batcher.max_batch,
            "max_wait_ms": self.batcher.max_wait_ms,
            "decodes_waiting": self._budget.waiting if self._budget is not None else 0,
            **self.guard_stats.to_dict(),
        }
