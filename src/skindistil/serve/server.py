"""Run the app with uvicorn: the server settings `skindistil serve` uses, and a background server for
tests, benchmarks and notebooks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from skindistil.errors import ConfigError
from skindistil.serve.guard import GuardStats, ServerLimits, guarded_protocol

# File descriptors besides the connections' own: the model and log files, decoding threads, sockets.
RESERVED_FDS = 64


def fds_needed(max_connections: int) -> int:
    """File descriptors the server may hold with `max_connections`: the sockets of up to twice as
    many connections (those over the limit wait for their 503, see `skindistil.serve.guard`), an
    upload spooled to a temporary file per served connection (Starlette keeps parts over 1 MB on
    disk), and `RESERVED_FDS`."""
    return 3 * max_connections + RESERVED_FDS


def raise_fd_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to what `max_connections` needs,
    up to the hard limit; return the soft limit now in force. ConfigError when the hard limit is too
    low: past it, accept() fails and every client, well-behaved or not, is refused."""
    import resource

    needed = fds_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ConfigError(
            f"--max-connections {max_connections} needs {needed} open files, but the limit is {soft} "
            f"(ulimit -n); lower --max-connections to {max(1, (soft - RESERVED_FDS) // 3)} or raise the limit"
        )
    return soft


def server_config(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"):
    """The uvicorn.Config for `app`: its `ServerLimits` (app.state.server_limits, set by create_app;
    the defaults for another app) enforced by `guarded_protocol`, counted in app.state.guard_stats."""
    import uvicorn

    state = getattr(app, "state", None)
    limits = getattr(state, "server_limits", None) or ServerLimits()
    stats = getattr(state, "guard_stats", None) or GuardStats()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=guarded_protocol(limits, stats),
        timeout_keep_alive=limits.keep_alive_s,
    )


@contextmanager
def serve_in_background(
    app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 60.0
) -> Iterator[str]:
    """Serve `app` on host:port (port 0: a free one) in a daemon thread; yield its base URL.

    The socket is bound before the server starts, so the port is known and never raced for. The
    block waits until the app's lifespan has started (RuntimeError, with the app's start-up error
    when it recorded one, if it does not), and on exit stops the server and joins it.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(server_config(app, host, port, log_level))

    def run() -> None:
        # uvicorn exits when the app's start-up fails; the caller is told below
        with contextlib.suppress(SystemExit):
            server.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True, name="skindistil-serve")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                cause = getattr(getattr(app, "state", None), "startup_error", None)
                raise RuntimeError(
                    f"the server on {host}:{sock.getsockname()[1]} did not start" + (f": {cause}" if cause else "")
                )
            time.sleep(0.01)
        bound = sock.getsockname()[1]
        yield f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
