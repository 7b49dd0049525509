"""`skindistil.serve.uploads` on its own: the checks an upload passes before it can reach the model,
on real HAM10000 images (re-encoded, cropped, cut short) rather than through the HTTP stack."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers, UploadFile

from skindistil.serve.errors import ApiError
from skindistil.serve.uploads import (
    DECODE_BYTES_PER_PIXEL,
    UploadLimits,
    decode_cost,
    decode_upload,
    largest_decode_cost,
    read_upload,
)

WIDTH, HEIGHT = 200, 150  # every HAM10000 image of the shared data


@pytest.fixture(scope="module")
def jpeg(ham_root) -> bytes:
    return sorted((ham_root / "images").glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def lesion(jpeg) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.size == (WIDTH, HEIGHT)
        return img.convert("RGB")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def refusal(data: bytes, name: str, limits: UploadLimits) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_upload(data, name, limits)
    return info.value


def test_decode_cost_is_the_size_plus_the_header_pixels_and_rewinds(jpeg, lesion):
    limits = UploadLimits(max_upload_bytes=2**20)
    png = encode(lesion)
    for data in (jpeg, png):
        spooled = io.BytesIO(data)
        spooled.seek(len(data) // 2)  # wherever the reader left it
        assert decode_cost(spooled, len(data), limits) == len(data) + DECODE_BYTES_PER_PIXEL * WIDTH * HEIGHT
        assert spooled.tell() == 0
    # the pixels come from the header alone: a PNG cut after its header costs the same pixels
    head = png[:64]
    assert decode_cost(io.BytesIO(head), len(head), limits) == len(head) + DECODE_BYTES_PER_PIXEL * WIDTH * HEIGHT
    # bytes that are no image cost their size only (the decoder refuses them at once)
    text = b"lesion_id,image_id,dx\n" * 50
    assert decode_cost(io.BytesIO(text), len(text), limits) == len(text)
    # both terms are capped at what could ever be accepted
    small = UploadLimits(max_upload_bytes=1000, max_pixels=10_000)
    assert decode_cost(io.BytesIO(png), len(png), small) == 1000 + DECODE_BYTES_PER_PIXEL * 10_000
    assert largest_decode_cost(small) == 1000 + DECODE_BYTES_PER_PIXEL * 10_000


def test_a_real_image_decodes_to_the_same_rgb_pixels_in_any_format(jpeg, lesion):
    limits = UploadLimits(max_upload_bytes=2**20)
    from_jpeg = decode_upload(jpeg, "lesion.jpg", limits)
    assert from_jpeg.mode == "RGB" and from_jpeg.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(from_jpeg), np.asarray(lesion))
    # PNG is lossless: the same pixels as the JPEG decoded
    np.testing.assert_array_equal(np.asarray(decode_upload(encode(lesion), "lesion.png", limits)), np.asarray(lesion))
    grey = lesion.convert("L")
    as_rgb = np.asarray(decode_upload(encode(grey), "grey.png", limits))
    assert as_rgb.shape == (HEIGHT, WIDTH, 3)
    for channel in range(3):
        np.testing.assert_array_equal(as_rgb[..., channel], np.asarray(grey))


def test_real_crops_are_refused_at_exactly_the_side_and_aspect_limits(lesion):
    limits = UploadLimits(max_upload_bytes=2**20)  # min_side 8, max_aspect 10:1
    for width in (15, 150):  # 10.0:1 is accepted, and so is a square
        crop = lesion.crop((0, 0, width, HEIGHT))
        assert decode_upload(encode(crop), "crop.png", limits).size == (width, HEIGHT)
    error = refusal(encode(lesion.crop((0, 0, 14, HEIGHT))), "sliver.png", limits)
    assert (error.status_code, error.code) == (422, "bad_dimensions")
    assert error.detail == "sliver.png: image is 14x150 pixels, an aspect ratio of 10.7:1; at most 10:1 is accepted"
    square = UploadLimits(max_upload_bytes=2**20, max_aspect=100.0)
    assert decode_upload(encode(lesion.crop((0, 0, 8, HEIGHT))), "crop.png", square).size == (8, HEIGHT)
    error = refusal(encode(lesion.crop((0, 0, 7, HEIGHT))), "thin.png", square)
    assert (error.status_code, error.code) == (422, "bad_dimensions")
    assert error.detail == "thin.png: image is 7x150 pixels; each side must be at least 8 pixels"


def test_pixel_and_file_limits_hold_to_the_byte(jpeg):
    exact = UploadLimits(max_upload_bytes=len(jpeg), max_pixels=WIDTH * HEIGHT)
    assert decode_upload(jpeg, "lesion.jpg", exact).size == (WIDTH, HEIGHT)
    error = refusal(jpeg, "lesion.jpg", UploadLimits(max_upload_bytes=len(jpeg), max_pixels=WIDTH * HEIGHT - 1))
    assert (error.status_code, error.code) == (413, "image_too_large")
    assert "lesion.jpg: image is 200x150 = 30,000 pixels, over the limit of 29,999" in error.detail
    error = refusal(jpeg, "lesion.jpg", UploadLimits(max_upload_bytes=len(jpeg) - 1))
    assert (error.status_code, error.code) == (413, "file_too_large")
    assert error.detail == f"lesion.jpg: {len(jpeg):,} bytes, over the limit of {len(jpeg) - 1:,}"


def test_empty_and_cut_short_uploads_are_400_naming_the_file(jpeg):
    limits = UploadLimits(max_upload_bytes=2**20)
    error = refusal(b"", "empty.jpg", limits)
    assert (error.status_code, error.code, error.detail) == (400, "empty_file", "empty.jpg: the uploaded file is empty (0 bytes)")
    error = refusal(jpeg[: len(jpeg) // 2], "half.jpg", limits)
    assert (error.status_code, error.code) == (400, "invalid_image")
    assert error.detail.startswith("half.jpg: ")


def upload_file(data: bytes, filename: str | None, content_type: str | None) -> UploadFile:
    headers = Headers({"content-type": content_type}) if content_type else Headers({})
    return UploadFile(io.BytesIO(data), size=len(data), filename=filename, headers=headers)


def test_read_upload_checks_the_declared_type_and_size(jpeg):
    limits = UploadLimits(max_upload_bytes=len(jpeg))
    accepted = [("lesion.jpg", "image/jpeg"), ("lesion.jpg", "IMAGE/JPEG; q=1"), ("lesion", "application/octet-stream"),
                ("lesion.jpg", None), (None, "image/png")]
    for filename, content_type in accepted:
        data, name = asyncio.run(read_upload(upload_file(jpeg, filename, content_type), limits))
        assert data == jpeg and name == (filename or "upload")
    _, name = asyncio.run(read_upload(upload_file(jpeg, "x" * 300 + ".jpg", "image/jpeg"), limits))
    assert name == "x" * 120
    with pytest.raises(ApiError) as info:
        asyncio.run(read_upload(upload_file(jpeg, "notes.txt", "text/plain; charset=utf-8"), limits))
    assert (info.value.status_code, info.value.code) == (415, "unsupported_media_type")
    assert info.value.detail == "notes.txt: declared as 'text/plain'; upload an image file"
    with pytest.raises(ApiError) as info:
        asyncio.run(read_upload(upload_file(jpeg, "lesion.jpg", "image/jpeg"), UploadLimits(len(jpeg) - 1)))
    assert (info.value.status_code, info.value.code) == (413, "file_too_large")
    assert info.value.detail.startswith(f"lesion.jpg: {len(jpeg):,} bytes, over the limit of ")
