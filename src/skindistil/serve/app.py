"""The REST API and web page that serve one model artifact.

    POST /v1/predict   multipart upload (field "file") -> class probabilities, top class, decisions at the
                       stored operating point(s), model, latency
    POST /v1/explain   multipart upload -> PNG: the model's view of the image beside its attention overlay
    GET  /v1/model     classes, preprocessing, metrics.json, model card, serving limits
    GET  /v1/stats     micro-batching counters: batches, mean batch size, ...
    GET  /health       200 while the model worker runs, else 503
    GET  /             the web page (static/index.html); /openapi.json and /docs (Swagger UI, its
                       scripts served from this server by fastapi-offline, no CDN) describe the API

Every error is JSON, {"error": {"code": ..., "message": ...}}. Bad input is rejected before it
reaches the model, with a 4xx: a body over the limit (counted while it is read, for every endpoint),
a request that is not multipart/form-data or lacks the `file` field, an empty file, a file over
`max_upload_mb`, a part whose declared type is not an image, anything that does not decode as an
image, more than `max_pixels` pixels (checked from the header, before decoding), a side under
`MIN_SIDE` pixels or an aspect ratio over `MAX_ASPECT`. A batch therefore only holds images the
model takes; a 5xx means a fault of the server (503: overloaded or not running, 500: a bug).

Decoding and preprocessing run per request in a thread pool; the model runs on micro-batches of
requests (`skindistil.serve.batching`). Explanations run on a private copy of the network, because
attention rollout switches the attention modules to their unfused path and hooks them.

No client can starve the server (`ServerLimits`): connections beyond `max_connections` are answered
503, request headers must arrive within `header_timeout_s` (`skindistil.serve.guard`), a body within
`body_timeout_s` (else 408), and uploads are read into memory and decoded only while their
estimated decoding memory fits in `decode_memory_mb` (`decode_cost`; the others wait, first come
first served, as Starlette's spooled temporary files), so decoding memory stays within that budget
at any load. /v1/stats counts every refusal and cut-off.
"""

# No `from __future__ import annotations`: FastAPI reads endpoint annotations at run time, and the
# class choice of /v1/explain is a Literal of the model's classes built inside create_app.
import asyncio
import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skindistil.data.imageio import image_size, read_image
from skindistil.devices import usable_cores
from skindistil.errors import ConfigError, ImageError, ModelError
from skindistil.evaluation.operating_points import decide
from skindistil.files import file_sha256, jsonable
from skindistil.inference.backends import warmup_batch_sizes
from skindistil.inference.explain import METHODS, check_method, explain_png, explainable, methods_for
from skindistil.inference.predictor import Predictor, select_operating_points
from skindistil.models.artifact import CARD_FILE, WEIGHTS_FILE, LoadedModel, load_model, model_card
from skindistil.serve.batching import MicroBatcher, NotRunning, Overloaded
from skindistil.serve.guard import GuardStats, MemoryBudget, ServerLimits
from skindistil.version import __version__

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
# 40 megapixels: well above the largest ISIC image (6000x4000 = 24 MP); a decoded RGB image of this
# size takes 120 MB, so a few concurrent uploads cannot exhaust a server's memory.
SERVE_MAX_PIXELS = 40_000_000
# An image must be at least this many pixels on each side and at most this elongated: below that,
# resizing the shorter side to the model's input would blow a sliver up into an enormous image.
MIN_SIDE = 8
MAX_ASPECT = 10.0
# Peak memory of decoding and preprocessing one upload, per pixel of the image: measured at 30-36
# bytes on 19-40 MP noisy JPEGs with and without a dark border (Pillow's RGB image, the array copy,
# the border search's grey level, mask and labels, the float resize), rounded up.
DECODE_BYTES_PER_PIXEL = 40
# Default budget for decoding memory: one upload of the default limits (20 MiB, 40 MP: 1.5 GiB) at a
# time, or many ordinary ones (a 1024 x 768 photo costs 30 MiB).
DECODE_MEMORY_MB = 2048.0
# Multipart framing around the file (boundaries, part headers) on top of max_upload_mb.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Endpoints that take no upload accept at most this much body.
SMALL_BODY_BYTES = 64 * 1024
# Explanations waiting or running at once; more are refused with 503 (each one is a full forward
# and backward pass plus a matplotlib rendering).
MAX_PENDING_EXPLAINS = 8
# Declared content types of the file part that are accepted (besides none and image/*).
GENERIC_PART_TYPES = ("application/octet-stream",)
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# PyTorch's intra-op threads for the model, read before any decoding thread lowers the process-wide
# default (see ModelService.start).
MODEL_THREADS = torch.get_num_threads()
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


# ------------------------------------------------------------------------------------------ schemas


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_image, payload_too_large")
    message: str = Field(description="what is wrong, for a person")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    name: str = Field(description="the run's name (the artifact's folder)")
    version: str = Field(description="sha256 of the weight file (first 12 hex digits)")
    role: str | None = Field(description="teacher, student, ... as recorded at training")


class Latency(BaseModel):
    preprocess: float = Field(description="decoding and preprocessing, ms")
    queue: float = Field(description="waiting for the batch to start, ms")
    model: float = Field(description="the batch's model call, ms")
    total: float = Field(description="from the parsed request to the response, ms")


class Decision(BaseModel):
    name: str = Field(description="operating point, e.g. cancer@sens95: view @ target and level chosen on validation")
    view: Literal["cancer", "melanoma"]
    positive_classes: list[str] = Field(description="the classes whose probabilities the score sums")
    target: Literal["sensitivity", "specificity"]
    level: float = Field(description="the sensitivity or specificity the threshold reached on validation")
    threshold: float
    score: float = Field(description="summed probability of the positive classes")
    positive: bool = Field(description="score >= threshold")


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    top_class: str
    top_probability: float
    probabilities: dict[str, float] = Field(description="class -> probability, in the model's class order")
    operating_points: list[Decision] = Field(
        description="the decision at each operating point the server reports (empty when the model stores none)")
    batch_size: int = Field(description="number of requests in the model call that answered this one")
    latency_ms: Latency


class ServingConfig(BaseModel):
    backend: str
    device: str
    tta: bool
    max_batch: int
    max_wait_ms: float
    max_upload_bytes: int
    max_pixels: int
    min_side: int
    max_aspect: float
    warmup_batch_sizes: list[int] = Field(description="batch sizes the model ran at start-up, before any request")
    max_connections: int = Field(description="connections served at once; requests on more are answered 503")
    header_timeout_s: float = Field(description="seconds a request's line and headers may take")
    body_timeout_s: float = Field(description="seconds a request's body may take, after its headers (else 408)")
    decode_memory_mb: float = Field(
        description="budget for the uploads being decoded, MiB; each reserves its file size + "
        f"{DECODE_BYTES_PER_PIXEL} bytes per pixel"
    )
    operating_points: list[str] = Field(description="the stored operating points /v1/predict reports")


class ModelResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: ModelRef
    kind: str
    architecture: dict[str, Any]
    num_parameters: int | None
    classes: list[str]
    preprocess: dict[str, Any]
    calibration: dict[str, Any] | None
    operating_points: dict[str, Any] | None = Field(description="the artifact's stored operating points")
    metrics: dict[str, Any] = Field(description="the artifact's metrics.json")
    model_card: str = Field(description="the artifact's model_card.md (Markdown)")
    serving: ServingConfig


class StatsResponse(BaseModel):
    requests: int = Field(description="predictions answered by the model worker")
    batches: int = Field(description="model calls")
    mean_batch_size: float = Field(description="requests / batches")
    max_batch_size: int
    failed_batches: int
    rejected: int = Field(description="requests refused because the queue was full")
    queue_depth: int = Field(description="requests waiting now")
    max_batch: int
    max_wait_ms: float
    decodes_waiting: int = Field(description="uploads waiting for decoding memory now")
    connections_open: int = Field(description="connections held now (0 under a server other than skindistil's)")
    connections_peak: int
    connections_refused: int = Field(description="requests answered 503 because max_connections were held")
    header_timeouts: int = Field(description="connections closed because their request headers were too slow")
    headers_too_large: int = Field(description="connections closed because their request headers were too long")
    body_timeouts: int = Field(description="requests answered 408 because their body was too slow")


class HealthResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok", "unavailable"]
    model: ModelRef
    uptime_s: float


def _errors(*statuses: int) -> dict:
    reasons = {
        400: "the upload is not a usable image (empty, not an image, truncated, corrupt)",
        408: "the request body did not arrive within the server's body timeout",
        413: "the request body, the file or the image's pixel count is over the limit",
        415: "the request is not multipart/form-data, or the file part is not an image",
        422: "the file field is missing, the image's dimensions are out of range, or a parameter is invalid",
        501: "the model cannot be explained (neither a CNN for Grad-CAM nor a ViT that classifies its class token)",
        503: "the server is overloaded or shutting down; retry later",
    }
    return {s: {"model": ErrorResponse, "description": reasons[s]} for s in statuses}


# ------------------------------------------------------------------------------------------- errors


class ApiError(HTTPException):
    """An HTTP error with a stable `code`, rendered as {"error": {"code", "message"}}."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code


def _error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = exc.code if isinstance(exc, ApiError) else HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    return _error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if any(e["loc"][:1] == ("body",) for e in errors) and not content_type.startswith("multipart/form-data"):
        return _error_response(
            415,
            "unsupported_media_type",
            "send the image as multipart/form-data in the field 'file' "
            + (f"(got content type {content_type!r})" if content_type else "(the request has no content type)"),
        )
    if any(tuple(e["loc"]) == ("body", "file") for e in errors):
        return _error_response(422, "missing_file", "no file in the form field 'file': upload the image as 'file'")
    details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return _error_response(422, "invalid_request", details)


async def _model_error(request: Request, exc: ModelError) -> JSONResponse:
    # the model, not the request, is at fault (e.g. non-finite probabilities): never a number
    log.error("model error on %s %s: %s", request.method, request.url.path, exc)
    return _error_response(500, "model_error", str(exc))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(500, "internal_error", "internal server error (logged on the server)")


class BodyLimit:
    """ASGI middleware: 413 JSON for a request body over its path's limit, counted while it is read,
    and 408 JSON (the connection then closed) for one still incomplete `timeout_s` after the request
    started (a slow client holding a connection; counted in `stats.body_timeouts`).

    A declared Content-Length over the limit is refused before anything is read; a body without one
    (chunked) fails as soon as the bytes read pass the limit. (Starlette's own limiter answers in plain
    text, and this API answers every error in JSON.)
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int, timeout_s: float, stats: GuardStats):
        self.app = app
        self.limits = limits
        self.default = default
        self.timeout_s = timeout_s
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        too_large = f"request body too large: {scope['path']} accepts at most {limit:,} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _error_response(413, "payload_too_large", too_large)(scope, receive, send)
            return
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                self.stats.body_timeouts += 1
                raise ApiError(
                    408, "request_timeout",
                    f"the request body did not arrive within {self.timeout_s:g} s ({received:,} bytes received)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException: FastAPI passes it from the body parser to the error handlers
                    raise ApiError(413, "payload_too_large", too_large)
            return message

        await self.app(scope, limited_receive, send)


# -------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be: file bytes, decoded pixels, shortest side, longest/shortest side."""

    max_upload_bytes: int
    max_pixels: int = SERVE_MAX_PIXELS
    min_side: int = MIN_SIDE
    max_aspect: float = MAX_ASPECT


def check_dimensions(width: int, height: int, name: str, limits: UploadLimits) -> None:
    """ApiError unless a width x height image is within `limits` (pixels: 413, shape: 422)."""
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{limits.max_pixels:,} (possible decompression bomb)",
        )
    if min(width, height) < limits.min_side:
        raise ApiError(
            422,
            "bad_dimensions",
            f"{name}: image is {width}x{height} pixels; each side must be at least {limits.min_side} pixels",
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise ApiError(
            422,
            "bad_dimensions",
            f"{name}: image is {width}x{height} pixels, an aspect ratio of {aspect:.1f}:1; "
            f"at most {limits.max_aspect:g}:1 is accepted",
        )


def decode_upload(data: bytes, name: str, limits: UploadLimits) -> Image.Image:
    """The uploaded bytes as an RGB image, or ApiError (4xx) saying why they cannot be used.

    The dimensions are checked from the header first, so a decompression bomb is never decoded.
    """
    if not data:
        raise ApiError(400, "empty_file", f"{name}: the uploaded file is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(
            413, "file_too_large", f"{name}: {len(data):,} bytes, over the limit of {limits.max_upload_bytes:,}"
        )
    size = image_size(data)
    if size is not None:
        check_dimensions(*size, name, limits)
    try:
        return read_image(data, max_pixels=limits.max_pixels, name=name)
    except ImageError as exc:
        raise ApiError(400, "invalid_image", str(exc)) from None


async def read_upload(file: UploadFile, limits: UploadLimits) -> tuple[bytes, str]:
    """(bytes, name) of the uploaded file part; 415 for a declared non-image type, 413 when too big.

    The request body was already counted against the body limit while it was parsed, so at most
    max_upload_bytes plus the multipart framing is ever read.
    """
    name = (file.filename or "upload")[:120]
    declared = (file.content_type or "").split(";")[0].strip().lower()
    if declared and not declared.startswith("image/") and declared not in GENERIC_PART_TYPES:
        raise ApiError(415, "unsupported_media_type", f"{name}: declared as {declared!r}; upload an image file")
    if file.size is not None and file.size > limits.max_upload_bytes:
        raise ApiError(
            413, "file_too_large", f"{name}: {file.size:,} bytes, over the limit of {limits.max_upload_bytes:,}"
        )
    return await file.read(), name


# ------------------------------------------------------------------------------------------ service


def decode_cost(fileobj, size: int, limits: UploadLimits) -> int:
    """Bytes decoding an upload may take at its peak: its size plus `DECODE_BYTES_PER_PIXEL` per pixel,
    read from the image header in the spooled file (no decoding; at most `limits.max_pixels`, which
    is refused anyway; 0 pixels for a header that does not parse: the decoder refuses it at once)."""
    try:
        fileobj.seek(0)
        with Image.open(fileobj) as img:
            pixels = img.size[0] * img.size[1]
    except Exception:  # not an image: decode_upload reports it
        pixels = 0
    finally:
        fileobj.seek(0)
    return min(size, limits.max_upload_bytes) + DECODE_BYTES_PER_PIXEL * min(pixels, limits.max_pixels)


def largest_decode_cost(limits: UploadLimits) -> int:
    """The most one accepted upload can reserve."""
    return limits.max_upload_bytes + DECODE_BYTES_PER_PIXEL * limits.max_pixels


def weights_version(model_dir: Path | None) -> str:
    """First 12 hex digits of the sha256 of model_dir/model.safetensors ("unversioned" without one)."""
    path = model_dir / WEIGHTS_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return "unversioned"
    return file_sha256(path)[:12]


def model_ref(loaded: LoadedModel) -> dict:
    """{"name", "version", "role"}: runs/<name>/model is called <name>; other folders by their own name."""
    path = loaded.path
    if path is None:
        name = loaded.architecture["name"]
    else:
        name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return {"name": name, "version": weights_version(path), "role": loaded.config.get("provenance", {}).get("role")}


def _one_intra_op_thread() -> None:
    """Make the calling thread run PyTorch ops on one thread (other threads keep their own setting)."""
    # get first: a thread's first PyTorch call resets its thread count to the process default, which
    # would undo a set_num_threads made before it
    torch.get_num_threads()
    torch.set_num_threads(1)


class ModelService:
    """Everything behind the endpoints: upload checks, the decode pool, the batcher, explanations."""

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
        await self.batcher.stop()
        for pool in (self._decode_pool, self._explain_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._decode_pool = self._explain_pool = None
        self.started_at = None

    @property
    def healthy(self) -> bool:
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


# ---------------------------------------------------------------------------------------------- app


def create_app(
    model: LoadedModel | str | Path,
    backend: str = "torch",
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
    max_pixels: int = SERVE_MAX_PIXELS,
    *,
    device: str = "cpu",
    tta: bool = False,
    workers: int | None = None,
    max_queue: int = 1024,
    max_connections: int = ServerLimits.max_connections,
    header_timeout_s: float = ServerLimits.header_timeout_s,
    body_timeout_s: float = ServerLimits.body_timeout_s,
    decode_memory_mb: float = DECODE_MEMORY_MB,
    operating_point: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (a LoadedModel, or an artifact path loaded onto `device`).

    backend: "torch" or a name of `skindistil.inference.backends.BACKENDS` (e.g. "onnx").
    max_batch / max_wait_ms: micro-batching (max_batch=1 turns it off). max_upload_mb: file limit in
    MiB. max_pixels: decoded-pixel limit. tta: flip test-time augmentation. workers: decoding threads
    (default: CPU count, at most 8). max_queue: requests waiting for the model before 503s.
    max_connections, header_timeout_s: enforced by the server (`skindistil.serve.server.server_config`
    reads them from app.state.server_limits). body_timeout_s: seconds a request body may take.
    decode_memory_mb: budget, MiB, for the uploads being decoded (see `decode_cost`); it must hold
    the largest accepted upload (`largest_decode_cost`).
    operating_point: the stored operating point(s) /v1/predict reports decisions at (a name, "all" or
    "none"; default: the artifact's default point when it stores any; see `select_operating_points`).
    The app's lifespan starts and stops the batcher: use it under a server or `with TestClient(app)`.
    A model error at start-up (e.g. non-finite probabilities in the warm-up) stops the start and is
    kept in app.state.startup_error. Raises ModelError for an artifact that cannot be loaded.
    """
    if max_connections < 1:
        raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
    if not (header_timeout_s > 0 and body_timeout_s > 0):
        raise ConfigError(f"timeouts must be positive, got header {header_timeout_s} s and body {body_timeout_s} s")
    if max_upload_mb <= 0:
        raise ConfigError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if max_pixels <= 0:
        raise ConfigError(f"max_pixels must be positive, got {max_pixels}")
    if max_batch < 1 or max_wait_ms < 0:
        raise ConfigError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    limits = UploadLimits(int(max_upload_mb * 2**20), int(max_pixels))
    if largest_decode_cost(limits) > decode_memory_mb * 2**20:
        raise ConfigError(
            f"decode memory {decode_memory_mb:g} MiB cannot hold one upload of {max_upload_mb:g} MiB and "
            f"{max_pixels:,} pixels ({largest_decode_cost(limits) / 2**20:,.0f} MiB at {DECODE_BYTES_PER_PIXEL} "
            "bytes per pixel): raise the decode memory or lower the pixel limit"
        )
    server_limits = ServerLimits(max_connections, header_timeout_s, body_timeout_s)
    service = ModelService(
        loaded,
        backend=backend,
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        limits=limits,
        tta=tta,
        workers=workers,
        max_queue=max_queue,
        server_limits=server_limits,
        decode_memory_mb=decode_memory_mb,
        operating_point=operating_point,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await service.start()
        except Exception as exc:
            app.state.startup_error = f"{type(exc).__name__}: {exc}"
            await service.stop()
            raise
        try:
            yield
        finally:
            await service.stop()

    # FastAPIOffline: FastAPI with /docs served from the package's own copy of Swagger UI (mounted at
    # /static-offline-docs) instead of a CDN, so it works offline. No /redoc: ReDoc's bundle still
    # fetches its logo from a CDN.
    app = FastAPIOffline(
        redoc_url=None,
        title="skindistil",
        version=__version__,
        summary=f"Skin-lesion classifier {service.ref['name']} ({len(loaded.classes)} classes)",
        description="Research tool, not a diagnostic device. Upload a dermoscopic image to /v1/predict "
        "(class probabilities) or /v1/explain (attention overlay).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.server_limits = server_limits
    app.state.guard_stats = service.guard_stats
    app.state.startup_error = None
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ModelError, _model_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
    upload_body = limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        BodyLimit,
        limits={"/v1/predict": upload_body, "/v1/explain": upload_body},
        default=SMALL_BODY_BYTES,
        timeout_s=body_timeout_s,
        stats=service.guard_stats,
    )
    upload_field = File(description="the image: JPEG, PNG, BMP, TIFF or WebP")
    class_choice = Literal[tuple(loaded.classes)]

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_errors(400, 408, 413, 415, 422, 503),
        summary="Class probabilities for one image",
    )
    async def predict(file: Annotated[UploadFile, upload_field]) -> dict:
        return await service.predict(file)

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "PNG: the model's view of the image | its explanation overlay. Headers "
                "X-Top-Class and X-Top-Probability carry the prediction.",
            },
            **_errors(400, 408, 413, 415, 422, 501, 503),
        },
        summary="Explanation overlay for one image (attention rollout or Grad-CAM)",
    )
    async def explain(
        file: Annotated[UploadFile, upload_field],
        method: Annotated[
            Literal[METHODS] | None,
            Query(description="rollout (class-agnostic) or grad-rollout for a ViT, gradcam for a CNN (default: "
                  "rollout for a ViT, gradcam for a CNN); a method of the other architecture is answered 422"),
        ] = None,
        class_name: Annotated[
            class_choice | None,
            Query(alias="class", description="class grad-rollout or gradcam explains (default: the top one)"),
        ] = None,
    ) -> Response:
        png, top_class, probability = await service.explain(file, method, class_name)
        headers = {"X-Top-Class": top_class, "X-Top-Probability": f"{probability:.6f}", "Cache-Control": "no-store"}
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/v1/model", response_model=ModelResponse, summary="The model: classes, preprocessing, metrics, card")
    async def model_info() -> dict:
        return service.model_document()

    @app.get("/v1/stats", response_model=StatsResponse, summary="Micro-batching counters")
    async def stats() -> dict:
        return service.stats_document()

    @app.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "the model worker is not running"}},
        summary="Liveness",
    )
    async def health() -> JSONResponse:
        ok = service.healthy
        uptime = time.monotonic() - service.started_at if service.started_at is not None else 0.0
        body = {"status": "ok" if ok else "unavailable", "model": service.ref, "uptime_s": uptime}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_SECURITY_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
