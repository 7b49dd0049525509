"""Connection-level guards for the server: no client can hold the server's connections or memory.

uvicorn closes idle keep-alive connections, but not a connection that sends part of a request and
stops (nor one that sends nothing at all), and it accepts connections until the process runs out of
file descriptors. `guarded_protocol` wraps uvicorn's HTTP protocol class (httptools when installed,
else h11) with three rules, each counted in `GuardStats` (reported by GET /v1/stats):

- at most `max_connections` connections are served at once; a request on any connection beyond
  that is answered 503 (JSON, Retry-After: 1, Connection: close) without reaching the app, and
  beyond twice that a new connection gets the 503 at once and is closed without being read, so the
  sockets never exceed 2 x max_connections (`skindistil.serve.server.fds_needed`);
- a request's line and headers must arrive within `header_timeout_s` of the connection opening (or
  of its first byte, on a kept-alive connection), else the connection is closed;
- they may take at most `MAX_HEADER_BYTES`, else 431 and the connection is closed.

The body's own deadline is enforced while the app reads it (`skindistil.serve.uploads.BodyLimit`),
where it can be answered with a 408. `MemoryBudget` bounds the memory of the uploads being decoded.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import asdict, dataclass

# Request line and headers: uvicorn's h11 default, also applied to httptools (which sets no limit).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """How long and how many: connections served at once, seconds for the request line and headers,
    seconds for the body (from the end of the headers), seconds an idle kept-alive connection stays."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0


@dataclass
class GuardStats:
    """Counters since start (GET /v1/stats)."""

    connections_open: int = 0
    connections_peak: int = 0
    connections_refused: int = 0
    header_timeouts: int = 0
    headers_too_large: int = 0
    body_timeouts: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _json_response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with a JSON error body, written straight to a transport."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


def refusal_app(stats: GuardStats, max_connections: int):
    """The ASGI app a connection over the limit gets: 503 JSON, then the connection is closed."""
    body = json.dumps(
        {"error": {"code": "overloaded", "message": f"the server already holds {max_connections} connections; retry later"}}
    ).encode()

    async def refuse(scope, receive, send) -> None:
        stats.connections_refused += 1
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


def guarded_protocol(limits: ServerLimits, stats: GuardStats) -> type:
    """uvicorn's HTTP protocol class with the rules of this module; pass it as uvicorn's `http`."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools is optional: uvicorn's pure-Python h11 parser
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    too_large = _json_response(
        431, "Request Header Fields Too Large", "headers_too_large",
        f"the request line and headers exceed {MAX_HEADER_BYTES:,} bytes",
    )
    full = _json_response(
        503, "Service Unavailable", "overloaded",
        f"the server already holds {2 * limits.max_connections} connections; retry later", "retry-after: 1\r\n",
    )

    class GuardedProtocol(Base):
        # Both of uvicorn's protocols set `self.cycle` to a new RequestResponseCycle when a request's
        # headers are complete: while it is still the one seen when the timer was armed, the request
        # being waited for has not arrived.
        def connection_made(self, transport) -> None:
            held = len(self.connections)  # this one is not counted yet
            super().connection_made(transport)
            stats.connections_open = len(self.connections)
            stats.connections_peak = max(stats.connections_peak, stats.connections_open)
            self._header_timer = None
            self._arm_header_timer()
            if held >= 2 * limits.max_connections:
                stats.connections_refused += 1
                transport.write(full)
                transport.close()
            elif held >= limits.max_connections:
                self.app = refusal_app(stats, limits.max_connections)

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)
            stats.connections_open = len(self.connections)

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and self._awaited is not self.cycle:
                self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is self._awaited and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    stats.headers_too_large += 1
                    self.transport.write(too_large)
                    self.transport.close()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._awaited = self.cycle
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is self._awaited and not self.transport.is_closing():
                stats.header_timeouts += 1
                self.transport.close()

    return GuardedProtocol


class MemoryBudget:
    """A first-come, first-served reservation of `total` bytes among asyncio tasks.

    `acquire(n)` waits until n bytes are free and no earlier request is still waiting (so a large
    request is never starved by a stream of small ones); `release(n)` gives them back. ValueError
    for a request larger than the whole budget: it could never be served.
    """

    def __init__(self, total: int):
        self.total = int(total)
        self.free = self.total
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, n: int) -> None:
        if n > self.total:
            raise ValueError(f"{n:,} bytes is more than the whole budget of {self.total:,}")
        if not self._waiting and n <= self.free:
            self.free -= n
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as it was cancelled
            else:
                self._waiting.remove((n, future))
                self._grant()  # the next in line may fit now
            raise

    def release(self, n: int) -> None:
        self.free += n
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            n, future = self._waiting.popleft()
            self.free -= n
            future.set_result(None)
