"""Config dataclasses: YAML round trip, overrides, type coercion and named errors."""

from __future__ import annotations

import warnings

import pytest

from skindistil.config import (
    DeprecatedKeyWarning,
    DistillConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    dump_yaml,
    load_yaml,
)
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


def test_old_distill_keys_are_read_as_the_new_ones_with_a_warning(tmp_path):
    """distill.keep / distill.strategy (first|uniform) of older recipes: read as keep_blocks /
    block_selection, each with a warning naming the new key; written back under the new names only."""
    recipe = tmp_path / "old.yaml"
    recipe.write_text("name: old\ndistill:\n  keep: 3\n  strategy: uniform\n  trainer: {strategy: ddp}\n")
    with pytest.warns(DeprecatedKeyWarning) as caught:
        cfg = RunConfig.from_dict(load_yaml(recipe))
    assert [str(w.message) for w in caught] == [
        "distill.keep is deprecated: read as distill.keep_blocks=3; rename the key to keep_blocks",
        "distill.strategy is deprecated: read as distill.block_selection='uniform'; rename the key to block_selection",
    ]
    assert (cfg.distill.keep_blocks, cfg.distill.block_selection) == (3, "uniform")
    assert cfg.distill.trainer.strategy == "ddp"  # Lightning's strategy is untouched
    dump_yaml(cfg.to_dict(), tmp_path / "new.yaml")
    written = load_yaml(tmp_path / "new.yaml")["distill"]
    assert (written["keep_blocks"], written["block_selection"]) == (3, "uniform")
    assert "keep" not in written and "strategy" not in written
    # the same recipe read again raises no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunConfig.from_dict(load_yaml(tmp_path / "new.yaml")) == cfg
    # a list of blocks and a distillation recipe of its own
    with pytest.warns(DeprecatedKeyWarning, match=r"^keep is deprecated: read as keep_blocks=\[0, 2\]"):
        assert DistillConfig.from_dict({"keep": [0, 2]}).keep_blocks == [0, 2]


def test_old_and_new_name_together_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"distill\.keep and distill\.keep_blocks are both given"):
        RunConfig.from_dict({"distill": {"keep": 3, "keep_blocks": 4}})
    with pytest.raises(ConfigError, match=r"^strategy and block_selection are both given: strategy is the old name"):
        DistillConfig.from_dict({"strategy": "first", "block_selection": "uniform"})


def test_a_block_selection_and_a_lightning_strategy_are_not_confused():
    # an old recipe's strategy that is not a block selection: refused as a block selection, by name
    with pytest.warns(DeprecatedKeyWarning), pytest.raises(ConfigError, match=r"block_selection: expected first or "
                                                                             r"uniform, got 'ddp' \(Lightning's"):
        DistillConfig.from_dict({"strategy": "ddp"})
    with pytest.raises(ConfigError, match=r"trainer\.strategy: 'uniform' is not a Lightning strategy.*"
                                          r"--block-selection uniform"):
        TrainConfig.from_dict({"trainer": {"strategy": "uniform"}})


def test_overrides_by_either_name_replace_the_recipe_value():
    """A KEY=VALUE override by the old name replaces the recipe's value of the new one (with a warning)
    instead of being refused as both given; keys of other sections are left as they are."""
    recipe = {"distill": {"keep_blocks": 6, "block_selection": "first"}}
    with pytest.warns(DeprecatedKeyWarning, match=r"override distill\.keep=\.\.\.: .*override distill\.keep_blocks"):
        data = apply_overrides(recipe, ["distill.keep=2", "distill.trainer.strategy=ddp"], RunConfig)
    assert data == {"distill": {"keep_blocks": 2, "block_selection": "first", "trainer": {"strategy": "ddp"}}}
    assert RunConfig.from_dict(data).distill.keep_blocks == 2
    # without the config class the keys stay as given
    assert apply_overrides({}, ["distill.keep=2"]) == {"distill": {"keep": 2}}


def test_one_override_list_giving_a_key_under_both_names_is_refused_naming_both():
    """`distill.keep=2 distill.keep_blocks=3` on one command line: which one is meant cannot be told (it
    was: the last one, silently), as for a recipe giving both; the same name twice is an ordinary repeat."""
    recipe = {"distill": {"keep_blocks": 6}}
    for overrides, first, second, key in [
        (["distill.keep=2", "distill.keep_blocks=3"], "distill.keep", "distill.keep_blocks", "distill.keep_blocks"),
        (["distill.block_selection=uniform", "distill.trainer.max_epochs=1", "distill.strategy=first"],
         "distill.block_selection", "distill.strategy", "distill.block_selection"),
    ]:
        with pytest.warns(DeprecatedKeyWarning), pytest.raises(ConfigError) as caught:
            apply_overrides(recipe, overrides, RunConfig)
        assert str(caught.value) == (f"overrides {first}=... and {second}=... both set {key}: one is the old name "
                                     f"of the other; give {key} once")
    with pytest.warns(DeprecatedKeyWarning), pytest.raises(ConfigError, match=r"^overrides keep=\.\.\. and "
                                                                             r"keep_blocks=\.\.\. both set keep_blocks"):
        apply_overrides({}, ["keep=2", "keep_blocks=3"], DistillConfig)
    # one name twice: the last value, as any repeated option
    assert apply_overrides(recipe, ["distill.keep_blocks=2", "distill.keep_blocks=4"], RunConfig) == {
        "distill": {"keep_blocks": 4}}
