"""`skindistil evaluate`: score a model artifact on a prepared split, or a predictions CSV in the ISIC 2019,
SIIM-ISIC 2020 or ISIC 2024 submission format."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions",
        type=Path,
        metavar="PRED.csv",
        help="predictions: ISIC 2019 (image + one probability column per class), SIIM-ISIC 2020 "
             "(image_name,target) or ISIC 2024 (isic_id,target), told apart by the id column",
    )
    parser.add_argument(
        "--truth",
        type=Path,
        metavar="GT.csv",
        help="ground truth in the submission's format: ISIC 2019 one-hot (its class columns set the order; UNK is "
             "a class only when some row is UNK, as in the ISIC 2019 test truth; score_weight 0 rows are not "
             "scored); SIIM-ISIC 2020 train.csv (image_name, target); ISIC 2024 train-metadata.csv (isic_id, target)",
    )
    parser.add_argument("--unk-threshold", type=float, metavar="T",
                        help="with --predictions and a truth with UNK rows: score an 8-class predictions file by "
                             "the maximum-softmax-probability rule, UNK when the top class score is below T")
    parser.add_argument("--model", type=Path, metavar="DIR", help="model artifact (model/ or run directory)")
    parser.add_argument("--data", type=Path, metavar="DATA_DIR", help="prepared dataset (with --model)")
    parser.add_argument("--split", default="test", help="split to score with --model (default test)")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit a softmax temperature on the validation split and store it in the artifact")
    parser.add_argument("--operating-point", nargs="?", const="auto", metavar="DEFAULT",
                        help="with --model: choose cancer-vs-non-cancer and melanoma-vs-rest thresholds (sensitivity "
                             "and specificity 80/90/95%%) on the validation split, store them in the artifact and "
                             "report them on --split; DEFAULT names the point predict/serve report "
                             "(default cancer@sens95, else melanoma@sens95)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples behind the 95%% intervals (of patients or lesions where the manifest has "
                             "them, else images; seed 42); 0 for none (default 1000)")
    parser.add_argument("--subgroup-min-size", type=int, default=30, metavar="N",
                        help="with --model: subgroups (sex, age band, site, skin type) with fewer images are "
                             "reported as too small, not scored (default 30)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="data loader processes (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output directory (default: RUN/eval/SPLIT with --model, <PRED dir>/<PRED name>_eval with --predictions)",
    )
    parser.add_argument("--exit-threshold", type=float, metavar="TAU",
                        help="with --model (per-depth heads): stop each image at the first exit whose softmax "
                             "confidence >= TAU; report BMA, mean depth used and throughput vs full depth "
                             "(written to RUN/eval/SPLIT/exit-TAU)")
    parser.add_argument("--sweep-exits", action="store_true",
                        help="with --model (per-depth heads): BMA vs mean depth over a grid of thresholds, "
                             "written to RUN/eval/SPLIT/early_exit.{png,md,json}")
    parser.add_argument("--thresholds", type=_floats, metavar="T1,T2,...",
                        help="thresholds for --sweep-exits (default 0.3,0.4,...,0.99; full depth is always added)")
    group = parser.add_argument_group("where the model looks (a split prepared with --masks)")
    group.add_argument("--localization", action="store_true",
                       help="with --model: also score the model's explanations against the split's lesion masks "
                            "(mass in lesion, pointing game, pixel AUC, with random and centre-prior baselines), "
                            "written to OUT/localization.{csv,json,md}")
    group.add_argument("--explain-method", action="append", choices=["rollout", "grad-rollout", "gradcam"],
                       help="method to score (repeatable; default every method of the architecture)")
    group.add_argument("--reference", type=Path, metavar="DIR",
                       help="compare the maps with this model's (e.g. the teacher): correlation, retention")
    group.add_argument("--per-exit", action="store_true", help="score every exit of a per-depth-head model")
    group.add_argument("--seed", type=int, default=0, help="seed of the random-map baseline and the bootstrap")
    parser.add_argument("--family", type=Path, nargs="+", metavar="RUN",
                        help="score one model per depth of each run (cascade run, per-depth-head model, or a "
                             "single model) and plot BMA by depth; several runs need --out DIR")


def run(args: argparse.Namespace) -> int:
    from skindistil.errors import ConfigError

    loader = {"batch_size": args.batch_size, "num_workers": args.workers, "device": args.device}
    if args.operating_point is not None and (args.model is None or args.family is not None or args.sweep_exits
                                             or args.exit_threshold is not None):
        raise ConfigError("evaluate: --operating-point goes with --model DIR --data DATA_DIR (not with --family, "
                          "--sweep-exits or --exit-threshold)")
    if not args.localization and (args.explain_method or args.reference is not None or args.per_exit):
        raise ConfigError("evaluate: --explain-method, --reference and --per-exit belong to --localization")
    if args.localization and (args.model is None or args.family is not None or args.predictions is not None
                              or args.exit_threshold is not None or args.sweep_exits):
        raise ConfigError("evaluate: --localization scores one --model on --data DATA_DIR (prepared with --masks)")
    if args.family is not None:
        if args.data is None:
            raise ConfigError("evaluate: --family needs --data DATA_DIR (a dataset from `skindistil prepare`)")
        from skindistil.evaluation.family import family_report

        _print_family(family_report(args.family, args.data, args.split, args.out, **loader))
        return 0
    from skindistil.evaluation.bootstrap import BootstrapSettings

    bootstrap = BootstrapSettings(resamples=args.bootstrap)
    if args.predictions is not None:
        metrics = _evaluate_predictions_csv(args.predictions, args.truth, args.out, args.unk_threshold, bootstrap)
    elif args.model is not None:
        if args.data is None:
            raise ConfigError("evaluate: --model needs --data DATA_DIR (a dataset from `skindistil prepare`)")
        if args.exit_threshold is not None or args.sweep_exits:
            return _early_exit(args, loader)
        from skindistil.evaluation.evaluate import evaluate_model

        metrics = evaluate_model(args.model, args.data, args.split, args.out, calibrate=args.calibrate,
                                 operating_point=args.operating_point, bootstrap=bootstrap,
                                 subgroup_min_size=args.subgroup_min_size, **loader)
        if args.localization:
            _print_summary(metrics)
            return _localization(args)
    else:
        raise ConfigError("evaluate: give --model DIR --data DATA_DIR, --family RUN... --data DATA_DIR, "
                          "or --predictions PRED.csv --truth GT.csv")
    _print_summary(metrics)
    return 0


def _localization(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.inference.localization import evaluate_localization

    summary = evaluate_localization(args.model, args.data, args.split, args.out, args.explain_method,
                                    reference=args.reference, per_exit=args.per_exit, seed=args.seed,
                                    device=args.device)
    console = Console(highlight=False, soft_wrap=True)
    console.print(Path(summary["files"]["md"]).read_text(), markup=False)
    console.print(f"wrote {summary['files']['md']}", markup=False)
    return 0


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _early_exit(args: argparse.Namespace, loader: dict) -> int:
    from rich.console import Console

    from skindistil.evaluation.early_exit import DEFAULT_THRESHOLDS, evaluate_threshold, sweep_exits
    from skindistil.evaluation.evaluate import default_eval_dir

    out = args.out if args.out is not None else default_eval_dir(args.model, args.split)
    if args.sweep_exits:
        result = sweep_exits(args.model, args.data, args.split, out, thresholds=args.thresholds or DEFAULT_THRESHOLDS,
                             **loader)
        Console().print(Path(result["files"]["md"]).read_text())
    if args.exit_threshold is not None:
        metrics = evaluate_threshold(args.model, args.data, args.split, args.exit_threshold,
                                     out / f"exit-{args.exit_threshold:g}", **loader)
        _print_summary(metrics)
    return 0


def _print_family(result: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(Path(result["files"]["md"]).read_text())
    console.print(f"wrote {Path(result['files']['md']).parent}")


def _evaluate_predictions_csv(predictions: Path, truth: Path | None, out: Path | None,
                              unk_threshold: float | None, bootstrap=None) -> dict:
    import warnings

    from skindistil.errors import ConfigError
    from skindistil.evaluation.metrics import AbsentClassWarning
    from skindistil.evaluation.submission import evaluate_submission

    if truth is None:
        raise ConfigError("evaluate: --predictions needs --truth GT.csv")
    from skindistil.evaluation.challenges import evaluate_submission as evaluate_challenge_submission
    from skindistil.evaluation.challenges import submission_format

    if submission_format(predictions) != "isic2019":
        out = out if out is not None else predictions.parent / f"{predictions.stem}_eval"
        if unk_threshold is not None:
            raise ConfigError("evaluate: --unk-threshold applies to ISIC 2019 submissions only")
        return evaluate_challenge_submission(predictions, truth, out)
    # Absent classes are listed in the printed notes; the warning would only repeat them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)
        return evaluate_submission(predictions, truth, out, unk_threshold=unk_threshold, bootstrap=bootstrap)


def _print_summary(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from skindistil.evaluation.report import format_interval, headline_rows, incomplete_warning, interval

    console = Console()
    table = Table(title=metrics["title"])
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI" if metrics.get("intervals") else "", justify="right")
    for (key, value), name in zip(headline_rows(metrics), metrics["headline"], strict=False):
        bounds = interval(metrics, name)
        table.add_row(key, "n/a" if value != value else f"{value:.4f}", format_interval(bounds) if bounds else "")
    console.print(table)
    warning = incomplete_warning(metrics)
    if warning:
        console.print(f"[bold red]{warning}[/]", highlight=False)
    if metrics.get("operating_points"):
        _print_operating_points(console, metrics["operating_points"])
    for note in metrics["notes"]:
        console.print(f"note: {note}")
    console.print(f"wrote {Path(metrics['files']['metrics']).parent}")


def _print_operating_points(console, result: dict) -> None:
    from rich.table import Table

    def cell(value, interval) -> str:
        if value != value:
            return "n/a"
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"

    table = Table(title=f"operating points (thresholds from {result['fitted_on']})")
    for column in ("point", "threshold", "sensitivity (95% CI)", "specificity (95% CI)"):
        table.add_column(column, justify="left" if column == "point" else "right")
    for name, p in result["points"].items():
        table.add_row(name + (" *" if name == result["default"] else ""), f"{p['threshold']:.4g}",
                      cell(p["sensitivity"], p["sensitivity_ci"]), cell(p["specificity"], p["specificity_ci"]))
    console.print(table)
