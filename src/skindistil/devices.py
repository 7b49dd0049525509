"""Device names given on the command line or in configs, checked once with a clear error."""

from __future__ import annotations

from skindistil.errors import ConfigError


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
