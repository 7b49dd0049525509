"""The API's error envelope and exception handlers: every error is JSON, {"error": {"code", "message"}}.

`ApiError` is an HTTPException that carries a stable `code`; `error_response` writes the envelope
(documented in OpenAPI by `skindistil.serve.schemas.ErrorResponse`); `add_error_handlers` maps every
exception an endpoint can raise onto it:

    HTTPException (ApiError too)  its status; code: the ApiError's, else `HTTP_ERROR_CODES[status]`
    RequestValidationError        415 unsupported_media_type (a body that is not multipart/form-data),
                                  422 missing_file (no `file` field), else 422 invalid_request
    skindistil.errors.ModelError  500 model_error: the model, not the request, is at fault
    any other exception           500 internal_error (logged; the answer names nothing internal)

A 4xx is the request's fault, a 5xx the server's (503: overloaded or not running, 500: a bug).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from skindistil.errors import ModelError

log = logging.getLogger(__name__)

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


class ApiError(HTTPException):
    """An HTTP error with a stable `code`, rendered as {"error": {"code", "message"}}."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The envelope {"error": {"code": code, "message": message}} as a JSON response with `status`
    and `headers`. It is itself an ASGI app, so middleware can answer with it before the app runs."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = exc.code if isinstance(exc, ApiError) else HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    content_type = request.headers.get("content-type", "")
    if any(e["loc"][:1] == ("body",) for e in errors) and not content_type.startswith("multipart/form-data"):
        return error_response(
            415,
            "unsupported_media_type",
            "send the image as multipart/form-data in the field 'file' "
            + (f"(got content type {content_type!r})" if content_type else "(the request has no content type)"),
        )
    if any(tuple(e["loc"]) == ("body", "file") for e in errors):
        return error_response(422, "missing_file", "no file in the form field 'file': upload the image as 'file'")
    details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return error_response(422, "invalid_request", details)


async def _model_error(request: Request, exc: ModelError) -> JSONResponse:
    # the model, not the request, is at fault (e.g. non-finite probabilities): never a number
    log.error("model error on %s %s: %s", request.method, request.url.path, exc)
    return error_response(500, "model_error", str(exc))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error (logged on the server)")


def add_error_handlers(app: FastAPI) -> None:
    """Install on `app` the handlers that answer every exception with the envelope (see above)."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ModelError, _model_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
