"""`skindistil explain`: heat maps of where a model looks, one PNG per image (image | overlay), and
with `--masks` their scores against lesion masks.

    skindistil explain --model runs/student/model lesion.jpg photos/ --out explain/
    skindistil explain --model runs/teacher lesion.jpg --out explain/ --method grad-rollout --class MEL
    skindistil explain --model runs/student images/ --masks masks/ --reference runs/teacher --out loc/

Writes OUT/<stem>_<method>.png with the predicted class and its probability in the title. With
--masks: OUT/localization.csv (per image and method), localization.json and localization.md (means
with 95% intervals, random-map and centre-prior baselines); overlays only with --overlays. Unreadable
images, and with --masks images without one, are listed on stderr and skipped. Exit code 0 if
anything was written, 1 if not.
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
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the outputs")
    parser.add_argument(
        "--method",
        action="append",
        choices=["rollout", "grad-rollout", "gradcam"],
        help="ViTs: rollout (attention rollout, class-agnostic) or grad-rollout (gradient-weighted, "
        "class-specific); CNNs: gradcam (Grad-CAM via captum, the `explain` extra). Repeatable. Default: "
        "rollout (ViT) or gradcam (CNN); with --masks every method of the architecture",
    )
    parser.add_argument(
        "--class",
        dest="class_name",
        metavar="NAME",
        help="class grad-rollout/gradcam explain in the PNGs (default: the predicted one)",
    )
    parser.add_argument(
        "--masks",
        metavar="DIR_OR_PATTERN",
        help="score the maps against lesion masks: a folder holding <stem>_segmentation.png, "
        "<stem>_Segmentation.png, <stem>_mask.png or <stem>.png, or a pattern such as masks/{stem}_seg.png",
    )
    parser.add_argument("--reference", type=Path, metavar="DIR",
                        help="with --masks: a second model (e.g. the student's teacher) whose maps are compared "
                             "with this one's (map correlation, mass-in-lesion retention)")
    parser.add_argument("--per-exit", action="store_true",
                        help="with --masks: score every exit of a model with per-depth heads (FCViT)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-map baseline and the bootstrap")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction,
                        help="write the PNGs (default: on, off with --masks)")
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
    from skindistil.inference.explain import (
        CLASS_SPECIFIC,
        check_method,
        explain_images,
        explainable,
        methods_for,
    )
    from skindistil.models.artifact import load_model

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    loaded = load_model(args.model, args.device)
    reason = explainable(loaded.model)
    if reason is not None:
        raise ModelError(f"{loaded.path}: {reason}")
    methods = list(dict.fromkeys(args.method or []))
    if not methods:
        methods = list(methods_for(loaded.model)) if args.masks else [methods_for(loaded.model)[0]]
    for method in methods:
        check_method(loaded.model, method)
    if args.masks is None and (args.reference is not None or args.per_exit):
        raise ConfigError("--reference and --per-exit score maps against lesion masks: give --masks DIR_OR_PATTERN")
    if args.class_name is not None and args.class_name not in loaded.classes:
        raise ConfigError(
            f"--class {args.class_name}: not one of the model's classes ({', '.join(loaded.classes)})"
        )
    if args.class_name is not None and not CLASS_SPECIFIC.intersection(methods):
        err.print("note: rollout is class-agnostic; --class only changes grad-rollout and gradcam maps", markup=False)
    found = discover_images(args.images, read_lists=True)
    for problem in found.not_taken:
        err.print(f"not taken {problem.where}: {problem.reason}", markup=False)
    overlays = args.overlays if args.overlays is not None else args.masks is None
    wrote = False
    if overlays:
        problems = []
        written = []
        for method in methods:
            written += explain_images(loaded, found.files, args.out, method, args.class_name, args.head_fusion,
                                      on_error=problems.append)
        for problem in problems:
            err.print(f"failed {problem.where}: {problem.reason}", markup=False)
        err.print(f"wrote {len(written)} PNG(s) to {args.out}, {len(problems)} failed, "
                  f"{len(found.not_taken)} not taken", markup=False)
        wrote = bool(written)
    if args.masks is not None:
        wrote = _localize(args, loaded, found.files, methods, err) or wrote
    return 0 if wrote else 1


def _localize(args, loaded, files, methods, err) -> bool:
    from rich.console import Console

    from skindistil.data.masks import MaskLocator
    from skindistil.errors import DataError
    from skindistil.inference.localization import localize_and_write, masked_files
    from skindistil.models.artifact import load_model

    reference = load_model(args.reference, args.device) if args.reference is not None else None
    problems = []
    items = list(masked_files(loaded, files, MaskLocator(args.masks), problems.append))
    for problem in problems:
        err.print(f"not scored {problem.where}: {problem.reason}", markup=False)
    notes = [f"{len(problems)} image(s) not scored (no mask, or unreadable): listed on stderr"] if problems else []
    try:
        summary = localize_and_write(loaded, items, args.out, methods, reference=reference, per_exit=args.per_exit,
                                     seed=args.seed, head_fusion=args.head_fusion,
                                     title=f"Where {loaded.path} looks", notes=notes)
    except DataError as exc:
        err.print(f"no localization scores: {exc}", markup=False)
        return False
    Console(highlight=False, soft_wrap=True).print(Path(summary["files"]["md"]).read_text(), markup=False)
    err.print(f"scored {summary['images']} image(s) against their masks, {len(problems)} not scored; wrote "
              f"{', '.join(summary['files'].values())}", markup=False)
    return True
