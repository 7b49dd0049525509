"""The operating points an artifact stores in config.json (``evaluate --operating-point``), validated.

    "operating_points": {
      "fitted_on": "DATA_DIR:val",      where the thresholds were chosen
      "temperature": 1.0,              the softmax temperature they were chosen at
      "default": "cancer@sens95",      the point predict and serve report unless told otherwise
      "points": {"cancer@sens95": {"view": "cancer", "positive_classes": ["MEL", "BCC", "SCC"],
                 "target": "sensitivity", "level": 0.95, "threshold": 0.21,
                 "validation": {"sensitivity": 0.95, "specificity": 0.62, "positives": 40, "negatives": 160}},
                 ...}
    }

A point decides "positive" when the summed probabilities of its positive classes (over the row sum)
are >= its threshold (`skindistil.evaluation.operating_points`). Thresholds are probabilities at one
temperature, so an artifact whose calibration changed since is refused.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from skindistil.errors import ModelError

CONFIG_KEY = "operating_points"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValidationRates(_Strict):
    sensitivity: float = Field(ge=0.0, le=1.0)
    specificity: float = Field(ge=0.0, le=1.0)
    positives: int = Field(ge=1)
    negatives: int = Field(ge=1)


class OperatingPoint(_Strict):
    view: Literal["cancer", "melanoma"]
    positive_classes: list[str] = Field(min_length=1)
    target: Literal["sensitivity", "specificity"]
    level: float = Field(gt=0.0, lt=1.0)
    threshold: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    validation: ValidationRates

    @property
    def name(self) -> str:
        return f"{self.view}@{self.target[:4]}{round(self.level * 100)}"


class OperatingPoints(_Strict):
    fitted_on: str
    temperature: float = Field(gt=0.0, allow_inf_nan=False)
    default: str
    points: dict[str, OperatingPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> OperatingPoints:
        for name, point in self.points.items():
            if name != point.name:
                raise ValueError(f"point {name!r} describes {point.name!r} (view@sens|specLEVEL)")
        if self.default not in self.points:
            raise ValueError(f"default {self.default!r} is not one of the points ({', '.join(self.points)})")
        return self


def parse_operating_points(config: dict, where: str) -> OperatingPoints | None:
    """The validated ``operating_points`` of an artifact config (None when absent).

    Checks the schema above, that every positive class is a model class, and that the points were
    chosen at the artifact's current temperature. Raises ModelError naming `where` and the field.
    """
    raw = config.get(CONFIG_KEY)
    if raw is None:
        return None
    try:
        stored = OperatingPoints.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, (CONFIG_KEY, *first["loc"])))
        raise ModelError(f"{where}: field {field!r}: {first['msg']}") from None
    classes = list(config.get("classes", []))
    for name, point in stored.points.items():
        unknown = [c for c in point.positive_classes if c not in classes]
        if unknown:
            raise ModelError(f"{where}: field '{CONFIG_KEY}.points.{name}.positive_classes': "
                             f"{', '.join(unknown)} not among the model's classes {', '.join(classes)}")
    temperature = float(config.get("calibration", {}).get("temperature", 1.0))
    if not math.isclose(stored.temperature, temperature, rel_tol=1e-9):
        raise ModelError(f"{where}: field '{CONFIG_KEY}.temperature': the thresholds were chosen at softmax "
                         f"temperature {stored.temperature:g} but the model now uses {temperature:g}; choose them "
                         "again with `skindistil evaluate --operating-point`")
    return stored
