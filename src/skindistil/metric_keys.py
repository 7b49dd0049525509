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

import json
from pathlib import Path
from typing import Any

from skindistil.errors import DataError

BALANCED_ACCURACY = "balanced_accuracy"

# Every key earlier versions wrote balanced accuracy under, and its name today. An exact table, not a
# pattern: keys that are data (class names, run labels, subgroup values) are never renamed.
LEGACY_KEYS = {
    "bma": BALANCED_ACCURACY,
    "val/bma": f"val/{BALANCED_ACCURACY}",
    "val_bma": f"val_{BALANCED_ACCURACY}",
    "test_bma": f"test_{BALANCED_ACCURACY}",
    "delta_test_bma": f"delta_test_{BALANCED_ACCURACY}",
    "bma_interval": f"{BALANCED_ACCURACY}_interval",
    "bma_split": f"{BALANCED_ACCURACY}_split",
    "per_exit_bma": f"per_exit_{BALANCED_ACCURACY}",
}


def current_key(key: str) -> str:
    """`key` as today's files write it: a key of `LEGACY_KEYS` (how earlier versions of skindistil named
    balanced accuracy) becomes today's name; any other key is returned unchanged.

    "val/bma" -> "val/balanced_accuracy", "per_exit_bma" -> "per_exit_balanced_accuracy",
    "bma_interval" -> "balanced_accuracy_interval", "accuracy" -> "accuracy", "bma-student" -> itself.
    """
    return LEGACY_KEYS.get(key, key)


def current_state_key(key: str) -> str:
    """A Lightning callback state key ("ModelCheckpoint{'monitor': 'val/bma', 'mode': 'max', ...}") with the
    monitored metric's old name replaced by today's (`LEGACY_KEYS`)."""
    for old, new in LEGACY_KEYS.items():
        key = key.replace(f"'{old}'", f"'{new}'")
    return key


def read_results(path: str | Path) -> Any:
    """A JSON file of results an earlier version may have written (metrics.json, family.json, bench.json...),
    its keys as today's (`with_current_keys`). Bare NaN, which earlier versions wrote, is read as NaN."""
    return with_current_keys(json.loads(Path(path).read_text()), str(path))


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
