"""The key balanced accuracy is written under, and the one place that reads the keys of earlier versions.

Every file skindistil writes names balanced accuracy (BMA) `balanced_accuracy`, with its prefixes and
suffixes: `headline.balanced_accuracy` and `val.balanced_accuracy` in metrics.json, the logged metric
`val/balanced_accuracy` (metrics.csv, TensorBoard, the checkpoint monitor), `per_exit_balanced_accuracy`,
`balanced_accuracy_interval`, `val_balanced_accuracy`, `balanced_accuracy_split`... Human-readable text
(Markdown headers, plots, console lines) says "BMA".

Earlier versions wrote `bma` in these keys (`val.bma` in model/metrics.json, `val/bma` in metrics.csv
and in the ModelCheckpoint / EarlyStopping state of Lightning checkpoints, `bma_interval`,
`per_exit_bma`, `test_bma`...). `current_key` is the one translation from those names to today's; every
reader of a file an earlier version may have written passes its keys through it.
"""

from __future__ import annotations

import re
from typing import Any

from skindistil.errors import DataError

BALANCED_ACCURACY = "balanced_accuracy"

# `bma` as a whole word of a key: not inside a longer name (`val/bma`, `per_exit_bma`, `bma_interval`,
# "ModelCheckpoint{'monitor': 'val/bma', ...}")
_LEGACY_WORD = re.compile(r"(?<![A-Za-z0-9])bma(?![A-Za-z0-9])")


def current_key(key: str) -> str:
    """`key` as today's files write it: the word `bma` (the name of balanced accuracy in files of
    earlier versions of skindistil) becomes `balanced_accuracy`; any other key is returned unchanged.

    "val/bma" -> "val/balanced_accuracy", "per_exit_bma" -> "per_exit_balanced_accuracy",
    "bma_interval" -> "balanced_accuracy_interval", "accuracy" -> "accuracy".
    """
    return _LEGACY_WORD.sub(BALANCED_ACCURACY, key)


def with_current_keys(data: Any, where: str) -> Any:
    """JSON-like `data` read from `where` (dicts, lists, scalars) with every dict key passed through
    `current_key`, at every depth; values are unchanged. DataError naming `where` and both keys when one
    dict holds a key under its old and its new name (which one holds the number cannot be told)."""
    if isinstance(data, dict):
        out, source = {}, {}
        for key, value in data.items():
            new = current_key(key) if isinstance(key, str) else key
            if new in out:
                raise DataError(where, f"keys {source[new]!r} and {key!r} both mean {new!r} (an old and a new name); "
                                       "which one holds the number cannot be told")
            out[new], source[new] = with_current_keys(value, where), key
        return out
    if isinstance(data, list):
        return [with_current_keys(value, where) for value in data]
    return data
