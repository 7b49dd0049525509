"""Data-pipeline throughput: prepare (decode + crop + resize + cache) and training loaders.

The question it answers: can the loader feed the GPU? A ViT-B/16 trains at about 2,500 img/s and the
6-block student at about 4,800 img/s on one H100, so the loader must sustain about 5,000 augmented
224 px samples/s on that machine's 16 cores. Measured here:

- prepare: `prepare_dataset` on N images (img/s over the decode phase);
- loader, "cpu" path: DataLoader workers running the per-sample torchvision v2 train transform;
- loader, "device" path: workers only loading uint8 squares from the cache (what feeds BatchAugment);
- augment: `BatchAugment` on whole batches, on the CPU (1 thread and all threads) and on CUDA if present;
- end-to-end on CUDA if present: device-path loader + transfer + BatchAugment.

Rows marked "extrapolated" scale a measured per-core rate to `target_cores` (loading is independent
per worker, so it scales with cores until memory bandwidth or the GPU limits it); they are estimates,
not measurements.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from skindistil.config import PreprocessConfig
from skindistil.data.datamodule import CachedImageDataset, collate_images
from skindistil.data.prepare import default_workers, load_manifest, prepare_dataset
from skindistil.data.sources import Source
from skindistil.data.transforms import BatchAugment, build_train_transform
from skindistil.data.vocab import ClassVocab
from skindistil.measure import Rate, device_sync, measure_rate

# The reference training machine: one H100 with 16 CPU cores.
TARGET_CORES = 16
TARGET_IMAGES_PER_SECOND = 5000


@dataclass
class BenchRow:
    """One measurement. `workers`: loader worker processes (0: in the main process, one torch thread),
    prepare pool processes or torch threads (see `stage`). `per_core`: images/s per worker/thread, from
    CPU time for in-process rows (None where it does not apply)."""

    stage: str
    path: str
    workers: int
    images_per_second: float
    per_core: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    rows: list[BenchRow] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "rows": [asdict(row) for row in self.rows]}


def measure_loader(loader: DataLoader, seconds: float, warmup_batches: int) -> Rate:
    """Samples per second delivered by `loader` over `seconds`, after `warmup_batches` (worker start-up)."""
    batches = iter(loader)
    for _ in range(warmup_batches):
        next(batches)
    rate = measure_rate(lambda: len(next(batches)[1]), seconds)
    return rate if loader.num_workers == 0 else Rate(rate.wall)


def measure_batch_augment(augment: BatchAugment, images: torch.Tensor, seconds: float) -> Rate:
    """Images per second of `augment` on the uint8 batch `images` (on its device, synchronised)."""
    sync = device_sync(images.device)
    augment(images)
    return measure_rate(lambda: len(augment(images)), seconds, sync)


def measure_device_pipeline(loader: DataLoader, augment: BatchAugment, device: torch.device, seconds: float,
                            warmup_batches: int) -> float:
    """End-to-end device path: uint8 batches from `loader`, copied to `device`, augmented there."""
    batches = iter(loader)
    for _ in range(warmup_batches):
        augment(next(batches)[0].to(device, non_blocking=True))

    def step() -> int:
        images = next(batches)[0].to(device, non_blocking=True)
        augment(images)
        return len(images)

    return measure_rate(step, seconds, device_sync(device)).wall


@contextlib.contextmanager
def _torch_threads(count: int):
    """Run the block with `count` torch intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bench_data(
    source: Source,
    *,
    num_images: int = 500,
    workers: int | None = None,
    batch_size: int = 64,
    seconds: float = 3.0,
    preprocess: PreprocessConfig | None = None,
    short_side: int = 256,
    work_dir: str | Path | None = None,
    target_cores: int = TARGET_CORES,
) -> BenchResult:
    """Prepare `num_images` of `source` into a temporary DATA_DIR (or `work_dir`) and measure every path."""
    preprocess = preprocess or PreprocessConfig()
    workers = default_workers() if workers is None else max(1, int(workers))
    result = BenchResult(settings={
        "source": source.fingerprint(), "num_images": num_images, "workers": workers, "batch_size": batch_size,
        "seconds": seconds, "image_size": preprocess.image_size, "short_side": short_side,
        "target_cores": target_cores, "target_images_per_second": TARGET_IMAGES_PER_SECOND,
        "cuda": torch.cuda.is_available(),
    })
    with tempfile.TemporaryDirectory(prefix="skindistil-bench-") as tmp:
        data_dir = Path(work_dir) if work_dir is not None else Path(tmp) / "data"
        prepared = prepare_dataset(source, data_dir, short_side=short_side, limit=num_images, workers=workers,
                                   progress=False)
        result.rows.append(BenchRow("prepare", "prepare_dataset", workers,
                                    prepared.images_per_second, prepared.images_per_second / workers,
                                    "measured"))
        manifest, info = load_manifest(data_dir)
        vocab = ClassVocab(info["classes"])
        batch_size = min(batch_size, len(manifest))

        def loader(square, transform, num_workers):
            dataset = CachedImageDataset(data_dir, manifest, vocab, transform, square=square)
            # One endless epoch: epoch boundaries would drain the workers' prefetch queue on a small set.
            sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 40)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              collate_fn=collate_images, pin_memory=torch.cuda.is_available())

        paths = {
            "cpu: v2 per-sample": (None, build_train_transform(preprocess)),
            "device: uint8 squares": ("random", None),
        }
        per_core = {}
        for name, (square, transform) in paths.items():
            # In-process with one torch thread: the per-core cost, from CPU time.
            with _torch_threads(1):
                rate = measure_loader(loader(square, transform, 0), seconds, warmup_batches=1)
            per_core[name] = rate.cpu
            result.rows.append(BenchRow("loader", name, 0, rate.wall, rate.cpu, "measured"))
            rate = measure_loader(loader(square, transform, workers), seconds, warmup_batches=2 * workers)
            result.rows.append(BenchRow("loader", name, workers, rate.wall, rate.wall / workers, "measured"))

        sample = next(iter(loader("random", None, 0)))[0]
        augment = BatchAugment(preprocess).train()
        cpu_best = 0.0
        for threads in sorted({1, workers}):
            with _torch_threads(threads):
                rate = measure_batch_augment(augment, sample, seconds)
            cpu_best = max(cpu_best, rate.wall)
            per_thread = rate.cpu if threads == 1 else rate.wall / threads
            result.rows.append(BenchRow("augment", "BatchAugment cpu", threads, rate.wall, per_thread,
                                        "measured"))
        gpu_rate = None
        if torch.cuda.is_available():
            device = torch.device("cuda")
            gpu_rate = measure_batch_augment(augment, sample.to(device), seconds).wall
            result.rows.append(BenchRow("augment", "BatchAugment cuda", 1, gpu_rate, None,
                                        f"measured on {torch.cuda.get_device_name(device)}"))
            end_to_end = measure_device_pipeline(loader("random", None, workers), augment, device, seconds,
                                                 warmup_batches=2 * workers)
            result.rows.append(BenchRow("end-to-end", "device: loader+copy+augment", workers, end_to_end,
                                        end_to_end / workers, "measured"))

        for name, rate in per_core.items():
            result.rows.append(BenchRow("extrapolated", name, target_cores, rate * target_cores, rate,
                                        "EXTRAPOLATED"))
        loading = per_core["device: uint8 squares"] * target_cores
        if gpu_rate is None:
            result.rows.append(BenchRow(
                "extrapolated", "BatchAugment on a GPU", 1, cpu_best, None,
                "LOWER BOUND (CPU)"))
        else:
            result.rows.append(BenchRow(
                "extrapolated", "device: sustained", target_cores, min(loading, gpu_rate), None,
                "EXTRAPOLATED"))
    return result
