"""`skindistil explain`: attention-rollout heat maps over images, one PNG per image (image | overlay).

    skindistil explain --model runs/student/model lesion.jpg photos/ --out explain/
    skindistil explain --model runs/teacher lesion.jpg --out explain/ --method grad-rollout --class MEL

Writes OUT/<stem>_<method>.png with the predicted class and its probability in the title. Unreadable
images are listed on stderr and skipped. Exit code 0 if any PNG was written, 1 if none.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="artifact: model/ or run directory"
    )
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, folders (searched recursively) or CSVs with a 'path' or 'image' column",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the PNGs")
    parser.add_argument(
        "--method",
        choices=["rollout", "grad-rollout"],
        default="rollout",
        help="rollout: attention rollout (class-agnostic); grad-rollout: gradient-weighted, class-specific "
        "(default rollout)",
    )
    parser.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="class grad-rollout explains (default: the predicted one)",
    )
    parser.add_argument(
        "--head-fusion",
        choices=["mean", "max"],
        default="mean",
        help="how rollout combines heads (default mean)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.data.discovery import discover_images
    from skindistil.errors import ConfigError, ModelError
    from skindistil.inference.explain import explain_images, explainable
    from skindistil.models.artifact import load_model

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    loaded = load_model(args.model, args.device)
    reason = explainable(loaded.model)
    if reason is not None:
        raise ModelError(f"{loaded.path}: {reason}")
    if args.class_name is not None and args.class_name not in loaded.classes:
        raise ConfigError(
            f"--class {args.class_name}: not one of the model's classes ({', '.join(loaded.classes)})"
        )
    if args.class_name is not None and args.method == "rollout":
        err.print("note: rollout is class-agnostic; --class only changes grad-rollout maps", markup=False)
    found = discover_images(args.images, read_lists=True)
    problems = []
    written = explain_images(
        loaded, found.files, args.out, args.method, args.class_name, args.head_fusion, on_error=problems.append
    )
    for problem in found.not_taken:
        err.print(f"not taken {problem.where}: {problem.reason}", markup=False)
    for problem in problems:
        err.print(f"failed {problem.where}: {problem.reason}", markup=False)
    err.print(
        f"wrote {len(written)} PNG(s) to {args.out}, {len(problems)} failed, {len(found.not_taken)} not taken",
        markup=False,
    )
    return 0 if written else 1
