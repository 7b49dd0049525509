"""ONNX export with a parity check, int8 dynamic quantisation, and top-1 agreement.

The export uses torch.onnx's TorchScript exporter (`dynamo=False`): the dynamo exporter needs the
onnxscript package, which is not a dependency. timm's fused attention (scaled_dot_product_attention)
exports as plain ONNX ops at opset >= 14, so it stays on; the parity check measures the result.
The batch axis is dynamic: one file serves any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from skindistil.data.discovery import IMAGE_SUFFIXES, Discovery, discover_images
from skindistil.errors import ConfigError, ImageError, ModelError
from skindistil.files import write_json
from skindistil.inference.onnx import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxRunner,
    export_onnx,
    quantize_int8,
)
from skindistil.measure import summarize_times, time_calls

EXPORT_INFO_FILE = "export.json"


def max_abs_diff(a, b) -> float:
    """max |a - b| over all elements (float64)."""
    a, b = (np.asarray(v.float().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    if a.shape != b.shape:
        raise ModelError(f"cannot compare logits of shapes {list(a.shape)} and {list(b.shape)}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def top1_agreement(logits_a, logits_b) -> float:
    """Fraction of rows whose argmax is the same in both logit arrays [N, C]."""
    a, b = (np.asarray(v.float().cpu() if isinstance(v, torch.Tensor) else v) for v in (logits_a, logits_b))
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ModelError(f"top-1 agreement needs two non-empty [N, C] arrays, got {list(a.shape)} and {list(b.shape)}")
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def collect_images(items: Sequence[str | Path], limit: int | None = None) -> Discovery:
    """Image files from files, folders and CSV path lists, by `discover_images` (folders searched
    recursively, OS metadata left out, other files not taken listed in `skipped`).

    At most `limit` files in all. A missing path, or a folder without images, is an ImageError.
    """
    found = Discovery()
    for item in items:
        path = Path(item)
        if not path.exists():
            raise ImageError(str(path), "no such file or directory")
        part = discover_images([path], read_lists=True)
        if path.is_dir() and not part.files:
            raise ImageError(str(path), f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        found.files.extend(part.files)
        found.skipped.extend(part.skipped)
        found.unsearched.extend(part.unsearched)
        found.ignored += part.ignored
    found.files = found.files[:limit] if limit is not None else found.files
    return found


def _run_batched(fn, inputs: torch.Tensor, batch_size: int) -> np.ndarray:
    out = [np.asarray(torch.as_tensor(fn(inputs[i : i + batch_size])).float()) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out)


def export_artifact(
    model_dir: str | Path,
    *,
    out: str | Path | None = None,
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    images: Sequence[str | Path] = (),
    num_random: int = 4,
    tolerance: float = 1e-4,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Export an artifact to ONNX, check parity with PyTorch, optionally quantise to int8.

    Writes `out` (default <artifact>/model.onnx), with int8 also <stem>.int8.onnx next to it, and
    export.json in the same directory; returns that record.
    Parity: max |logit difference| between PyTorch and onnxruntime over `num_random` standard-normal
    inputs (at batch 1 and batch `num_random`) plus `images` through the artifact's eval preprocessing;
    `parity.ok` is max_abs_diff <= tolerance.
    int8: top-1 agreement with the fp32 ONNX model on `images` (or on the random inputs when no images
    are given: a weaker check, recorded as such), file sizes, and CPU latency at batch 1 of both files.
    """
    import onnxruntime

    from skindistil.models.artifact import load_model
    from skindistil.version import __version__

    loaded = load_model(model_dir)
    model_dir = loaded.path
    out = Path(out) if out is not None else model_dir / "model.onnx"
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: the ONNX file name must end in .onnx")
    size = loaded.preprocess.image_size
    generator = torch.Generator().manual_seed(seed)
    random_inputs = torch.randn(num_random, 3, size, size, generator=generator)
    image_paths = list(images)
    image_inputs = loaded.preprocess_images(image_paths) if image_paths else torch.zeros(0, 3, size, size)

    export_onnx(loaded.model, out, image_size=size, opset=opset)
    runner = OnnxRunner(out, "cpu", threads)
    torch_fn = loaded.logits
    diffs = [max_abs_diff(torch_fn(random_inputs[:1]), runner(random_inputs[:1]))]
    diffs.append(max_abs_diff(torch_fn(random_inputs), runner(random_inputs)))
    if len(image_inputs):
        diffs.append(max_abs_diff(_run_batched(torch_fn, image_inputs, 16), _run_batched(runner, image_inputs, 16)))
    parity = max(diffs)
    record = {
        "format": "onnx",
        "onnx": out.name,
        "onnx_bytes": out.stat().st_size,
        "opset": opset,
        "exporter": "torch.onnx TorchScript exporter (dynamo=False)",
        "input": {"name": INPUT_NAME, "shape": runner.input_shape},
        "output": OUTPUT_NAME,
        "dynamic_batch": isinstance(runner.input_shape[0], str),
        "model": str(model_dir),
        "versions": {"skindistil": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "parity": {
            "max_abs_diff": parity,
            "tolerance": tolerance,
            "ok": parity <= tolerance,
            "random_inputs": num_random,
            "images": len(image_inputs),
        },
    }
    if int8:
        record["int8"] = _int8_report(out, runner, image_inputs if len(image_inputs) else random_inputs, threads)
        record["int8"]["agreement_on"] = "images" if len(image_inputs) else "random inputs"
    write_json(out.parent / EXPORT_INFO_FILE, record)
    return record


def _int8_report(fp32_path: Path, fp32_runner: OnnxRunner, inputs: torch.Tensor, threads: int | None) -> dict:
    int8_path = quantize_int8(fp32_path, fp32_path.with_name(f"{fp32_path.stem}.int8.onnx"))
    int8_runner = OnnxRunner(int8_path, "cpu", threads)
    fp32_logits = _run_batched(fp32_runner, inputs, 16)
    int8_logits = _run_batched(int8_runner, inputs, 16)
    one = inputs[:1].numpy()
    latency = {}
    for name, runner in (("fp32", fp32_runner), ("int8", int8_runner)):
        latency[name] = summarize_times(time_calls(runner, one, warmup=2, repeats=30, min_repeats=5, max_seconds=3.0))
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    return {
        "onnx": int8_path.name,
        "onnx_bytes": int8_bytes,
        "size_ratio": int8_bytes / fp32_bytes,
        "top1_agreement": top1_agreement(fp32_logits, int8_logits),
        "num_inputs": len(inputs),
        "max_abs_diff_vs_fp32": max_abs_diff(fp32_logits, int8_logits),
        "cpu_latency_ms": {name: stats["median_s"] * 1e3 for name, stats in latency.items()},
        "cpu_latency_change": latency["int8"]["median_s"] / latency["fp32"]["median_s"] - 1,
        "cpu_threads": threads if threads is not None else "onnxruntime default",
    }
