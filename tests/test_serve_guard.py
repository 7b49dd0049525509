"""The server cannot be starved (issue 12, section 4): slow and greedy clients against a real uvicorn
server on 127.0.0.1. Every count and time here is bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import serving_artifact
from skindistil.errors import ConfigError
from skindistil.serve import create_app, serve_in_background


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return serving_artifact(tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def image_bytes(ham_root):
    return [p.read_bytes() for p in sorted((ham_root / "images").glob("*.jpg"))[:6]]


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `sock` (b"" for nothing), or None if still open after `within` s."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def _predict(url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files={"file": ("lesion.jpg", image, "image/jpeg")}, timeout=30)


def _upload_head(url: str, length: int) -> bytes:
    host = url.removeprefix("http://")
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_headers_are_cut_off_and_counted_while_others_are_served(artifact, image_bytes):
    app = create_app(artifact, header_timeout_s=1.0, max_batch=2)
    with serve_in_background(app) as url:
        silent = [_connect(url) for _ in range(5)]  # connect and say nothing
        partial = [_connect(url) for _ in range(5)]  # start a request, never finish the headers
        for sock in partial:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-")
        # a kept-alive connection whose second request stalls in its headers
        kept = _connect(url)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        # well-behaved clients are served meanwhile, with the same answers as ever
        answers = [_predict(url, image) for image in image_bytes[:3]]
        assert [r.status_code for r in answers] == [200, 200, 200]
        for sock in [*silent, *partial, kept]:
            assert _closed_by_server(sock, within=5.0) == b""
        elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 5.0
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["header_timeouts"] == 11
        assert stats["connections_refused"] == 0 and stats["body_timeouts"] == 0
        assert stats["connections_peak"] >= 11


def test_a_slow_body_is_answered_408_and_counted(artifact, image_bytes):
    app = create_app(artifact, body_timeout_s=1.0, header_timeout_s=30.0)
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="l.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    body += image_bytes[0] + b"\r\n--b--\r\n"
    with serve_in_background(app) as url:
        sock = _connect(url)
        sock.sendall(_upload_head(url, len(body)))
        started = time.monotonic()
        answer = None
        for i in range(0, len(body), 64):  # 64 bytes every 50 ms: about 1.3 KB/s
            try:
                sock.sendall(body[i : i + 64])
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.05)
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        error = json.loads(payload)["error"]
        assert error["code"] == "request_timeout" and "did not arrive within 1 s" in error["message"]
        assert 0.9 < elapsed < 5.0
        assert _closed_by_server(sock, within=5.0) is not None
        assert httpx.get(f"{url}/v1/stats").json()["body_timeouts"] == 1
        # the same upload at full speed is answered
        assert _predict(url, image_bytes[0]).status_code == 200


def test_connections_over_the_limit_get_503_and_the_server_recovers(artifact):
    app = create_app(artifact, max_connections=4, header_timeout_s=30.0)
    with serve_in_background(app) as url:
        held = [_connect(url) for _ in range(4)]
        time.sleep(0.2)
        refused = httpx.get(f"{url}/health", timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert "already holds 4 connections" in refused.json()["error"]["message"]
        # beyond twice the limit a connection is answered and closed at once, before it says anything
        held += [_connect(url) for _ in range(4)]
        time.sleep(0.2)
        extra = _connect(url)
        answer = _closed_by_server(extra, within=5.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503") and b"already holds 8 connections" in answer
        for sock in held:
            sock.close()
        deadline, refused_again = time.monotonic() + 5, 0
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code != 200 and time.monotonic() < deadline:
            refused_again += 1  # the server may not have seen every close yet
            time.sleep(0.05)
        assert health.status_code == 200
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["connections_refused"] == 2 + refused_again and stats["connections_peak"] == 9


def test_oversized_headers_are_refused_431(artifact):
    app = create_app(artifact, header_timeout_s=30.0)
    with serve_in_background(app) as url:
        sock = _connect(url)
        try:
            for _ in range(100):  # 100 x 1 KB of one endless header
                sock.sendall(b"GET /health HTTP/1.1\r\nX-Pad: " if _ == 0 else b"a" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _closed_by_server(sock, within=5.0)
        # closed at once; the 431 is read unless the unread rest of the headers reset the connection first
        assert answer is not None
        assert answer == b"" or (answer.startswith(b"HTTP/1.1 431") and b'"code": "headers_too_large"' in answer)
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["headers_too_large"] == 1 and stats["header_timeouts"] == 0
        assert httpx.get(f"{url}/health").status_code == 200


def test_uploads_are_decoded_only_within_the_memory_budget(artifact, image_bytes):
    """Each HAM10000 upload (200 x 150 px) reserves its size + 40 bytes per pixel (about 1.2 MB): a
    budget of 2.5 MiB lets two decode at once, never three, however many arrive together."""
    from skindistil.serve.uploads import DECODE_BYTES_PER_PIXEL

    app = create_app(artifact, max_pixels=40_000, max_upload_mb=0.1, decode_memory_mb=2.5, workers=4, max_batch=8)
    service = app.state.service
    active, peak, lock = 0, 0, threading.Lock()
    original = service._load_upload

    def counting(*args):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.1)  # make overlaps certain if the bound does not hold
            return original(*args)
        finally:
            with lock:
                active -= 1

    service._load_upload = counting
    with serve_in_background(app) as url, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _predict(url, image_bytes[i % len(image_bytes)]), range(12)))
        serving = httpx.get(f"{url}/v1/model").json()["serving"]
        stats = httpx.get(f"{url}/v1/stats").json()
    assert [r.status_code for r in answers] == [200] * 12
    assert peak == 2
    assert serving["decode_memory_mb"] == 2.5 and stats["decodes_waiting"] == 0
    assert DECODE_BYTES_PER_PIXEL * 200 * 150 * 2 < 2.5 * 2**20 < DECODE_BYTES_PER_PIXEL * 200 * 150 * 3


def test_a_budget_that_cannot_hold_one_upload_is_refused(artifact):
    with pytest.raises(ConfigError, match=r"decode memory 100 MiB cannot hold one upload of 20 MiB and 40,000,000 pixels \(1,546 MiB"):
        create_app(artifact, decode_memory_mb=100)


def test_memory_budget_is_first_come_first_served():
    import asyncio

    from skindistil.serve.guard import MemoryBudget

    async def scenario() -> list[str]:
        budget, order = MemoryBudget(10), []

        async def take(name: str, n: int, hold: float) -> None:
            await budget.acquire(n)
            order.append(name)
            await asyncio.sleep(hold)
            budget.release(n)

        tasks = [asyncio.create_task(take("small-1", 6, 0.05))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(take("large", 10, 0.01)))  # must wait for small-1
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(take("small-2", 2, 0.01)))  # fits now, but queues behind large
        cancelled = asyncio.create_task(take("cancelled", 1, 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(*tasks)
        with pytest.raises(ValueError, match="more than the whole budget"):
            await budget.acquire(11)
        assert budget.free == 10 and budget.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["small-1", "large", "small-2"]


def test_a_non_finite_probability_is_a_500_never_a_number(artifact, image_bytes):
    app = create_app(artifact, max_batch=1)
    with serve_in_background(app) as url:
        assert _predict(url, image_bytes[0]).status_code == 200
        # the model starts to overflow after start-up (here: a tiny temperature)
        app.state.service.loaded.config["calibration"] = {"temperature": 1e-300, "fitted_on": "x"}
        answer = _predict(url, image_bytes[0])
        assert answer.status_code == 500
        assert answer.json()["error"]["code"] == "model_error"
        assert "non-finite probabilities" in answer.json()["error"]["message"]
        assert "probabilities" not in answer.json()


def test_raise_fd_limit_refuses_what_the_hard_limit_cannot_hold(monkeypatch):
    import resource

    from skindistil.serve.server import fds_needed, raise_fd_limit

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: calls.append(value))
    assert raise_fd_limit(300) == fds_needed(300) == 964 and calls == [(964, 1024)]
    with pytest.raises(ConfigError, match=r"--max-connections 1024 needs 3136 open files, but the limit is 1024 .* lower --max-connections to 320"):
        raise_fd_limit(1024)
