"""The `skindistil` entry point: parse, call, print. Each subcommand lives in skindistil.commands.<module>."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from skindistil.errors import SkinDistilError
from skindistil.version import __version__

# name -> (module under skindistil.commands, one-line help). Command modules import only argparse at
# the top and the heavy libraries inside run(), so building the parser stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "decode, border-crop, resize and cache a dataset; write manifest and splits"),
    "duplicates": ("duplicates", "list the images of one prepared dataset that duplicate images of another"),
    "bench-data": ("bench_data", "measure prepare and training-loader throughput"),
    "train": ("train", "train a ViT teacher (or any timm classifier) with Lightning"),
    "distill": ("distill", "distill a teacher: distilvit, fcvit, fcvit-probs, cascade or full"),
    "store-teacher": ("store_teacher", "run a teacher once over the planned epochs and store its outputs for distill"),
    "ablate": ("ablate", "train the student with each loss term removed in turn; BMA and retention per variant"),
    "run": ("run", "the main job: prepare, teacher, students, evaluation, benchmark, report"),
    "demo": ("demo", "the main job on the embedded default (run --config quickstart)"),
    "evaluate": ("evaluate", "score a model on a split, or an ISIC-format predictions CSV against ground truth"),
    "benchmark": ("benchmark", "size, FLOPs, latency and throughput of models and backends; teacher/student ratios"),
    "export": ("export", "export a model to ONNX (optionally int8) with a parity check"),
    "predict": ("predict", "predict image files, folders or a CSV of paths with a model artifact"),
    "explain": ("explain", "heat maps of where a model looks, scored against lesion masks with --masks"),
    "serve": ("serve", "REST API and web page for a model artifact"),
    "push": ("push", "upload a model artifact to the Hugging Face Hub (timm reads it there as it is)"),
}


# Commands whose DataLoader workers share the cores with torch's OpenMP threads. libgomp's default
# lets a waiting thread spin for 300,000 iterations before it sleeps: harmless on an idle machine, but
# beside a loader worker or another program those spinning threads take the cores the work needs, and
# training on 2 busy cores ran 29x slower instead of the ~6x the lost cores explain. A passive wait
# policy (set before torch loads, and only when the user set neither variable) degrades gracefully.
TRAINING_COMMANDS = frozenset({"train", "distill", "store-teacher", "ablate", "run", "demo"})


def openmp_wait_policy(command: str, environ: dict) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` for a training command unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is already set."""
    if command in TRAINING_COMMANDS and "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skindistil",
        description="Train, distill, measure, explain, export and serve ViT skin-lesion classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"skindistil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _command_module(module).add_arguments(p)
    return parser


def _command_module(module: str):
    return importlib.import_module(f"skindistil.commands.{module}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    openmp_wait_policy(args.command, os.environ)
    try:
        return int(_command_module(args._module).run(args) or 0)
    except SkinDistilError as exc:
        print(f"skindistil {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # a full disk, a read-only or forbidden folder: one line naming the path, not a traceback
        if exc.errno is None:
            raise
        print(f"skindistil {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"skindistil {args.command}: interrupted", file=sys.stderr)
        return 130


def os_error_message(exc: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)' (both paths for a rename or link)."""
    from skindistil.files import describe_os_error

    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = describe_os_error(exc)
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":
    sys.exit(main())
