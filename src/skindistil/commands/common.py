"""Shared option handling: YAML recipe, then command-line flags, then KEY=VALUE overrides."""

from __future__ import annotations

import argparse


def resolve_config(args: argparse.Namespace, config_cls, flag_keys: dict[str, str]):
    """YAML recipe, then flags, then KEY=VALUE overrides -> a config dataclass. Deprecated keys in the
    recipe and the overrides are read under their current names (with a warning), so a flag or an
    override replaces a recipe's value whichever name either uses."""
    from skindistil.config import apply_overrides, load_yaml, upgrade_keys

    data = upgrade_keys(config_cls, load_yaml(args.config), origin=args.config) if args.config else {}
    flag_overrides = []
    for flag, key in flag_keys.items():
        value = getattr(args, flag, None)
        if value is not None:
            flag_overrides.append(f"{key}={value}")
    if getattr(args, "no_progress", False):
        flag_overrides.append("trainer.progress=false")
    data = apply_overrides(data, flag_overrides)
    data = _keep_strings(data, args, flag_keys)
    data = apply_overrides(data, list(args.overrides), config_cls)
    return config_cls.from_dict(data)


def _keep_strings(data: dict, args: argparse.Namespace, flag_keys: dict[str, str]) -> dict:
    """Paths and names given as flags stay strings even when they look like numbers or booleans."""
    for flag in ("data", "name", "out_dir", "pretrained", "model", "teacher", "teacher_store"):
        value = getattr(args, flag, None)
        if value is not None and flag in flag_keys:
            node = data
            *parents, leaf = flag_keys[flag].split(".")
            for part in parents:
                node = node[part]
            node[leaf] = str(value)
    return data
