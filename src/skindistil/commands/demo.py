"""`skindistil demo`: the main job on the embedded default, i.e. `skindistil run --config quickstart`
(built-in synthetic dermoscopy-like images, tiny models, CPU, minutes). `--data` runs it on real images."""

from __future__ import annotations

import argparse

from skindistil.commands import run as run_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    run_command.add_arguments(p, default_config="quickstart")


def run(args: argparse.Namespace) -> int:
    return run_command.run(args)
