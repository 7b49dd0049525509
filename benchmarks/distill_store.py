"""Distillation throughput from stored teacher outputs against the online teacher, in one run.

    .venv/bin/python benchmarks/distill_store.py                  # CPU: 12-block width-96 ViT at 64 px -> 6 blocks
    .venv/bin/python benchmarks/distill_store.py --device cuda    # ViT-B/16 at 224 px -> 6 blocks, bf16, batch 256

On real HAM10000 images (../shared/data/ham10000, a subset prepared once under OUT/data, or --data), with
a randomly initialised teacher of the architecture (throughput does not depend on the weights; --teacher
uses a real artifact): writes the teacher store for the planned epochs (timed), then runs the same
SkinDistilViT distillation twice, online (teacher forward every step) and from the store, and reads
each run's training img/s (RUN/logs/throughput.json: data loading included, validation and the first
batches excluded). Reports the ratio, the end-to-end times (store writing included) and the store's
size per 1,000 images per epoch; writes OUT/distill_store.{json,md}. Augmentation runs on the CPU
(per-sample seeded: the only replayable path).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU = {"model": {"embed_dim": 96, "depth": 12, "num_heads": 3, "patch_size": 8, "mlp_ratio": 4.0}, "image_size": 64,
       "batch_size": 32, "images": 600, "epochs": 2, "precision": "32-true"}
GPU = {"model": {}, "image_size": 224, "batch_size": 256, "images": 4000, "epochs": 3, "precision": "bf16-mixed"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="vit_base_patch16_224", help="timm teacher architecture")
    parser.add_argument("--teacher", help="a teacher artifact instead of a random one (its input size is used)")
    parser.add_argument("--keep-blocks", "--keep", type=int, default=6, help="student blocks (first K)")
    parser.add_argument("--data", help="a prepared DATA_DIR (default: HAM10000 images prepared under OUT/data)")
    parser.add_argument("--ham", default=str(REPO.parent / "shared" / "data" / "ham10000"), help="HAM10000 root")
    parser.add_argument("--images", type=int, help="HAM10000 images to prepare (default 600 cpu, 4000 cuda)")
    parser.add_argument("--epochs", type=int, help="epochs of each run (default 2 cpu, 3 cuda)")
    parser.add_argument("--batch-size", type=int, help="default 32 cpu, 256 cuda")
    parser.add_argument("--workers", type=int, help="loader workers (default: cores - 1)")
    parser.add_argument("--a-cos", type=float, default=0.0, help="> 0 stores and uses the class-token hidden state")
    parser.add_argument("--out", default="runs/distill_store", help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from skindistil.config import DistillConfig, PreprocessConfig
    from skindistil.data.prepare import prepare_dataset
    from skindistil.data.sources import build_source
    from skindistil.models import create_teacher, load_model, save_artifact
    from skindistil.training.distill_run import distill
    from skindistil.training.teacher_store import (
        bytes_per_thousand_images_epoch,
        read_header,
        write_teacher_store,
    )

    setup = GPU if args.device.startswith("cuda") else CPU
    out = Path(args.out)
    epochs = args.epochs or setup["epochs"]
    images = args.images or setup["images"]
    image_size = setup["image_size"] if not args.teacher else load_model(args.teacher).preprocess.image_size
    data_dir = Path(args.data) if args.data else out / "data"
    if not args.data and not (data_dir / "dataset.json").is_file():
        prepare_dataset(build_source("ham10000", args.ham), data_dir, limit=images,
                        short_side=round(image_size * 8 / 7), progress=False)
    classes = json.loads((data_dir / "dataset.json").read_text())["classes"]
    teacher_dir = Path(args.teacher) if args.teacher else out / "teacher" / "model"
    if not args.teacher:
        torch.manual_seed(0)
        model = create_teacher(args.arch, num_classes=len(classes), img_size=image_size, **setup["model"])
        save_artifact(model, teacher_dir, classes=classes, preprocess=PreprocessConfig(image_size=image_size),
                      extra={"role": "teacher (random weights, benchmark)"})
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"

    def config(name: str, store: str | None) -> DistillConfig:
        return DistillConfig.from_dict({
            "name": name, "out_dir": str(out / "runs"), "teacher": str(teacher_dir), "teacher_store": store,
            "keep_blocks": args.keep_blocks, "loss": {"a_cos": args.a_cos, "cos_tokens": "cls"},
            "data": {"dir": str(data_dir), "batch_size": args.batch_size or setup["batch_size"],
                     "num_workers": args.workers, "augment_on": "cpu"},
            "trainer": {"max_epochs": epochs, "precision": setup["precision"], "accelerator": accelerator, "devices": 1,
                        "progress": False, "limit_val_batches": 1, "log_every_n_steps": 50},
        })

    store_dir = out / "store"
    started = time.perf_counter()
    write_teacher_store(config("store", None), store_dir, device=args.device)
    store_seconds = time.perf_counter() - started
    header = read_header(store_dir)
    results = {}
    for mode, store in (("online", None), ("stored", str(store_dir))):
        cfg = config(mode, store)
        started = time.perf_counter()
        (result,) = distill(cfg)
        results[mode] = {"images_per_second": result.images_per_second, "wall_seconds": time.perf_counter() - started}
    ratio = results["stored"]["images_per_second"] / results["online"]["images_per_second"]
    report = {
        "device": args.device, "teacher": args.arch if not args.teacher else str(teacher_dir),
        "teacher_blocks": len(load_model(teacher_dir).model.blocks), "student_blocks": args.keep_blocks,
        "image_size": image_size, "epochs": epochs, "train_images": header["dataset"]["rows"],
        "batch_size": args.batch_size or setup["batch_size"], "precision": setup["precision"],
        "hidden": header["hidden"], "online": results["online"], "stored": results["stored"],
        "speedup_train_step": ratio,
        "store_seconds": store_seconds,
        "end_to_end_seconds": {"online": results["online"]["wall_seconds"],
                               "stored_including_store": store_seconds + results["stored"]["wall_seconds"]},
        "store_bytes": header["bytes"],
        "store_mb_per_1000_images_per_epoch": bytes_per_thousand_images_epoch(header) / 1e6,
    }
    lines = [
        "| mode | train img/s | run wall s |", "| --- | --- | --- |",
        f"| online teacher | {results['online']['images_per_second']:.1f} | {results['online']['wall_seconds']:.1f} |",
        f"| stored outputs | {results['stored']['images_per_second']:.1f} | {results['stored']['wall_seconds']:.1f} |",
        "",
        f"Speed-up of the training step (img/s, stored / online): {ratio:.2f}x. Writing the store: {store_seconds:.1f} s "
        f"for {epochs} epoch(s) of {header['dataset']['rows']} images; its size: "
        f"{report['store_mb_per_1000_images_per_epoch']:.3f} MB per 1,000 images per epoch (hidden: {header['hidden']}).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_store.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "distill_store.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
