"""What is known about a benchmarked model before any timing: size, FLOPs, shape, BMA; and the machine.

Definitions
- parameters: elements of `model.parameters()`.
- file size: bytes of an artifact's model.safetensors; for an architecture spec, the bytes its tensors
  would take on disk (sum of numel * element size over the state dict; safetensors adds only a small
  JSON header).
- GFLOPs per image: FLOPs of one forward pass at batch 1 / 1e9, counted by
  `torch.utils.flop_counter.FlopCounterMode`: a multiply-add is 2 FLOPs; matmuls, convolutions and
  attention are counted (also the CPU attention kernel, which FlopCounterMode does not list itself);
  norms, activations, softmax and additions are not (a few % of a ViT).
- weight bytes: the bytes of the weights a backend holds (the first part of a cell's peak memory, see
  `skindistil.bench.models`).
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch
from torch import nn

from skindistil.metric_keys import BALANCED_ACCURACY


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's tensors (what a safetensors file of the model holds, minus its header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weight_bytes(runner) -> int | None:
    """Bytes of the weights a backend holds: the parameters and buffers of the module a PyTorch backend
    runs (in its dtype), or an onnxruntime backend's ONNX file size; None for anything else."""
    module = getattr(runner, "module", None)
    if isinstance(module, nn.Module):
        tensors = [*module.parameters(), *module.buffers()]  # each yields a shared tensor once
        return sum(t.numel() * t.element_size() for t in tensors)
    file_bytes = getattr(runner, "file_bytes", None)
    return int(file_bytes) if file_bytes is not None else None


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    # FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU flash kernel that
    # scaled_dot_product_attention dispatches to on the CPU; without this, attention counts as zero there
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def count_flops(model: nn.Module, image_size: tuple[int, int]) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2), on the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, *image_size, device=device))
    return int(counter.get_total_flops())


def vit_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(depth, width) of a timm ViT or MultiExitViT; (None, None) for other models."""
    vit = getattr(model, "vit", model)
    blocks, width = getattr(vit, "blocks", None), getattr(vit, "embed_dim", None)
    if isinstance(blocks, nn.Sequential) and isinstance(width, int):
        return len(blocks), width
    return None, None


def find_bma(metrics: dict) -> tuple[float | None, str | None]:
    """(BMA, split) from an artifact's metrics as `load_model` reads them (earlier versions' keys already
    today's, `metric_keys`): the test split preferred, else val; (None, None) when neither records a
    finite balanced accuracy.

    Layouts per split: {"balanced_accuracy": x} or {"headline": {"balanced_accuracy": x}}.
    """
    for split in ("test", "val"):
        section = metrics.get(split)
        if not isinstance(section, dict):
            continue
        for source in (section, section.get("headline")):
            if not isinstance(source, dict):
                continue
            value = source.get(BALANCED_ACCURACY)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value), split
    return None, None


def machine_info(device: torch.device, threads: int) -> dict:
    """The machine a benchmark ran on: device and its name, CPU cores, `threads` (torch's), platform and
    the versions of Python, torch, timm and onnxruntime (None when not installed)."""
    import timm

    info = {
        "device": str(device),
        "device_name": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
