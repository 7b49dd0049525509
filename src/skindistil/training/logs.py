"""RUN/logs/metrics.csv that keeps its whole history across kills and resumes.

Lightning's CSVLogger deletes metrics.csv when a run starts (a resumed run loses every row written
before the kill) and buffers rows in memory for 100 steps (a kill loses them too). `HistoryCSVLogger`
appends each row as it is logged, and rewrites the file atomically only when a new column appears.
On resume it keeps the rows logged before the checkpoint's step and drops the later ones, which the
resumed run logs again: the file ends up with the rows of the uninterrupted run.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from skindistil.errors import DataError, WriteError
from skindistil.files import atomic_open, describe_os_error
from skindistil.metric_keys import with_current_keys

METRICS_FILE = "metrics.csv"


def read_history(path: Path, before_step: int | None) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of an existing metrics.csv, keeping rows whose `step` is below `before_step`
    (all rows when None). A last line without its newline (cut short by a kill) is dropped. Columns an
    earlier version named otherwise come back under today's names (`val/bma` -> `val/balanced_accuracy`,
    `metric_keys.with_current_keys`), so a resumed run continues them in one column.
    DataError naming the file and line when a row has no valid step, or the file when the header holds
    a metric under its old and its new name."""
    if not path.is_file():
        return [], []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    columns = list(with_current_keys(dict.fromkeys(reader.fieldnames or []), str(path)))
    reader.fieldnames = columns  # every row keyed by today's names, translated once
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            step = int(float(row["step"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{line}", f"row without a valid step ({row.get('step')!r})") from None
        if before_step is None or step < before_step:
            rows.append(row)
    return columns, rows


class HistoryCSVLogger(Logger):
    """CSV metrics logger writing `save_dir/name/metrics.csv` (columns sorted, `epoch` and `step`
    included, one row per `log_metrics` call), rank 0 only.

    `resume_step`: the global step of the checkpoint a resumed run starts from; rows at that step or
    later are dropped from the existing file. None: a fresh run, the old file is replaced.
    Raises WriteError naming the file when it cannot be written.
    """

    def __init__(self, save_dir: str | Path, name: str = "logs", resume_step: int | None = None):
        super().__init__()
        self._save_dir = Path(save_dir)
        self._name = name
        self.path = self._save_dir / name / METRICS_FILE
        self._columns: list[str] = []
        self._rows: list[dict[str, Any]] = []
        self._loaded = False
        self.resume_step = resume_step

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def log_dir(self) -> str:
        return str(self._save_dir / self._name)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.resume_step is not None:
            self._columns, self._rows = read_history(self.path, self.resume_step)
        self._rewrite()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Hyperparameters live in RUN/config.yaml; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._load()
        row = {key: (value.item() if hasattr(value, "item") else value) for key, value in metrics.items()}
        row["step"] = len(self._rows) if step is None else int(step)
        self._rows.append(row)
        if set(row) - set(self._columns):
            self._columns = sorted(set(self._columns) | set(row))
            self._rewrite()
        else:
            self._append(row)

    def _rewrite(self) -> None:
        if not self._columns:
            self.path.unlink(missing_ok=True)  # a fresh run that has logged nothing yet
            return
        with atomic_open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self._rows)

    def _append(self, row: dict) -> None:
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self._columns, lineterminator="\n").writerow(row)
        try:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                f.write(buffer.getvalue())
        except OSError as exc:
            raise WriteError(self.path, f"cannot append a row: {describe_os_error(exc)}") from exc

    @rank_zero_only
    def save(self) -> None:
        """Every row is on disk as soon as it is logged."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._load()
