"""The model benchmark: latency, throughput and peak memory of models and inference backends.

Definitions (sizes and FLOPs: `skindistil.bench.summary`; teacher/student ratios: `skindistil.bench.report`)
- latency: seconds per call (one batch), median and 90th percentile over the timed calls.
- throughput: batch size / median seconds per call (images/s).
- peak memory: what running the model at that batch size takes, in MB (10^6 bytes, as file MB):
  weights + input batch + call, where weights are the bytes the backend holds (PyTorch backends: the
  parameters and buffers of the module they run, e.g. a bf16 copy for `fast`; onnxruntime: the ONNX
  file's bytes, the initialisers its session loads), input is the batch's tensor bytes, and call is
  the most memory one call adds on top of them (activations, workspace, outputs), measured by
  `skindistil.measure.PeakMemory`: on CUDA with torch's allocator statistics, on the CPU as the growth
  of the process's peak resident size after freed memory is handed back (malloc_trim). The three parts
  are reported too (weights_memory_mb, input_memory_mb, call_memory_mb). onnxruntime's own GPU
  memory is not seen by PyTorch, so peak memory is not reported for it on CUDA.

Timing protocol per cell (model x backend x batch size): `warmup` untimed calls (the last one measures
peak memory), then timed calls until `repeats` are done, or until `seconds` have been spent timing and at
least `min_repeats` are done. The models of a run are timed round-robin (one call of each per round),
so a teacher and its student share the same machine load. Every call runs under
torch.inference_mode; on CUDA each timed call ends with torch.cuda.synchronize. The thread count
(torch.get_num_threads, also given to onnxruntime) is recorded.

Models are artifact directories or timm architecture specs (`skindistil.bench.specs`).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from skindistil.bench.report import choose_pairs, paper_ratios
from skindistil.bench.specs import BenchModel, ModelRef, load_bench_model, parse_model_ref
from skindistil.bench.summary import count_flops, find_bma, machine_info, vit_shape, weight_bytes
from skindistil.devices import parse_device
from skindistil.errors import ConfigError
from skindistil.inference.backends import BACKENDS, BackendUnavailable, build_backend, check_backends
from skindistil.measure import PeakMemory, device_sync, summarize_times, time_interleaved
from skindistil.models.artifact import count_parameters

RESULT_FORMAT = 1
MEMORY_PARTS = (
    "peak memory = weights held by the backend (parameters + buffers of the module run, or the ONNX file) "
    "+ input batch + the most memory one call adds"
)


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how long to spend on each cell (see module doc for the protocol)."""

    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    backends: tuple[str, ...] = ("eager",)
    warmup: int = 2
    repeats: int = 20
    min_repeats: int = 3
    seconds: float = 10.0
    threads: int | None = None

    def validate(self) -> None:
        check_backends(self.backends)
        parse_device(self.device)
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes {list(self.batch_sizes)}: need one or more positive integers")
        if self.warmup < 1 or self.min_repeats < 1 or self.repeats < self.min_repeats or self.seconds <= 0:
            raise ConfigError("timing: need warmup >= 1, 1 <= min_repeats <= repeats and seconds > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads {self.threads}: must be at least 1")


def run_benchmark(
    models: Sequence[str],
    settings: BenchSettings,
    *,
    pair: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure every model with every backend at every batch size; returns the JSON-ready result.

    All models are loaded together and, per backend and batch size, timed round-robin
    (`time_interleaved`), so a teacher and its student see the same machine load.
    Keys: format, created, machine, settings, models (one summary each), results (one per cell),
    skipped (backends unavailable here, with the reason), pairs ([teacher, student] labels) and
    ratios (the paper's "X% smaller, Y% faster" per pair, backend and batch size). Pairs: `pair`
    (teacher, student) if given; else, among ViTs of equal width, the deepest against each shallower
    one; else the first two models.
    """
    settings.validate()
    refs = _unique_labels([parse_model_ref(m) for m in models])  # all checked before any long run
    pairs = _choose_pairs_by_name(refs, pair) if pair else None
    device = torch.device(settings.device)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    threads = torch.get_num_threads()
    log = progress or (lambda message: None)
    bench_models = []
    summaries = []
    for ref in refs:
        bench_models.append(load_bench_model(ref))
        summaries.append(_summarize_model(bench_models[-1]))
        log(f"{ref.label}: {summaries[-1]['params']:,} parameters, {summaries[-1]['gflops']:.3f} GFLOPs/image")
    results, skipped = [], []
    for backend in settings.backends:
        runners = {}
        for bench_model in bench_models:
            label = bench_model.ref.label
            try:
                runners[label] = build_backend(
                    backend,
                    bench_model.model,
                    device,
                    image_size=bench_model.image_size,
                    threads=threads,
                    pad_batches=False,  # a timed batch is the batch asked for
                )
            except BackendUnavailable as exc:
                skipped.append({"model": label, "backend": backend, "reason": str(exc)})
                log(f"{label}: {backend} skipped: {exc}")
        sizes = {m.ref.label: m.image_size for m in bench_models}
        for batch_size in settings.batch_sizes:
            cells = _measure_cells(runners, sizes, BACKENDS[backend], int(batch_size), device, settings)
            for label, cell in cells.items():
                results.append({"model": label, "backend": backend, "device": str(device), **cell})
                log(
                    f"{label}: {backend} batch {batch_size}: {cell['median_s'] * 1e3:.2f} ms/call, "
                    f"{cell['images_per_s']:.1f} images/s ({cell['repeats']} calls)"
                )
            _release(device)
        del runners
        _release(device)
    if pairs is None:
        pairs = choose_pairs(summaries)
    return {
        "format": RESULT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device, threads),
        "settings": {**dataclasses.asdict(settings), "threads": threads},
        "models": summaries,
        "results": results,
        "skipped": skipped,
        "pairs": [list(p) for p in pairs],
        "ratios": paper_ratios(summaries, results, pairs),
    }


def _unique_labels(refs: list[ModelRef]) -> list[ModelRef]:
    seen: dict[str, int] = {}
    out = []
    for ref in refs:
        seen[ref.label] = seen.get(ref.label, 0) + 1
        out.append(ref if seen[ref.label] == 1 else dataclasses.replace(ref, label=f"{ref.label}#{seen[ref.label]}"))
    return out


def _choose_pairs_by_name(refs: list[ModelRef], pair: Sequence[str]) -> list[tuple[str, str]]:
    if len(pair) != 2:
        raise ConfigError(f"--pair needs two models (teacher student), got {len(pair)}")
    labels = []
    for name in pair:
        match = [r.label for r in refs if name in (r.ref, r.label)]
        if not match:
            raise ConfigError(f"--pair {name!r}: not one of the benchmarked models ({', '.join(r.label for r in refs)})")
        if len(match) > 1:
            raise ConfigError(f"--pair {name!r}: names {len(match)} benchmarked models ({', '.join(match)}); "
                              "give their labels")
        labels.append(match[0])
    if labels[0] == labels[1]:
        raise ConfigError(f"--pair: teacher and student are the same model ({labels[0]})")
    return [(labels[0], labels[1])]


def _summarize_model(bench_model: BenchModel) -> dict:
    depth, width = vit_shape(bench_model.model)
    bma, bma_split = find_bma(bench_model.metrics)
    ref = bench_model.ref
    return {
        "label": ref.label,
        "ref": ref.ref,
        "source": "artifact" if ref.path is not None else "arch",
        "architecture": bench_model.architecture,
        "depth": depth,
        "width": width,
        "image_size": list(bench_model.image_size),
        "params": count_parameters(bench_model.model),
        "file_bytes": bench_model.file_bytes,
        "file_bytes_kind": bench_model.file_bytes_kind,
        "gflops": count_flops(bench_model.model, bench_model.image_size) / 1e9,
        "balanced_accuracy": bma,
        "balanced_accuracy_split": bma_split,
    }


def _measure_cells(
    runners: dict, image_sizes: dict, backend, batch_size: int, device: torch.device, settings: BenchSettings
) -> dict[str, dict]:
    """One cell per model at this backend and batch size: warm-up (the last warm-up call measures peak
    memory), then round-robin timing of all models."""
    sync = device_sync(device)
    inputs, memory = {}, {}
    # dynamo's per-function recompile limit (8) would otherwise send the ninth model to eager unannounced
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(runners))):
        for label, fn in runners.items():
            generator = torch.Generator().manual_seed(batch_size)
            inputs[label] = torch.randn(batch_size, 3, *image_sizes[label], generator=generator).to(device)
            for _ in range(settings.warmup - 1):
                fn(inputs[label])
            with PeakMemory(device) as memory[label]:
                fn(inputs[label])
        times = time_interleaved(
            list(runners.values()),
            list(inputs.values()),
            repeats=settings.repeats,
            min_repeats=settings.min_repeats,
            max_seconds=settings.seconds,
            sync=sync,
        )
    cells = {}
    for (label, mem), spent in zip(memory.items(), times, strict=True):
        weights = weight_bytes(runners[label])
        held = inputs[label].numel() * inputs[label].element_size()
        # PyTorch's CUDA allocator does not see onnxruntime's GPU memory
        seen = mem.peak_bytes is not None and weights is not None and not (device.type == "cuda" and backend.runtime != "torch")
        cells[label] = {
            "batch_size": batch_size,
            **summarize_times(spent, batch_size),
            "peak_memory_mb": (weights + held + mem.peak_bytes) / 1e6 if seen else None,
            "weights_memory_mb": weights / 1e6 if weights is not None else None,
            "input_memory_mb": held / 1e6,
            "call_memory_mb": mem.peak_bytes / 1e6 if seen else None,
            "memory_kind": f"{MEMORY_PARTS}; call = {mem.kind}" if seen else "unavailable",
        }
    return cells


def _release(device: torch.device) -> None:
    # compiled code is dropped between cells: each batch size compiles afresh anyway (static shapes)
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
