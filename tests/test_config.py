"""Config dataclasses: YAML round trip, overrides, type coercion and named errors."""

from __future__ import annotations

import pytest

from skindistil.config import DistillConfig, RunConfig, TrainConfig, apply_overrides, dump_yaml, load_yaml
from skindistil.errors import ConfigError


def test_yaml_round_trip_keeps_every_value(tmp_path):
    cfg = RunConfig.from_dict({"methods": ["distilvit", "cascade"], "teacher": {"optim": {"betas": [0.9, 0.98]}}})
    dump_yaml(cfg.to_dict(), tmp_path / "c.yaml")
    again = RunConfig.from_dict(load_yaml(tmp_path / "c.yaml"))
    assert again == cfg and again.teacher.optim.betas == (0.9, 0.98) and again.methods == ("distilvit", "cascade")


def test_overrides_parse_yaml_values_and_exponent_floats():
    data = apply_overrides({}, ["optim.lr=1e-3", "trainer.max_epochs=3", "model.kwargs={depth: 4}",
                                "data.imbalance=weighted-loss"])
    cfg = TrainConfig.from_dict(data)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.max_epochs == 3 and cfg.model.kwargs == {"depth": 4}
    assert cfg.data.imbalance == "weighted-loss"


def test_bad_values_and_keys_name_the_field():
    with pytest.raises(ConfigError, match="OptimConfig.lr"):
        TrainConfig.from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="unknown field.*epochz"):
        DistillConfig.from_dict({"trainer": {"epochz": 3}})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_yaml("/nonexistent/recipe.yaml")
