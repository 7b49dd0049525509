"""Which teacher for a ViT student: the paper's ViT teacher against a convnet teacher with DeiT's
distillation token, each student against its own baseline trained without a teacher, in one run.

    .venv/bin/python benchmarks/teacher_choice.py                 # CPU size: 48 px, 2,500 images, 6 epochs
    .venv/bin/python benchmarks/teacher_choice.py --device cuda   # GPU size: 128 px, all 7,005 images, 30 epochs

On real HAM10000 images (../shared/data/ham10000, lesion-grouped splits, prepared once under OUT/data),
every model trained for the same number of epochs with the same seed:

- ViT teacher (timm ViT, `--vit-kwargs`) and convnet teacher (timm `--cnn`, ResNet-18 by default);
- paper: SkinDistilViT, the ViT teacher's first `--keep-blocks` blocks distilled from it (distilvit, default loss);
- paper baseline: the same initial student trained with cross-entropy only (a_kd = a_mse = 0);
- DeiT: a random ViT of `--keep-blocks` blocks (same width) with a distillation token, hard distillation from the
  convnet teacher through the token (a_kd = a_mse = 0, DeiT's loss);
- DeiT baseline: the same random ViT, no token, cross-entropy only;
- paper from stored outputs: the paper's student again, its teacher outputs written once by
  `store-teacher` (timed) and read back: training img/s against the online run's.

Each model is scored on the test split with 95% bootstrap intervals over lesions (`evaluate`); each
student is compared with its baseline on the same images (paired bootstrap of the BMA difference,
McNemar). Writes OUT/teacher_choice.{json,md}; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU = {"image_size": 48, "images": 2500, "epochs": 6, "batch_size": 64, "precision": "32-true", "lr": 1e-3,
       "vit": {"embed_dim": 96, "depth": 6, "num_heads": 3, "patch_size": 8, "mlp_ratio": 4.0}}
GPU = {"image_size": 128, "images": None, "epochs": 30, "batch_size": 128, "precision": "bf16-mixed", "lr": 5e-4,
       "vit": {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16, "mlp_ratio": 4.0}}
ARCH = "vit_base_patch16_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ham", default=str(REPO.parent / "shared" / "data" / "ham10000"), help="HAM10000 root")
    parser.add_argument("--images", type=int, help="HAM10000 images to prepare (default 2,500 cpu, all cuda)")
    parser.add_argument("--epochs", type=int, help="epochs of every model (default 6 cpu, 30 cuda)")
    parser.add_argument("--keep-blocks", "--keep", type=int, help="student blocks (default: half the ViT teacher's)")
    parser.add_argument("--cnn", default="resnet18", help="timm convnet teacher (default resnet18)")
    parser.add_argument("--workers", type=int, help="loader workers (default: the commands' default)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of every interval")
    parser.add_argument("--out", default="runs/teacher_choice", help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    from skindistil.cli import main as cli
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source
    from skindistil.evaluation.bootstrap import BootstrapSettings
    from skindistil.evaluation.compare import compare_eval_dirs

    setup = GPU if args.device.startswith("cuda") else CPU
    out = Path(args.out)
    epochs = args.epochs or setup["epochs"]
    size = setup["image_size"]
    keep = args.keep_blocks or setup["vit"]["depth"] // 2
    data = out / "data"
    if not (data / "dataset.json").is_file():
        prepare_dataset(build_source("ham10000", args.ham), data, limit=args.images or setup["images"],
                        short_side=round(size * 8 / 7), progress=False)
    common = ["--data", str(data), "--out-dir", str(out), "--epochs", str(epochs), "--batch-size",
              str(setup["batch_size"]), "--precision", setup["precision"], "--no-progress",
              "--accelerator", "gpu" if args.device.startswith("cuda") else "cpu"]
    common += ["--workers", str(args.workers)] if args.workers is not None else []
    student_kwargs = {k: setup["vit"][k] for k in ("embed_dim", "num_heads", "patch_size", "mlp_ratio")}
    student_kwargs["depth"] = keep
    pre = f"preprocess.image_size={size}"
    runs = {
        "ViT teacher": ["train", "--name", "vit-teacher", "--model", ARCH, f"model.kwargs={json.dumps(setup['vit'])}",
                        pre, "--lr", str(setup["lr"])],
        "CNN teacher": ["train", "--name", "cnn-teacher", "--model", args.cnn, pre, "--lr", str(setup["lr"])],
        "paper: ViT -> ViT": ["distill", "--name", "paper", "--teacher", str(out / "vit-teacher"), "--keep-blocks", str(keep)],
        "paper baseline (no teacher)": ["distill", "--name", "paper-baseline", "--teacher", str(out / "vit-teacher"),
                                        "--keep-blocks", str(keep), "--a-kd", "0", "--a-mse", "0"],
        "DeiT: CNN -> ViT, token": ["distill", "--name", "deit", "--teacher", str(out / "cnn-teacher"),
                                    "--student-init", ARCH, f"student_kwargs={json.dumps(student_kwargs)}",
                                    "--keep-blocks", str(keep), "--dist-token", "hard", "--a-kd", "0", "--a-mse", "0"],
        "DeiT baseline (no teacher)": ["distill", "--name", "deit-baseline", "--teacher", str(out / "cnn-teacher"),
                                       "--student-init", ARCH, f"student_kwargs={json.dumps(student_kwargs)}",
                                       "--keep-blocks", str(keep), "--a-kd", "0", "--a-mse", "0"],
    }
    results: dict[str, dict] = {}
    for label, command in runs.items():
        run_dir = out / command[command.index("--name") + 1]
        seconds = _timed(run_dir / "model" / "config.json", out / "seconds" / f"{run_dir.name}.json",
                         lambda command=command, label=label: _cli(cli, [*command, *common], label))
        results[label] = {"run": str(run_dir), "train_seconds": seconds, **_throughput(run_dir)}

    # the paper's student again, from stored teacher outputs
    store = out / "store"
    store_seconds = _timed(store / f"epoch-{epochs - 1:04d}-logits.npy", out / "seconds" / "store.json",
                           lambda: _cli(cli, ["store-teacher", "--teacher", str(out / "vit-teacher"), "--data", str(data),
                                              "--out", str(store), "--epochs", str(epochs), "--batch-size",
                                              str(setup["batch_size"]), "--precision", setup["precision"],
                                              "--no-progress"], "store-teacher"))
    stored_dir = out / "paper-stored"
    command = ["distill", "--name", "paper-stored", "--teacher", str(out / "vit-teacher"), "--keep-blocks", str(keep),
               "--teacher-store", str(store)]
    seconds = _timed(stored_dir / "model" / "config.json", out / "seconds" / "paper-stored.json",
                     lambda: _cli(cli, [*command, *common], "paper from the store"))
    results["paper, stored teacher outputs"] = {"run": str(stored_dir), "store_seconds": store_seconds,
                                                "train_seconds": seconds, **_throughput(stored_dir)}

    for result in results.values():
        run_dir = Path(result["run"])
        if not (run_dir / "eval" / "test" / "metrics.json").is_file():
            cli(["evaluate", "--model", str(run_dir), "--data", str(data), "--split", "test",
                 "--bootstrap", str(args.bootstrap)])
        metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
        result["balanced_accuracy"] = metrics["headline"]["balanced_accuracy"]
        result["balanced_accuracy_interval"] = metrics["intervals"]["headline"]["balanced_accuracy"]
        result["parameters"] = json.loads((run_dir / "model" / "config.json").read_text())["num_parameters"]
    settings = BootstrapSettings(resamples=args.bootstrap)
    pairs = [("paper: ViT -> ViT", "paper baseline (no teacher)"),
             ("DeiT: CNN -> ViT, token", "DeiT baseline (no teacher)"),
             ("DeiT: CNN -> ViT, token", "paper: ViT -> ViT"),
             ("CNN teacher", "ViT teacher")]
    comparisons = {}
    for student, reference in pairs:
        c = compare_eval_dirs(Path(results[reference]["run"]) / "eval" / "test",
                              Path(results[student]["run"]) / "eval" / "test", data, settings)
        comparisons[f"{student} vs {reference}"] = {"balanced_accuracy_difference": c["balanced_accuracy"]["difference"],
                                                    "mcnemar": c["mcnemar"], "verdict": c["verdict"]}
    document = {"device": args.device, "image_size": size, "epochs": epochs, "keep": keep, "vit": setup["vit"],
                "cnn": args.cnn, "data": str(data), "results": results, "comparisons": comparisons}
    (out / "teacher_choice.json").write_text(json.dumps(document, indent=2) + "\n")
    table = _markdown(document)
    (out / "teacher_choice.md").write_text(table)
    print(table)
    return 0


def _cli(cli, command: list[str], label: str) -> None:
    print(f"== {label}", flush=True)
    if cli(command) != 0:
        raise SystemExit(f"{label}: `skindistil {' '.join(command)}` failed")


def _timed(done: Path, record: Path, work) -> float:
    """Seconds `work()` took, measured when `done` does not exist yet and kept in `record`, so a rerun
    that skips finished work reports the time it took when it ran."""
    if not done.is_file() or not record.is_file():
        started = time.perf_counter()
        work()
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}) + "\n")
    return json.loads(record.read_text())["seconds"]


def _throughput(run_dir: Path) -> dict:
    path = run_dir / "logs" / "throughput.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return {"train_images_per_second": record.get("images_per_second")}


def _markdown(document: dict) -> str:
    from skindistil.markdown import markdown_table

    lines = [f"Teacher choice on HAM10000 ({document['device']}, {document['image_size']} px, {document['epochs']} "
             f"epochs each, student = {document['keep']} blocks); test BMA with 95% bootstrap interval over lesions.",
             ""]
    rows = []
    for label, r in document["results"].items():
        low, high = r["balanced_accuracy_interval"]
        rate = r.get("train_images_per_second")
        seconds = f"{r['train_seconds']:.0f}" + (f" (+ store {r['store_seconds']:.0f})" if "store_seconds" in r else "")
        rate = f"{rate:.0f}" if rate else "n/a"
        rows.append([label, f"{r['parameters']:,}", f"{r['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]", seconds, rate])
    lines.append(markdown_table(["model", "params", "test BMA [95% CI]", "train time (s)", "train img/s"], rows))
    lines += ["", "Paired on the same test images (first model minus second; lesions resampled together):", ""]
    rows = []
    for label, c in document["comparisons"].items():
        d = c["balanced_accuracy_difference"]
        low, high = d["interval"]
        rows.append([label, f"{d['value']:+.3f} [{low:+.3f}, {high:+.3f}]", "yes" if low > 0 or high < 0 else "no",
                     f"{c['mcnemar']['p_value']:.3g}"])
    lines.append(markdown_table(["comparison", "BMA difference [95% CI]", "interval excludes 0", "McNemar p"], rows))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
