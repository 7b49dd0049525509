"""Fuzzing the live server: generated requests and generated images never get a 5xx.

1. Schemathesis against the served OpenAPI schema, valid and invalid requests. Every response must
   also match the schema (documented status codes, content types and bodies, so every error is the
   documented {"error": {"code", "message"}}). The one check left out is "schema-valid requests are
   accepted": the schema says "binary file", and random bytes are rightly refused as not an image.
2. Hypothesis-generated images (every Pillow mode and format pair, sizes from 1 px, some truncated):
   a whole image is predicted exactly when its dimensions are within the limits.
"""

from __future__ import annotations

import io

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from skindistil.config import PreprocessConfig
from skindistil.data.vocab import ISIC2019
from skindistil.models import create_teacher, save_artifact
from skindistil.serve import create_app, serve_in_background
from skindistil.serve.uploads import MAX_ASPECT, MIN_SIDE

# (method, path, has inputs): operations without parameters or body have no invalid requests to make.
OPERATIONS = [
    ("POST", "/v1/predict", True),
    ("POST", "/v1/explain", True),
    ("GET", "/v1/model", False),
    ("GET", "/v1/stats", False),
    ("GET", "/health", False),
]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p, _ in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p, has_inputs in OPERATIONS if has_inputs
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    torch.manual_seed(0)
    model = create_teacher(
        "vit_base_patch16_224", num_classes=8, embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32
    )
    artifact = save_artifact(
        model,
        tmp_path_factory.mktemp("fuzz") / "model",
        classes=list(ISIC2019.names),
        preprocess=PreprocessConfig(image_size=32),
    )
    with serve_in_background(create_app(artifact, max_upload_mb=1)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


def test_schema_lists_every_operation(api_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == {(method, path) for method, path, _ in OPERATIONS}


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_generated_requests_get_documented_non_5xx_answers(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    def check(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()


# Pillow modes each format can write.
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "LA", "RGB", "RGBA", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["L", "P"],
}


@st.composite
def encoded_images(draw):
    """(bytes, width, height, truncated): a random-noise image in a random format and mode."""
    image_format = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[image_format]))
    width, height = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    seed = draw(st.integers(0, 255))
    noise = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    image = Image.fromarray(noise.numpy(), "RGB")
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    data = buffer.getvalue()
    cut = draw(st.none() | st.integers(1, len(data) - 1))
    return (data if cut is None else data[:cut]), width, height, cut is not None


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # truncated TIFFs: expected
def test_generated_images_are_predicted_or_refused_with_a_4xx(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as client:

        @given(encoded_images())
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        def check(sample):
            data, width, height, truncated = sample
            response = client.post("/v1/predict", files={"file": ("generated", data, "application/octet-stream")})
            assert response.status_code < 500, response.text
            fits = min(width, height) >= MIN_SIDE and max(width, height) / min(width, height) <= MAX_ASPECT
            if not truncated:
                assert response.status_code == (200 if fits else 422), (width, height, response.text)
            elif response.status_code != 200:
                assert response.json()["error"]["code"] in {"invalid_image", "bad_dimensions"}, response.text

        check()
        assert client.get("/v1/stats").json()["failed_batches"] == 0
