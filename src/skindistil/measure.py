"""Measuring work: one timer and one memory meter.

Every benchmark of skindistil (models and backends, the data loader, training, early exit, the ONNX
int8 report) times through these functions, so their numbers follow one protocol: untimed warm-up
calls first, the device synchronised inside the timed span (`device_sync`) so queued GPU work is
counted, then either a number of timed calls (`time_calls`, `time_interleaved`: seconds per call)
or as many calls as fit in a span (`measure_rate`: items per second). Pure utilities over callables:
nothing here imports a model, a dataset or onnxruntime.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class PeakMemory:
    """Context manager: the most memory the block holds on `device` on top of what was held when it
    began (activations, workspace and outputs of one call; not the weights or inputs already there).

    After the block, `peak_bytes` is that many bytes (int), or None where it cannot be measured, and
    `kind` says what was measured:
    - CUDA: `torch.cuda.max_memory_allocated` during the block minus `memory_allocated` at its start
      (PyTorch's tensors only; a library with its own allocator, like onnxruntime, is not seen).
    - CPU (Linux): the process's peak resident set size during the block (`VmHWM`, reset through
      /proc/self/clear_refs) minus its resident size at the start. The C allocator keeps freed memory
      for reuse, which a later call then takes without the resident size growing (a warmed-up ViT-B
      call read 0 MB); so freed memory is first handed back to the system (glibc's malloc_trim) and
      the call's memory is counted again. Process-wide: other threads' allocations count too.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._base = 0
        if self.device.type == "cuda":
            self.kind = "cuda: torch.cuda.max_memory_allocated during the call minus memory_allocated before it"
        elif Path("/proc/self/clear_refs").exists():
            trim = "after malloc_trim" if _malloc_trim() is not None else "no malloc_trim here: may miss reused memory"
            self.kind = f"cpu: peak resident set size (VmHWM) during the call minus the resident size before it ({trim})"
        else:
            self.kind = "unavailable"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.kind != "unavailable":
            release_freed_memory()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM), Linux >= 4.0
                self._base = _proc_status_kb("VmRSS") * 1024
            except OSError:
                self.kind = "unavailable"
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - self._base
        elif self.kind != "unavailable":
            self.peak_bytes = max(0, _proc_status_kb("VmHWM") * 1024 - self._base)


def release_freed_memory() -> bool:
    """Hand the memory the C allocator keeps after frees back to the system (glibc `malloc_trim(0)`),
    so that the resident size counts live memory only. False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without it)
        return None


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def device_sync(device: str | torch.device) -> Callable[[], None] | None:
    """A function that waits for the device's queued work (torch.cuda.synchronize on CUDA), or None on the
    CPU, whose PyTorch calls return when their work is done: the `sync` argument of every timer here, where
    None also means "the work runs in this process" (`measure_rate` then reports the CPU-time rate)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


@dataclass
class Rate:
    """Items per wall-clock second, and per CPU second of this process (None where the work runs in
    other processes or on a device). On a shared machine the CPU-time rate is the per-core cost."""

    wall: float
    cpu: float | None = None


def measure_rate(step: Callable[[], int], seconds: float, sync: Callable[[], None] | None = None) -> Rate:
    """Call `step()` (it returns the items it handled) again and again until `seconds` of wall time
    have passed; items per second over that span. Warm up before calling this.

    With `sync` (see `device_sync`) the device is synchronised before the clock starts and once more
    after the last call, inside the span, and the CPU-time rate is None (device work is not this
    process's CPU time).
    """
    if sync:
        sync()
    count, wall_started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall_started < seconds:
        count += step()
    if sync:
        sync()
    wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
    return Rate(count / wall, None if sync or cpu <= 0 else count / cpu)


def time_calls(
    fn: Callable,
    inputs,
    *,
    warmup: int = 2,
    repeats: int = 20,
    min_repeats: int = 3,
    max_seconds: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds taken by each timed call of fn(inputs), after `warmup` untimed calls.

    Calls are timed until `repeats` are done, or until `max_seconds` have been spent timing and at
    least `min_repeats` are done. `sync` (e.g. torch.cuda.synchronize) runs after each call, inside
    the timed span, so asynchronous work is counted.
    """
    for _ in range(warmup):
        fn(inputs)
        if sync:
            sync()
    return time_interleaved([fn], [inputs], repeats=repeats, min_repeats=min_repeats, max_seconds=max_seconds, sync=sync)[0]


def time_interleaved(
    fns: Sequence[Callable],
    inputs: Sequence,
    *,
    repeats: int = 20,
    min_repeats: int = 3,
    max_seconds: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Round-robin timing: each round times one call fns[i](inputs[i]) of every callable in turn.

    On a shared machine the load then changes alike for all of them, which keeps their ratios honest.
    Rounds run until `repeats` are done, or until `max_seconds` per callable have been spent and at
    least `min_repeats` rounds are done. Returns the seconds per call, one list per callable.
    """
    sync = sync or (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    budget = max_seconds * len(fns)
    start = time.perf_counter()
    for round_index in range(repeats):
        for fn, x, spent in zip(fns, inputs, times, strict=True):
            t0 = time.perf_counter()
            fn(x)
            sync()
            spent.append(time.perf_counter() - t0)
        if round_index + 1 >= min_repeats and time.perf_counter() - start >= budget:
            break
    return times


def summarize_times(times: Sequence[float], batch_size: int = 1) -> dict:
    """Median, p90, mean and min seconds per call; ms per image and images/s from the median."""
    arr = np.asarray(times, dtype=np.float64)
    median = float(np.median(arr))
    return {
        "median_s": median,
        "p90_s": float(np.percentile(arr, 90)),
        "mean_s": float(arr.mean()),
        "min_s": float(arr.min()),
        "repeats": len(arr),
        "ms_per_image": median * 1e3 / batch_size,
        "images_per_s": batch_size / median,
    }
