"""Training speed on a busy machine: `skindistil train` alone and beside a CPU hog, in one run.

    .venv/bin/python benchmarks/busy_machine.py                      # quickstart's teacher, 600 synthetic images
    .venv/bin/python benchmarks/busy_machine.py --hog-cores 1.7 --epochs 3 \
        --variant "one thread=OMP_NUM_THREADS=1"

Each variant (a label and environment settings) trains the quickstart recipe's teacher from scratch twice:
on the quiet machine and while a hog keeps `--hog-cores` cores busy (whole cores spin; a fraction
spins that share of every 10 ms). The hog runs only during the measured training and stops with it.
Reported: training img/s from RUN/logs/throughput.json (data loading included, validation excluded),
and the slowdown = quiet img/s / busy img/s. Losing c of n cores to the hog alone explains a slowdown
of about n / (n - c) (6.7x for 1.7 of 2 cores). Writes OUT/busy_machine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# libgomp spins 300,000 times before a waiting thread sleeps when OMP_WAIT_POLICY is unset (its
# documented default); skindistil's training commands now set OMP_WAIT_POLICY=PASSIVE unless the user
# set either variable, so GOMP_SPINCOUNT=300000 restores the old behaviour for comparison.
DEFAULT_VARIANTS = [
    "before (libgomp's default spin-wait)=GOMP_SPINCOUNT=300000",
    "after (skindistil's default)=",
]


def _spin(duty: float, until: float) -> None:
    period = 0.01
    while time.time() < until:
        start = time.perf_counter()
        while time.perf_counter() - start < duty * period:
            pass
        time.sleep(max(0.0, (1 - duty) * period))


def start_hog(cores: float, seconds: float) -> list[mp.Process]:
    until = time.time() + seconds
    duties = [1.0] * int(cores) + ([cores - int(cores)] if cores % 1 else [])
    procs = [mp.Process(target=_spin, args=(d, until), daemon=True) for d in duties]
    for p in procs:
        p.start()
    return procs


def train(data: Path, out: Path, name: str, settings: list[str], epochs: int) -> float:
    command = [sys.executable, "-m", "skindistil.cli", "run", "--config", "configs/quickstart.yaml",
               "--out-dir", str(out), "--name", name, "--no-progress", f"data.root={data}", "data.source=prepared",
               f"teacher.trainer.max_epochs={epochs}"]
    teacher_dir = out / name / "teacher"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=str(REPO / "src"), **dict(item.split("=", 1) for item in settings))
    # only the teacher stage is measured: stop the run when the teacher's artifact exists
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (teacher_dir / "logs" / "throughput.json").is_file():
        time.sleep(0.2)
    proc.terminate()
    proc.wait(timeout=60)
    path = teacher_dir / "logs" / "throughput.json"
    if not path.is_file():
        raise SystemExit(f"{name}: training failed:\n{proc.stderr.read()[-3000:]}")
    return float(json.loads(path.read_text())["images_per_second"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/busy-machine"))
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hog-cores", type=float, default=1.7)
    parser.add_argument("--hog-seconds", type=float, default=900, help="upper bound of one busy measurement")
    parser.add_argument("--variant", action="append", metavar="LABEL=NAME=VALUE ...",
                        help="repeatable; default: libgomp's default spin-wait against skindistil's default")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source

    out = args.out.resolve()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        prepare_dataset(build_source("synthetic", str(args.images)), data, short_side=64, progress=False)
    rows = []
    for spec in args.variant or DEFAULT_VARIANTS:
        label, _, settings = spec.partition("=")
        figures = {}
        for mode in ("quiet", "busy"):
            name = f"v{len(rows)}-{mode}"
            subprocess.run(["rm", "-rf", str(out / name)], check=True)
            hog = start_hog(args.hog_cores, args.hog_seconds) if mode == "busy" else []
            try:
                figures[mode] = train(data, out, name, settings.split(), args.epochs)
            finally:
                for p in hog:
                    p.terminate()
            print(f"{label}: {mode} {figures[mode]:.1f} img/s", flush=True)
        rows.append({"variant": label, "environment": settings, **figures,
                     "slowdown": figures["quiet"] / figures["busy"]})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    expected = cores / max(cores - args.hog_cores, 1e-9)
    lines = [f"Teacher training (quickstart recipe, {args.images} synthetic images, {args.epochs} epochs), "
             f"{cores} cores, hog of {args.hog_cores} cores (alone it explains {expected:.1f}x).", "",
             "| variant | quiet img/s | busy img/s | slowdown |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['quiet']:.1f} | {r['busy']:.1f} | {r['slowdown']:.1f}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busy_machine.md").write_text(text)
    (out / "busy_machine.json").write_text(json.dumps({"cores": cores, "hog_cores": args.hog_cores, "rows": rows},
                                                      indent=2) + "\n")
    return 0 if all(math.isfinite(r["slowdown"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
