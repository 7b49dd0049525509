"""`skindistil serve`: every endpoint, every kind of bad input, micro-batching, the batcher, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import serving_artifact
from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.data.vocab import ISIC2019
from skindistil.models import load_model
from skindistil.serve import MicroBatcher, create_app
from skindistil.serve.batching import NotRunning, Overloaded

CLASSES = list(ISIC2019.names)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return serving_artifact(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def images(ham_root):
    return sorted((ham_root / "images").glob("*.jpg"))[:12]


@pytest.fixture(scope="module")
def reference(artifact):
    """The unbatched prediction: the artifact loaded on its own, one image per call."""
    loaded = load_model(artifact)
    return lambda image: loaded.predict([image])[0]


@pytest.fixture(scope="module")
def client(artifact):
    with TestClient(create_app(artifact, max_upload_mb=0.25)) as client:
        yield client


def upload(data: bytes, name: str = "lesion.jpg", content_type: str | None = "image/jpeg") -> dict:
    return {"file": (name, data, content_type) if content_type else (name, data)}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, followed by one tiny compressed row."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")


def assert_error(response: httpx.Response, status: int, code: str, *needles: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle in body["error"]["message"], body
    return body["error"]["message"]


# ------------------------------------------------------------------------------------------ endpoints


def test_predict_a_real_image(client, artifact, images, reference):
    response = client.post("/v1/predict", files=upload(images[0].read_bytes(), images[0].name))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "top_class", "top_probability", "probabilities", "operating_points", "batch_size",
                         "latency_ms"}
    assert body["operating_points"] == []  # the artifact stores none
    # the version is the start of the weights file's sha256 (computed here, not by the code under test)
    version = hashlib.sha256((artifact / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert body["model"] == {"name": "lesions", "version": version, "role": "student"}
    assert list(body["probabilities"]) == CLASSES
    probs = np.array(list(body["probabilities"].values()))
    np.testing.assert_allclose(probs, reference(images[0]), atol=1e-5)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5) and probs.max() > 0.3
    assert body["top_class"] == CLASSES[int(probs.argmax())]
    assert body["top_probability"] == pytest.approx(probs.max())
    latency = body["latency_ms"]
    assert set(latency) == {"preprocess", "queue", "model", "total"}
    assert 0 < latency["model"] <= latency["total"] and body["batch_size"] >= 1
    # the declared part type does not matter as long as it is generic or an image type
    for content_type in (None, "application/octet-stream", "image/png"):
        again = client.post("/v1/predict", files=upload(images[0].read_bytes(), content_type=content_type))
        assert again.json()["probabilities"] == body["probabilities"]


def test_explain_returns_an_overlay_png(client, images):
    data = images[1].read_bytes()
    predicted = client.post("/v1/predict", files=upload(data)).json()
    response = client.post("/v1/explain", files=upload(data))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.format == "PNG" and overlay.width > overlay.height > 100  # image | overlay, side by side
    assert response.headers["x-top-class"] == predicted["top_class"]
    assert float(response.headers["x-top-probability"]) == pytest.approx(predicted["top_probability"], abs=1e-5)

    graded = client.post("/v1/explain", params={"method": "grad-rollout", "class": "DF"}, files=upload(data))
    assert graded.status_code == 200 and graded.content != response.content
    assert_error(client.post("/v1/explain", params={"class": "XYZ"}, files=upload(data)), 422, "invalid_request", "class")
    assert_error(
        client.post("/v1/explain", params={"method": "saliency"}, files=upload(data)), 422, "invalid_request", "method"
    )


def test_model_health_stats_schema_and_page(client, artifact):
    info = client.get("/v1/model").json()
    assert info["classes"] == CLASSES
    assert info["preprocess"] == PreprocessConfig(image_size=32).to_dict()
    assert info["metrics"] == {"test": {"balanced_accuracy": 0.5}}
    assert info["model_card"] == (artifact / "model_card.md").read_text()
    assert "not a medical device" in info["model_card"]
    assert info["architecture"]["kwargs"]["depth"] == 2 and info["kind"] == "vit"
    assert info["serving"]["max_upload_bytes"] == 2**18 and info["serving"]["max_batch"] == 32

    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["model"]["name"] == "lesions"
    stats = client.get("/v1/stats").json()
    assert stats["max_batch"] == 32 and stats["failed_batches"] == 0

    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/predict", "/v1/explain", "/v1/model", "/v1/stats", "/health"}
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "not a diagnostic device" in page.text and 'aria-live="polite"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


# ------------------------------------------------------------------------------------------ bad input


def bad_uploads(real_jpeg: bytes) -> dict:
    """name -> (request kwargs, status, code, words of the message)."""
    return {
        "not an image": (
            {"files": upload(b"these are not the pixels you are looking for")},
            400,
            "invalid_image",
            ["not an image"],
        ),
        "truncated image": ({"files": upload(real_jpeg[:2000])}, 400, "invalid_image", ["truncated"]),
        "empty file": ({"files": upload(b"")}, 400, "empty_file", ["empty"]),
        "empty body": ({}, 415, "unsupported_media_type", ["multipart/form-data"]),
        "wrong content type": (
            {"content": b'{"file": "lesion.jpg"}', "headers": {"content-type": "application/json"}},
            415,
            "unsupported_media_type",
            ["multipart/form-data", "application/json"],
        ),
        "part not an image": (
            {"files": upload(real_jpeg, "notes.txt", "text/plain")},
            415,
            "unsupported_media_type",
            ["text/plain"],
        ),
        "missing file field": (
            {"files": {"image": ("lesion.jpg", real_jpeg, "image/jpeg")}},
            422,
            "missing_file",
            ["'file'"],
        ),
        "multipart without boundary": (
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad_request",
            ["boundary"],
        ),
        "1 x 10000 pixels": (
            {"files": upload(png_bytes(Image.new("RGB", (1, 10000), "white")), "thin.png", "image/png")},
            422,
            "bad_dimensions",
            ["1x10000", "at least 8 pixels"],
        ),
        "100000 x 1 pixels": (
            {"files": upload(png_bytes(Image.new("L", (100000, 1))), "wide.png", "image/png")},
            422,
            "bad_dimensions",
            ["100000x1"],
        ),
        "aspect 50:1": (
            {"files": upload(png_bytes(Image.new("RGB", (1000, 20))), "strip.png", "image/png")},
            422,
            "bad_dimensions",
            ["aspect ratio of 50.0:1", "10:1"],
        ),
        "decompression bomb": (
            # 7000 x 7000 one-bit pixels: a 7 kB file that decodes to 49 megapixels
            {"files": upload(png_bytes(Image.new("1", (7000, 7000))), "bomb.png", "image/png")},
            413,
            "image_too_large",
            ["49,000,000 pixels", "decompression bomb"],
        ),
        "forged header": (
            {"files": upload(png_header_only(100_000, 100_000), "forged.png", "image/png")},
            413,
            "image_too_large",
            ["100000x100000"],
        ),
        "upload over the file limit": (
            # under the body limit (file limit + multipart framing) but over the 0.25 MiB file limit
            {"files": upload(os.urandom(2**18 + 1000))},
            413,
            "file_too_large",
            ["262,144"],
        ),
        "body over the limit": ({"files": upload(os.urandom(2**19))}, 413, "payload_too_large", ["at most"]),
        "non-multipart body over the limit": (
            {"content": b"x" * 2**19, "headers": {"content-type": "application/octet-stream"}},
            413,
            "payload_too_large",
            ["at most"],
        ),
    }


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
def test_bad_input_is_a_clear_4xx_and_never_reaches_the_model(client, images, endpoint):
    before = client.get("/v1/stats").json()
    for name, (kwargs, status, code, needles) in bad_uploads(images[0].read_bytes()).items():
        response = client.post(endpoint, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert_error(response, status, code, *needles)
    after = client.get("/v1/stats").json()
    assert after["requests"] == before["requests"] and after["failed_batches"] == 0
    assert client.get("/health").json()["status"] == "ok"
    assert client.post(endpoint, files=upload(images[0].read_bytes())).status_code == 200


def test_body_limit_applies_to_every_endpoint_while_reading(client):
    # a chunked body (no Content-Length) is counted while it is read
    def chunks():
        for _ in range(16):
            yield b"y" * 2**16

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=y"})
    assert_error(response, 413, "payload_too_large", "at most")
    assert client.post("/v1/model").status_code == 405


# ------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_match_unbatched_predictions(artifact, images, reference):
    app = create_app(artifact, max_batch=8, max_wait_ms=100)
    payloads = [images[i % len(images)] for i in range(24)]
    with TestClient(app) as client, ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda p: client.post("/v1/predict", files=upload(p.read_bytes())), payloads))
        stats = client.get("/v1/stats").json()
    assert all(r.status_code == 200 for r in responses)
    assert stats["requests"] == 24 and stats["failed_batches"] == 0
    assert stats["batches"] < 24 and stats["mean_batch_size"] == pytest.approx(24 / stats["batches"])
    assert 1 < stats["max_batch_size"] <= 8
    assert max(r.json()["batch_size"] for r in responses) > 1
    for path, response in zip(payloads, responses, strict=True):
        probs = np.array(list(response.json()["probabilities"].values()))
        np.testing.assert_allclose(probs, reference(path), atol=1e-5)


def test_max_batch_1_serves_one_request_per_model_call(artifact, images):
    with TestClient(create_app(artifact, max_batch=1)) as client, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda p: client.post("/v1/predict", files=upload(p.read_bytes())), images[:6]))
        stats = client.get("/v1/stats").json()
    assert [r.json()["batch_size"] for r in responses] == [1] * 6
    assert stats["batches"] == stats["requests"] == 6 and stats["max_batch_size"] == 1


def test_server_warms_up_every_batch_size_before_serving(artifact):
    app = create_app(artifact, max_batch=8)
    predictor = app.state.service.predictor
    seen, logits = [], predictor._logits
    predictor._logits = lambda batch: seen.append(len(batch)) or logits(batch)
    with TestClient(app) as client:
        assert seen == [1, 8]  # eager: the kernels' first-call set-up, before any request
        assert client.get("/v1/stats").json()["requests"] == 0
        assert client.get("/v1/model").json()["serving"]["warmup_batch_sizes"] == [1, 8]


def test_compiled_backend_compiles_at_start_up_only(artifact, images, reference):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    # a long wait: three requests sent together become one batch of 3, a size no graph was built for
    app = create_app(artifact, backend="compile", max_batch=4, max_wait_ms=2000)
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        assert client.get("/v1/model").json()["serving"]["warmup_batch_sizes"] == [1, 2, 4]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 3  # one per padded batch size
        payloads = images[:3]
        responses = list(pool.map(lambda p: client.post("/v1/predict", files=upload(p.read_bytes())), payloads))
        assert [r.json()["batch_size"] for r in responses] == [3, 3, 3]
        assert counters["stats"]["unique_graphs"] == graphs  # the batch of 3 ran padded to 4: no new graph
    for path, response in zip(payloads, responses, strict=True):
        probs = np.array(list(response.json()["probabilities"].values()))
        np.testing.assert_allclose(probs, reference(path), atol=1e-4)


def test_serve_cli_offers_every_backend():
    from skindistil.commands.serve import SERVE_BACKENDS
    from skindistil.inference.backends import BACKENDS

    assert ["torch", *BACKENDS] == SERVE_BACKENDS


def test_decoding_threads_leave_the_cores_to_the_model(artifact, images):
    from skindistil.serve.service import MODEL_THREADS

    app = create_app(artifact)
    with TestClient(app) as client:
        for image in images[:3]:
            assert client.post("/v1/predict", files=upload(image.read_bytes())).status_code == 200
        service = app.state.service
        assert service._decode_pool.submit(torch.get_num_threads).result() == 1
        assert service.batcher._executor.submit(torch.get_num_threads).result() == MODEL_THREADS


def test_batcher_survives_a_failing_batch_and_refuses_overload():
    release = threading.Event()

    def run_batch(items):
        if "boom" in items:
            raise RuntimeError("model exploded")
        release.wait(10)
        return [item * 2 for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=1, max_queue=2)
        with pytest.raises(NotRunning):
            await batcher.submit(1)
        await batcher.start()
        with pytest.raises(RuntimeError, match="model exploded"):
            await batcher.submit("boom")
        assert batcher.running and batcher.stats.failed_batches == 1
        release.set()
        assert (await batcher.submit(21)).value == 42
        release.clear()
        first = asyncio.ensure_future(batcher.submit(1))  # taken by the worker, which then blocks
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        release.set()
        results = await asyncio.gather(first, *queued)
        assert [r.value for r in results] == [2, 4, 6]
        assert [r.batch_size for r in results] == [1, 2, 2]
        assert batcher.stats.rejected == 1 and batcher.stats.batches == 3
        await batcher.stop()
        assert not batcher.running

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------------ CLI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_the_artifact(artifact, images, reference):
    port = free_port()
    command = [sys.executable, "-m", "skindistil.cli", "serve", "--model", str(artifact.parent)]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--max-batch", "4", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        response = httpx.post(f"{base}/v1/predict", files=upload(images[2].read_bytes()))
        assert response.status_code == 200
        probs = np.array(list(response.json()["probabilities"].values()))
        np.testing.assert_allclose(probs, reference(images[2]), atol=1e-5)
        assert httpx.get(f"{base}/v1/model").json()["serving"]["max_batch"] == 4
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0


def test_cli_fails_before_serving_on_a_bad_model(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 1
    assert "no such model directory" in capsys.readouterr().err
