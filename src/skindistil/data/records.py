"""The unit every dataset source yields: one labelled image and where to read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Record:
    """One labelled image.

    `source` locates the pixels: a file path, or a source-specific reference such as
    ``file.npz#train/17`` or ``synthetic://seed/17``; the source object that produced the record
    knows how to open it. `group` is the lesion id (None when unknown): images of one group never
    land on two sides of a split. `split` is a predefined split (DermaMNIST), else None.
    """

    image_id: str
    source: str
    label: int
    group: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Problem:
    """An input item that was skipped, and why (goes to prepare_report.json)."""

    where: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "reason": self.reason}
