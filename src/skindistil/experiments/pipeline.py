"""The main job: prepare -> train teacher -> distill -> evaluate -> benchmark -> report.

Everything lands in RUN = out_dir/name:

    RUN/config.yaml        the resolved RunConfig (re-runnable as is)
    RUN/data/              the prepared dataset (unless data.source is "prepared")
    RUN/teacher/           teacher run directory (checkpoints, logs, model/, eval/<split>/)
    RUN/students/<method>/ one run directory per distillation method (cascade: cascade/depth-XX/)
    RUN/benchmark/         bench.json, bench.md, bench.png
    RUN/report.md, RUN/report.html, RUN/report_assets/

Every stage checks for its outputs first, so a rerun skips finished stages and an interrupted
training continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from skindistil.config import RunConfig, dump_yaml
from skindistil.errors import ConfigError
from skindistil.metric_keys import read_results
from skindistil.models.artifact import architecture_of

console = Console()


@dataclass
class ModelEntry:
    """One trained model of the run, as the report lists it."""

    label: str
    run_dir: Path
    role: str  # teacher | student | member
    method: str
    metrics: dict = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def detect_source(path: str | Path) -> tuple[str, str]:
    """(source kind, root) for a folder or file given as --data: a prepared dataset, or any layout
    `skindistil.data.sources.detect_source` recognises (ISIC 2016-2024, HAM10000, DermaMNIST, a CSV of
    paths, an ImageFolder tree with or without train/val/test folders). ConfigError when none fits."""
    from skindistil.data.sources import detect_source as detect_layout
    from skindistil.errors import DataError

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data {path}: not found")
    if (path / "dataset.json").is_file():
        return "prepared", str(path)
    try:
        return detect_layout(path), str(path)
    except DataError as exc:
        raise ConfigError(f"--data {exc.where}: not a prepared dataset (no dataset.json), and {exc.reason}") from None


class Pipeline:
    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.comparisons: dict[str, dict] = {}  # label -> teacher-vs-model comparison on cfg.split
        self.gate_failures: dict[str, list[str]] = {}  # label -> retention gate failures

    @property
    def bootstrap(self):
        from skindistil.evaluation.bootstrap import BootstrapSettings

        return BootstrapSettings(resamples=int(self.cfg.bootstrap), seed=self.cfg.data.seed)

    # ------------------------------------------------------------------ stages

    def run(self) -> Path:
        if self.cfg.sized_for not in ("any", "gpu"):
            raise ConfigError(f"sized_for: {self.cfg.sized_for!r} is not one of any, gpu")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.cfg.to_dict(), self.run_dir / "config.yaml")
        data_dir = self._stage("prepare", self.prepare)
        self._check_gate(data_dir)
        teacher = self._stage("teacher", lambda: self.train_teacher(data_dir))
        students = self._stage("distill", lambda: self.distill_students(data_dir, teacher))
        models = [teacher, *students]
        self._stage("evaluate", lambda: self.evaluate(data_dir, models))
        bench = self._stage("benchmark", lambda: self.benchmark(teacher, students))
        report = self._stage("report", lambda: self.report(data_dir, models, bench))
        console.print(f"[bold green]report[/bold green] {report} and {report.with_suffix('.html')}")
        return report

    def _stage(self, name: str, fn):
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - started
        return result

    def prepare(self) -> Path:
        from skindistil.data.prepare import prepare_dataset
        from skindistil.data.sources import build_source

        data = self.cfg.data
        if data.source == "prepared":
            return Path(data.root)
        out = self.run_dir / "data"
        if (out / "dataset.json").is_file():
            console.print(f"prepared dataset found: {out} (skipped)")
            return out
        source = build_source(data.source, data.root, **data.options)
        result = prepare_dataset(source, out, short_side=data.short_side, fractions=tuple(data.split),
                                 seed=data.seed, workers=data.workers, limit=data.limit, progress=self.progress,
                                 masks=data.masks)
        console.print(f"prepared {result.num_images} images at {result.images_per_second:.0f} img/s -> {out}")
        return out

    def _check_gate(self, data_dir: Path) -> None:
        """Refuse a retention gate naming a class the dataset lacks before anything is trained."""
        from skindistil.data.prepare import load_manifest
        from skindistil.evaluation.retention import parse_retention_gate

        if self.cfg.distill.min_class_retention:
            parse_retention_gate(self.cfg.distill.min_class_retention, load_manifest(data_dir)[1]["classes"])

    def _done(self, run_dir: Path) -> bool:
        return (run_dir / "model" / "config.json").is_file()

    def train_teacher(self, data_dir: Path) -> ModelEntry:
        from skindistil.training.teacher import train_classifier

        cfg = copy.deepcopy(self.cfg.teacher)
        cfg.name, cfg.out_dir, cfg.data.dir = "teacher", str(self.run_dir), str(data_dir)
        cfg.trainer.progress = cfg.trainer.progress and self.progress
        entry = ModelEntry("teacher", self.run_dir / "teacher", "teacher", "teacher")
        if self._done(entry.run_dir):
            console.print(f"teacher found: {entry.model_dir} (skipped)")
        else:
            self.announce_duration(cfg, data_dir)
            train_classifier(cfg, resume=True)
        return entry

    def announce_duration(self, cfg, data_dir: Path) -> None:
        """Say, before training starts, how long the teacher will take here; warn when a recipe sized for a
        GPU runs on the CPU."""
        from skindistil.data.prepare import load_manifest
        from skindistil.training.estimate import estimate_training, format_duration

        manifest, info = load_manifest(data_dir)
        estimate = estimate_training(cfg, int((manifest["split"] == "train").sum()), len(info["classes"]))
        console.print(
            f"teacher: {estimate.steps:,} steps at {estimate.seconds_per_step:.2f} s per step on {estimate.device} "
            f"(measured): about {format_duration(estimate.seconds)} before data loading and validation",
            markup=False,
        )
        if self.cfg.sized_for == "gpu" and estimate.device == "cpu":
            console.print(
                f"[bold yellow]warning:[/bold yellow] recipe {self.cfg.name!r} is sized for a GPU and this run is on "
                f"the CPU: the teacher alone takes about {format_duration(estimate.seconds)} here. For minutes on a "
                "CPU use configs/quickstart.yaml, or lower teacher.trainer.max_epochs and the model size."
            )

    def distill_students(self, data_dir: Path, teacher: ModelEntry) -> list[ModelEntry]:
        from skindistil.training.distill_run import ALL_METHODS, distill

        methods = list(dict.fromkeys(["distilvit", *self.cfg.methods]))
        unknown = [m for m in methods if m not in ALL_METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
        entries = []
        for method in methods:
            cfg = copy.deepcopy(self.cfg.distill)
            cfg.method, cfg.teacher = method, str(teacher.model_dir)
            cfg.name, cfg.out_dir, cfg.data.dir = method, str(self.run_dir / "students"), str(data_dir)
            cfg.trainer.progress = cfg.trainer.progress and self.progress
            if method == "cascade" and self.cfg.cascade_epochs:
                cfg.trainer.max_epochs = self.cfg.cascade_epochs
            run_dir = cfg.run_dir
            if method == "cascade":
                depth = _depth(teacher.model_dir)
                if depth is None:
                    raise ConfigError(f"methods: cascade cuts the teacher one block at a time, and the teacher "
                                      f"{teacher.model_dir} is not a ViT")
                members = [run_dir / "cascade" / f"depth-{k:02d}" for k in range(depth - 1, cfg.min_depth - 1, -1)]
                if not all(self._done(m) for m in members):
                    distill(cfg, resume=True)
                entries += [ModelEntry(f"cascade@{_depth(m / 'model')}", m, "member", "cascade") for m in members]
            else:
                if self._done(run_dir):
                    console.print(f"{method} found: {run_dir / 'model'} (skipped)")
                else:
                    distill(cfg, resume=True)
                role = "student" if method == "distilvit" else "member"
                entries.append(ModelEntry(method, run_dir, role, method))
        return entries

    def evaluate(self, data_dir: Path, models: list[ModelEntry]) -> None:
        from skindistil.evaluation.evaluate import evaluate_model

        split = self.cfg.split
        for entry in models:
            metrics_file = entry.run_dir / "eval" / split / "metrics.json"
            if not metrics_file.is_file():
                self.evaluate_model(evaluate_model, entry, data_dir, split)
            entry.metrics = read_results(metrics_file)
        self.compare(data_dir, models)
        self.evaluate_families(data_dir, models)

    def evaluate_model(self, evaluate_model, entry: ModelEntry, data_dir: Path, split: str) -> None:
        """Score one model on `split`, with operating points chosen on val (skipped, with a console note,
        when the model has no cancer or melanoma class or val cannot fix any threshold)."""
        from skindistil.errors import DataError

        options = {"progress": self.progress, "num_workers": self.cfg.teacher.data.num_workers,
                   "bootstrap": self.bootstrap, "subgroup_min_size": self.cfg.subgroup_min_size}
        try:
            evaluate_model(entry.model_dir, data_dir, split, operating_point="auto", **options)
        except DataError as exc:
            if "no operating point can be chosen" not in str(exc):
                raise
            console.print(f"{entry.label}: no operating points ({exc})", markup=False, highlight=False)
            evaluate_model(entry.model_dir, data_dir, split, **options)

    def compare(self, data_dir: Path, models: list[ModelEntry]) -> None:
        """Every distilled model against the teacher on the same images (paired bootstrap, McNemar,
        per-class retention, agreement) and the retention gate; written to RUN/comparison.json."""
        from skindistil.evaluation.compare import compare_eval_dirs
        from skindistil.evaluation.report import write_metrics_json
        from skindistil.evaluation.retention import check_retention_gate, parse_retention_gate

        teacher, split = models[0], self.cfg.split
        gate = parse_retention_gate(self.cfg.distill.min_class_retention, teacher.metrics["classes"])
        for entry in models[1:]:
            comparison = compare_eval_dirs(teacher.run_dir / "eval" / split, entry.run_dir / "eval" / split,
                                           data_dir, self.bootstrap)
            self.comparisons[entry.label] = comparison
            if gate:
                self.gate_failures[entry.label] = check_retention_gate(comparison, gate)
        write_metrics_json(self.run_dir / "comparison.json",
                           {"split": split, "teacher": str(teacher.model_dir), "gate": gate,
                            "models": {label: {**c, "gate_failures": self.gate_failures.get(label)}
                                       for label, c in self.comparisons.items()}})
        for label, failures in self.gate_failures.items():
            if failures:
                console.print(f"[bold red]retention gate[/bold red] {label} fails: {'; '.join(failures)}")

    def evaluate_families(self, data_dir: Path, models: list[ModelEntry]) -> None:
        """Per-depth BMA of every family (cascade members, per-depth exits) and early-exit curves."""
        from skindistil.evaluation.early_exit import sweep_exits
        from skindistil.evaluation.family import family_report

        split, workers = self.cfg.split, self.cfg.teacher.data.num_workers
        runs = list(dict.fromkeys(e.run_dir.parent.parent if e.method == "cascade" else e.run_dir
                                  for e in models if e.role == "member"))
        if runs and not (self.run_dir / "family" / "family.json").is_file():
            family_report(runs, data_dir, split, out_dir=self.run_dir / "family", num_workers=workers,
                          progress=self.progress, bootstrap=self.bootstrap)
        teacher_probs = None
        for entry in models:
            if entry.method in ("fcvit", "fcvit-probs", "full"):
                out = entry.run_dir / "eval" / split
                if not (out / "early_exit.json").is_file():
                    if teacher_probs is None:
                        teacher_probs = self._teacher_probs(models[0], data_dir)
                    sweep_exits(entry.model_dir, data_dir, split, out, num_workers=workers, progress=self.progress,
                                teacher_probs=teacher_probs, bootstrap=self.bootstrap)

    def _teacher_probs(self, teacher: ModelEntry, data_dir: Path):
        """The teacher's scores on the split, in manifest order (from its predictions.csv)."""
        from skindistil.data.prepare import load_manifest
        from skindistil.evaluation.report import read_predictions_csv

        manifest, _ = load_manifest(data_dir)
        ids = manifest.loc[manifest["split"] == self.cfg.split, "image_id"].tolist()
        predictions = teacher.run_dir / "eval" / self.cfg.split / "predictions.csv"
        return read_predictions_csv(predictions, teacher.metrics["classes"], ids)[1]

    def benchmark(self, teacher: ModelEntry, students: list[ModelEntry]) -> dict:
        from skindistil.bench.models import BenchSettings, run_benchmark
        from skindistil.bench.report import write_report

        out = self.run_dir / "benchmark"
        if (out / "bench.json").is_file():
            console.print(f"benchmark found: {out} (skipped)")
            return read_results(out / "bench.json")
        bench = self.cfg.benchmark
        devices = ["cuda", "cpu"] if bench.device == "auto" and torch.cuda.is_available() else [
            "cpu" if bench.device == "auto" else bench.device]
        student = next(s for s in students if s.role == "student")
        results = []
        for device in devices:
            settings = BenchSettings(device=device, batch_sizes=tuple(bench.batch_sizes),
                                     backends=tuple(bench.backends), seconds=bench.seconds, repeats=20)
            results.append(run_benchmark([str(teacher.model_dir), str(student.model_dir)], settings,
                                         pair=[str(teacher.model_dir), str(student.model_dir)]))
        merged = results[0]
        for extra in results[1:]:
            merged["results"] += extra["results"]
            merged["ratios"] += extra["ratios"]
        write_report(merged, out)
        return merged

    # ------------------------------------------------------------------ report

    def report(self, data_dir: Path, models: list[ModelEntry], bench: dict) -> Path:
        from skindistil.experiments.run_report import build_report

        assets = self.run_dir / "report_assets"
        assets.mkdir(exist_ok=True)
        document = build_report(self.cfg, self.run_dir, data_dir, models, bench, self.timings, assets,
                                self.comparisons, self.gate_failures)
        md, _ = document.write(self.run_dir, "report")
        return md


def _depth(model_dir: Path) -> int | None:
    """Blocks of a ViT artifact; None for other models (a convnet teacher records no depth)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    depth = architecture_of(config)["kwargs"].get("depth") if config.get("kind") != "timm" else None
    return None if depth is None else int(depth)


def run_pipeline(cfg: RunConfig, *, progress: bool = True) -> Pipeline:
    """Run every stage of `cfg`; returns the finished Pipeline (its report, comparisons, gate failures)."""
    pipeline = Pipeline(cfg, progress=progress)
    pipeline.run()
    return pipeline
