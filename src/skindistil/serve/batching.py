"""Dynamic micro-batching: single-item requests that arrive together run as one model call.

Each request puts its (already preprocessed) item and a future on an asyncio queue. One worker task
takes the first waiting request, then keeps collecting until it holds `max_batch` requests or
`max_wait_ms` have passed since it took the first, runs `run_batch` on the whole list in a thread of
its own (the event loop keeps accepting and preprocessing requests meanwhile) and resolves each
future with its row of the result.

While one batch runs, the next requests queue up, so under load batches fill without waiting at all;
a lone request on an idle server waits at most `max_wait_ms`. `max_batch=1` is plain per-request
serving (no waiting). A failing batch fails the futures of that batch only; the worker carries on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue already holds `max_queue` requests: the caller should retry later (HTTP 503)."""


class NotRunning(Exception):
    """The batcher is not started (or is shutting down)."""


@dataclass(frozen=True)
class BatchResult:
    """One request's row of a batch result, with the batch's size and where the time went.

    queue_ms: from `submit` until its batch started running; model_ms: the batch's `run_batch` call.
    """

    value: Any
    batch_size: int
    queue_ms: float
    model_ms: float


@dataclass
class BatchStats:
    """Counters since start: requests answered, batches run (and failed), rejected submissions."""

    requests: int = 0
    batches: int = 0
    max_batch_size: int = 0
    failed_batches: int = 0
    rejected: int = 0

    @property
    def mean_batch_size(self) -> float:
        """requests / batches (0 before the first batch)."""
        return self.requests / self.batches if self.batches else 0.0


class MicroBatcher:
    """Collects submitted items into batches for `run_batch(items) -> one result row per item`.

    max_batch: most items per call. max_wait_ms: how long a batch that is not full keeps collecting
    after its first item. max_queue: most items waiting; `submit` raises Overloaded beyond it.
    `run_batch` runs in one dedicated thread, so calls never overlap.
    """

    def __init__(
        self,
        run_batch: Callable[[list], Sequence],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = int(max_queue)
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """True while the worker task is alive."""
        return self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self.running:
            return
        self.stats = BatchStats()
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="skindistil-model")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="skindistil-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail with NotRunning."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            _, future, _ = self._queue.get_nowait()
            if not future.done():
                future.set_exception(NotRunning("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item) -> BatchResult:
        """Queue `item` and wait for its row of the batch it runs in."""
        if not self.running:
            raise NotRunning("the model worker is not running")
        if self._queue.qsize() >= self.max_queue:
            self.stats.rejected += 1
            raise Overloaded(f"{self._queue.qsize()} requests are already waiting for the model")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future, time.perf_counter()))
        return await future

    async def _collect(self) -> list:
        """The next batch: the first waiting request plus whatever arrives within max_wait_ms."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_ms / 1000
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # (the builtin TimeoutError only from Python 3.11)
                break
        # a client that disconnected cancelled its future: its item is not worth computing
        return [entry for entry in batch if not entry[1].cancelled()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            items = [item for item, _, _ in batch]
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(rows) != len(items):
                    raise RuntimeError(f"run_batch returned {len(rows)} rows for {len(items)} items")
            except Exception as exc:
                # a model failure is a server fault, not the requests' fault: report it, keep serving
                log.exception("model batch of %d failed", len(items))
                self.stats.failed_batches += 1
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            model_ms = (time.perf_counter() - started) * 1000
            self.stats.batches += 1
            self.stats.requests += len(items)
            self.stats.max_batch_size = max(self.stats.max_batch_size, len(items))
            for (_, future, queued), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(BatchResult(row, len(items), (started - queued) * 1000, model_ms))
