"""The API's schemas: pydantic models of every JSON answer, as /openapi.json and /docs describe them.

    ErrorResponse     the error envelope {"error": {"code", "message"}} (written by
                      `skindistil.serve.errors`); `error_responses` documents it per status
    PredictResponse   POST /v1/predict
    ModelResponse     GET /v1/model, with ServingConfig: the limits and settings the server runs with
    StatsResponse     GET /v1/stats
    HealthResponse    GET /health

The models carry no docstrings on purpose: pydantic would publish them as the schemas' descriptions.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skindistil.serve.uploads import DECODE_BYTES_PER_PIXEL


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


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for these HTTP statuses: each the error envelope, with what it means here."""
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
