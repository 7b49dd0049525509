"""Metrics per patient subgroup (sex, age band, anatomical site, skin type), with intervals and the
largest gap between subgroups.

Attributes are read from the manifest's metadata columns (`subgroup_attributes`):

- ``sex`` and ``site`` as given;
- ``age`` in the bands <30, 30-44, 45-59, 60-74, 75+ (years);
- skin type: a ``fitzpatrick`` (or ``fitzpatrick_skin_type``, ``skin_type``) column as given, and an
  ``ita`` column (individual typology angle, degrees) in the categories of Chardon et al. (1991):
  very light > 55, light 41-55, intermediate 28-41, tan 10-28, brown -30-10, dark <= -30.

An attribute appears only when at least one image has a value. Images without one form the group
"(missing)", listed with its count but never used for the gap. A group with fewer than `min_size`
images is reported as too small and not scored. Each scored group gets BMA and accuracy with bootstrap
intervals; all groups are resampled jointly (the same resampled units for every group), so the gap
between the best and the worst scored group (by BMA) gets an interval too. Within a group, BMA averages
the classes present in it (their number is listed): groups holding different classes are not strictly
comparable, which the report says.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from skindistil.errors import DataError
from skindistil.evaluation.bootstrap import (
    DEFAULT_BOOTSTRAP,
    BootstrapSettings,
    WeightedScorer,
    percentile_interval,
    resample,
)
from skindistil.evaluation.metrics import (
    AbsentClassWarning,
    accuracy,
    balanced_accuracy,
    class_support,
    decide,
)

MISSING = "(missing)"
DEFAULT_MIN_SIZE = 30
AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (float("inf"), "75+"))
ITA_CATEGORIES = ((-30, "dark"), (10, "brown"), (28, "tan"), (41, "intermediate"), (55, "light"),
                  (float("inf"), "very light"))  # upper bounds (inclusive), Chardon et al. 1991
SKIN_TYPE_COLUMNS = ("fitzpatrick", "fitzpatrick_skin_type", "skin_type")


def age_band(value: str, where: str = "age") -> str:
    """The band of an age in years ("" -> MISSING); DataError naming `where` for a non-number."""
    number = _number(value, where)
    if number is None:
        return MISSING
    if number < 0:
        raise DataError(where, f"age {value!r} is negative")
    return next(label for upper, label in AGE_BANDS if number < upper)


def ita_category(value: str, where: str = "ita") -> str:
    """Chardon's skin colour category of an ITA angle in degrees ("" -> MISSING)."""
    number = _number(value, where)
    if number is None:
        return MISSING
    if not -90 <= number <= 90:
        raise DataError(where, f"ITA {value!r} is outside [-90, 90] degrees")
    return next(label for upper, label in ITA_CATEGORIES if number <= upper)


def subgroup_attributes(frame: pd.DataFrame, where: str = "manifest") -> dict[str, list[str]]:
    """Attribute name -> group label of each row of `frame` (manifest rows; see the module docstring).
    `where` names the file in errors (with the row's image_id)."""
    def at(i, column):
        image = frame["image_id"].iloc[i] if "image_id" in frame.columns else i
        return f"{where}, image {image}, column {column!r}"

    def text(column):
        return ["" if pd.isna(v) else str(v).strip() for v in frame[column]]

    out: dict[str, list[str]] = {}
    if "sex" in frame.columns:
        out["sex"] = [v.lower() or MISSING for v in text("sex")]
    if "age" in frame.columns:
        out["age band"] = [age_band(v, at(i, "age")) for i, v in enumerate(text("age"))]
    if "site" in frame.columns:
        out["site"] = [v or MISSING for v in text("site")]
    skin = next((c for c in SKIN_TYPE_COLUMNS if c in frame.columns), None)
    if skin is not None:
        out["skin type"] = [v or MISSING for v in text(skin)]
    if "ita" in frame.columns:
        out["ITA"] = [ita_category(v, at(i, "ita")) for i, v in enumerate(text("ita"))]
    return {name: groups for name, groups in out.items() if any(g != MISSING for g in groups)}


def subgroup_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     attributes: dict[str, Sequence[str]], units: Sequence[str] | None = None,
                     settings: BootstrapSettings = DEFAULT_BOOTSTRAP, min_size: int = DEFAULT_MIN_SIZE) -> dict:
    """BMA and accuracy per subgroup, with intervals, and the largest BMA gap per attribute.

    probs (N, K), labels (N,), attributes: name -> group label per image (`subgroup_attributes`).
    Returns {"min_size", "attributes": {name: {"groups": [{"group", "count", "scored", "classes_present",
    "balanced_accuracy", "balanced_accuracy_interval", "accuracy", "accuracy_interval"}], "gap": {"best", "worst",
    "value", "interval"} or None}}}. Groups are listed largest first, MISSING last.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    names = list(class_names)
    k = len(names)
    labels = np.asarray(labels, dtype=np.int64)
    preds = decide(probs)
    scorer = WeightedScorer(probs, labels, k)
    result = {"min_size": min_size, "attributes": {}}
    for attribute, groups in attributes.items():
        groups = np.asarray([str(g) if g else MISSING for g in groups], dtype=object)
        if len(groups) != len(labels):
            raise ValueError(f"attribute {attribute!r}: {len(groups)} values for {len(labels)} images")
        found = pd.Series(groups).value_counts()
        order = [g for g in found.index if g != MISSING] + ([MISSING] if MISSING in found.index else [])
        rows, masks = [], {}
        for group in order:
            mask = groups == group
            count = int(mask.sum())
            row = {"group": str(group), "count": count, "scored": count >= min_size,
                   "classes_present": int(np.sum(class_support(labels[mask], k) > 0)),
                   "balanced_accuracy": None, "balanced_accuracy_interval": None, "accuracy": None,
                   "accuracy_interval": None}
            if row["scored"]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", AbsentClassWarning)  # a group holds only some classes
                    row["balanced_accuracy"] = balanced_accuracy(labels[mask], preds[mask], k)
                row["accuracy"] = accuracy(labels[mask], preds[mask])
                masks[str(group)] = mask.astype(float)
            rows.append(row)
        comparable = [r for r in rows if r["scored"] and r["group"] != MISSING]
        gap = None
        if len(comparable) >= 2:
            best = max(comparable, key=lambda r: r["balanced_accuracy"])
            worst = min(comparable, key=lambda r: r["balanced_accuracy"])
            gap = {"best": best["group"], "worst": worst["group"],
                   "value": best["balanced_accuracy"] - worst["balanced_accuracy"], "interval": None}
        if settings.enabled and masks:
            def per_group(w, masks=masks):
                out = {}
                for group, mask in masks.items():
                    counts = scorer.counts(w * mask)
                    out[f"balanced_accuracy:{group}"] = scorer.balanced_accuracy(counts)
                    out[f"acc:{group}"] = _ratio(counts["correct"], counts["total"])
                return out

            values = resample(per_group, units, len(labels), settings)
            conf = settings.confidence
            for row in rows:
                if row["scored"]:
                    row["balanced_accuracy_interval"] = percentile_interval(
                        values[f"balanced_accuracy:{row['group']}"], conf)
                    row["accuracy_interval"] = percentile_interval(values[f"acc:{row['group']}"], conf)
            if gap is not None:
                gap["interval"] = percentile_interval(
                    values[f"balanced_accuracy:{gap['best']}"] - values[f"balanced_accuracy:{gap['worst']}"], conf)
        result["attributes"][attribute] = {"groups": rows, "gap": gap}
    return result


def _number(value: str, where: str) -> float | None:
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise DataError(where, f"{text!r} is not a number") from None
    if not np.isfinite(number):
        raise DataError(where, f"{text!r} is not a finite number")
    return number


def _ratio(num, den):
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=np.asarray(den) > 0)
