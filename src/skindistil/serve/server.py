"""Run an ASGI app with uvicorn in a background thread: for tests, benchmarks and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serve_in_background(
    app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 60.0
) -> Iterator[str]:
    """Serve `app` on host:port (port 0: a free one) in a daemon thread; yield its base URL.

    The socket is bound before the server starts, so the port is known and never raced for. The
    block waits until the app's lifespan has started, and on exit stops the server and joins it.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="skindistil-serve")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.01)
        bound = sock.getsockname()[1]
        yield f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
