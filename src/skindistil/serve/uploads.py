"""Uploads: reading, limiting and checking an uploaded image before it can reach the model.

Bad input is refused with a 4xx `ApiError` that names the upload: a body over its path's limit
(`BodyLimit`, counted while it is read, for every endpoint) or slower than the body timeout (408), a
file part whose declared type is not an image (`read_upload`), an empty file, a file over
`UploadLimits.max_upload_bytes`, more than `max_pixels` pixels (read from the header, before
decoding), a side under `min_side` pixels or an aspect ratio over `max_aspect` (`check_dimensions`),
and anything that does not decode as an image (`decode_upload`). A batch therefore only holds images
the model takes.

Decoding memory is bounded by a budget (`skindistil.serve.guard.MemoryBudget`) from which each
upload reserves its `decode_cost`, estimated from the image header without decoding.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import UploadFile
from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skindistil.data.imageio import image_size, read_image
from skindistil.errors import ImageError
from skindistil.serve.errors import ApiError, error_response
from skindistil.serve.guard import GuardStats

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
# Declared content types of the file part that are accepted (besides none and image/*).
GENERIC_PART_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be: file bytes, decoded pixels, shortest side, longest/shortest side."""

    max_upload_bytes: int
    max_pixels: int = SERVE_MAX_PIXELS
    min_side: int = MIN_SIDE
    max_aspect: float = MAX_ASPECT


def check_dimensions(width: int, height: int, name: str, limits: UploadLimits) -> None:
    """ApiError unless a width x height image (pixels) is within `limits`: 413 image_too_large over
    `max_pixels`, 422 bad_dimensions for a side under `min_side` or an aspect over `max_aspect`;
    the message starts with `name`."""
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
    """The uploaded bytes as an RGB PIL image (H x W x 3, uint8), or ApiError (4xx) saying why they
    cannot be used: 400 empty_file, 413 file_too_large, `check_dimensions`' errors, 400 invalid_image.

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
    """(bytes, name) of the uploaded file part, the name cut to 120 characters ("upload" without one);
    415 unsupported_media_type for a declared type other than image/* or `GENERIC_PART_TYPES`, 413
    file_too_large over `limits.max_upload_bytes`.

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


def decode_cost(fileobj, size: int, limits: UploadLimits) -> int:
    """Bytes decoding an upload may take at its peak: its size plus `DECODE_BYTES_PER_PIXEL` per pixel,
    read from the image header in the spooled file (no decoding; at most `limits.max_pixels`, which
    is refused anyway; 0 pixels for a header that does not parse: the decoder refuses it at once).
    `size` (bytes) counts up to `limits.max_upload_bytes`; the file is left at position 0."""
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
    """The most one accepted upload can reserve, bytes."""
    return limits.max_upload_bytes + DECODE_BYTES_PER_PIXEL * limits.max_pixels


class BodyLimit:
    """ASGI middleware: 413 JSON for a request body over its path's limit, counted while it is read,
    and 408 JSON (the connection then closed) for one still incomplete `timeout_s` after the request
    started (a slow client holding a connection; counted in `stats.body_timeouts`).

    limits: path -> most body bytes; default: for the other paths. A declared Content-Length over
    the limit is refused before anything is read; a body without one (chunked) fails as soon as the
    bytes read pass the limit. (Starlette's own limiter answers in plain text, and this API answers
    every error in JSON.)
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
            await error_response(413, "payload_too_large", too_large)(scope, receive, send)
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
