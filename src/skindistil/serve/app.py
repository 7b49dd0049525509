"""The FastAPI app serving one model artifact: `create_app` assembles the package's parts.

    service.py   ModelService: the model, its predictor and micro-batcher, decoding, explanations
    routes.py    the endpoints and the web page; schemas.py their answers' pydantic models
    uploads.py   what an upload may be (body, file, pixels, decoding memory) and `BodyLimit`
    errors.py    the JSON error envelope and the exception handlers

No client can starve the server (`ServerLimits`): connections beyond `max_connections` are answered
503, request headers must arrive within `header_timeout_s` (`skindistil.serve.guard`), a body within
`body_timeout_s` (else 408), and uploads are read into memory and decoded only while their
estimated decoding memory fits in `decode_memory_mb` (`decode_cost`; the others wait, first come
first served, as Starlette's spooled temporary files), so decoding memory stays within that budget
at any load. /v1/stats counts every refusal and cut-off.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from skindistil.errors import ConfigError
from skindistil.models.artifact import LoadedModel, load_model
from skindistil.serve.errors import add_error_handlers
from skindistil.serve.guard import ServerLimits
from skindistil.serve.routes import add_routes
from skindistil.serve.service import ModelService
from skindistil.serve.uploads import (
    DECODE_BYTES_PER_PIXEL,
    DECODE_MEMORY_MB,
    MULTIPART_OVERHEAD_BYTES,
    SERVE_MAX_PIXELS,
    SMALL_BODY_BYTES,
    BodyLimit,
    UploadLimits,
    largest_decode_cost,
)
from skindistil.version import __version__


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
    add_error_handlers(app)
    upload_body = limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        BodyLimit,
        limits={"/v1/predict": upload_body, "/v1/explain": upload_body},
        default=SMALL_BODY_BYTES,
        timeout_s=body_timeout_s,
        stats=service.guard_stats,
    )
    add_routes(app, service)
    return app
