"""Device names given on the command line or in configs, checked once with a clear error; the CPU
cores this process may use."""

from __future__ import annotations

import os

from skindistil.errors import ConfigError


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else the core
    count), at least 1: the default of every worker count (prepare, loaders, predict, serve)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def parse_device(name: str):
    """`cpu`, `cuda` or `cuda:N` -> torch.device; ConfigError when unknown or CUDA is missing."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine")
    return device
