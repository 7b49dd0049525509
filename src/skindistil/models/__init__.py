"""Models: teacher factory (timm), weight import, student extraction, per-depth exits, artifact io."""

from skindistil.models.artifact import (
    LoadedModel,
    build_model,
    load_model,
    model_architecture,
    resolve_model_dir,
    save_artifact,
    update_metrics,
)
from skindistil.models.multi_exit import MultiExitViT
from skindistil.models.student import ExtractedStudent, extract_student, select_blocks
from skindistil.models.teacher import DEFAULT_TEACHER, create_teacher
from skindistil.models.weights import WeightReport, load_weights

__all__ = [
    "DEFAULT_TEACHER",
    "MultiExitViT",
    "ExtractedStudent",
    "LoadedModel",
    "WeightReport",
    "build_model",
    "create_teacher",
    "extract_student",
    "load_model",
    "load_weights",
    "model_architecture",
    "resolve_model_dir",
    "save_artifact",
    "select_blocks",
    "update_metrics",
]
