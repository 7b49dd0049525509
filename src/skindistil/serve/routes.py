"""The API's endpoints and web page, each thin: parse the request, call the `ModelService`, answer.

    POST /v1/predict   multipart upload (field "file") -> class probabilities, top class, decisions at the
                       stored operating point(s), model, latency
    POST /v1/explain   multipart upload -> PNG: the model's view of the image beside its attention overlay
    GET  /v1/model     classes, preprocessing, metrics.json, model card, serving limits
    GET  /v1/stats     micro-batching counters: batches, mean batch size, ...
    GET  /health       200 while the model worker runs, else 503
    GET  /             the web page (static/index.html, its assets under /static)

The answers' schemas are in `skindistil.serve.schemas`, the errors' envelope in `skindistil.serve.errors`.
"""

# No `from __future__ import annotations`: FastAPI reads endpoint annotations at run time, and the
# class choice of /v1/explain is a Literal of the model's classes built inside add_routes.
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from skindistil.inference.explain import METHODS
from skindistil.serve.schemas import (
    HealthResponse,
    ModelResponse,
    PredictResponse,
    StatsResponse,
    error_responses,
)
from skindistil.serve.service import ModelService

STATIC_DIR = Path(__file__).with_name("static")
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def add_routes(app: FastAPI, service: ModelService) -> None:
    """Add the endpoints above to `app`, answered by `service`, and mount the page's assets at /static."""
    upload_field = File(description="the image: JPEG, PNG, BMP, TIFF or WebP")
    class_choice = Literal[tuple(service.loaded.classes)]

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=error_responses(400, 408, 413, 415, 422, 503),
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
            **error_responses(400, 408, 413, 415, 422, 501, 503),
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
