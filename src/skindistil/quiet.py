"""Silence third-party messages that are not the user's concern; keep every one that is.

Lightning prints, on every `fit`: a deprecation from its own pytree helper (`LeafSpec`, fixed
upstream, nothing a user can do), an advertisement for a logging service, a note that it reads the
train loader to count steps, and, for epochs shorter than `log_every_n_steps`, a hint about step
logging (skindistil logs every metric per epoch, so nothing is lost). Warnings about the user's
data, configuration or hardware are left alone.
"""

from __future__ import annotations

import logging
import re
import warnings

_WARNINGS = (
    r".*LeafSpec.*is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
_INFO = re.compile(r"litlogger|Loading `train_dataloader` to estimate number of stepping batches")
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _INFO.search(record.getMessage())


_FILTER = _DropNoise()


def silence_third_party_noise() -> None:
    """Install the warning and log filters (idempotent)."""
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
