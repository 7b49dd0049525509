"""The unit every dataset source yields: one labelled image and where to read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Patient and lesion metadata kept per image in the manifest (for subgroup analysis), under these names
# whatever each dataset calls them: age (years, as given: ISIC rounds to 5), sex, site (anatomical
# site), patient_id, lesion_id, and skin type where a dataset records it: fitzpatrick (Fitzpatrick
# type as given, e.g. I-VI) and ita (individual typology angle, degrees). A missing value is "".
METADATA_FIELDS = ("age", "sex", "site", "patient_id", "lesion_id", "fitzpatrick", "ita")
_MISSING_VALUES = frozenset({"", "nan", "na", "n/a", "none", "null", "unknown"})


@dataclass(frozen=True)
class Record:
    """One labelled image.

    `source` locates the pixels: a file path, or a source-specific reference such as
    ``file.npz#train/17`` or ``synthetic://seed/17``; the source object that produced the record
    knows how to open it. `group` is the lesion id (None when unknown): images of one group never
    land on two sides of a split. `split` is a predefined split (DermaMNIST, a split-folder tree), else
    None. `meta` holds source-specific fields; the METADATA_FIELDS among them go to the manifest.
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


def standard_metadata(**values: object) -> dict[str, str]:
    """The METADATA_FIELDS given as keywords, cleaned: stripped text, missing markers ("", "nan", "NA",
    "unknown", ...) as "", whole numbers without a decimal part ("55.0" -> "55"). Unknown names raise."""
    unknown = sorted(set(values) - set(METADATA_FIELDS))
    if unknown:
        raise ValueError(f"not metadata fields: {unknown}; expected {', '.join(METADATA_FIELDS)}")
    out = {}
    for name, value in values.items():
        text = "" if value is None else str(value).strip()
        if text.lower() in _MISSING_VALUES:
            text = ""
        elif name == "age":
            try:
                number = float(text)
            except ValueError:
                pass
            else:
                text = str(int(number)) if number.is_integer() else text
        out[name] = text
    return out
