"""Load test of `skindistil serve`: N concurrent clients for T seconds, micro-batching on and off.

    .venv/bin/python benchmarks/load_serve.py                     # 6-block width-384 ViT at 224 px, random init
    .venv/bin/python benchmarks/load_serve.py --model runs/student/model --clients 32 --seconds 30
    .venv/bin/python benchmarks/load_serve.py --device cuda --out load.json

The server runs in this process (uvicorn in a thread, 127.0.0.1, a free port) twice on the same model:
with batching (--max-batch, default 32) and without (max batch 1). Each time, --clients clients post
real HAM10000 images to /v1/predict as fast as they are answered (httpx AsyncClient, one connection
each, spread over --client-processes processes so that they do not compete with the server for its
interpreter lock): --warmup seconds first, then --seconds measured. Reported per mode: throughput (answers per
second inside the window), p50/p99 latency, errors (non-200 answers and transport failures) and the
server's mean batch size; then the speedup of batching. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = Path(os.environ.get("SKINDISTIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "ham10000" / "images"


def build_default_model(out_dir: Path, depth: int, width: int, heads: int, image_size: int) -> Path:
    """A randomly initialised ViT (patch 16) saved as an artifact: speed does not depend on training."""
    import torch

    from skindistil.config import PreprocessConfig
    from skindistil.data.vocab import ISIC2019
    from skindistil.models import create_teacher, save_artifact

    torch.manual_seed(0)
    model = create_teacher(
        "vit_base_patch16_224",
        num_classes=len(ISIC2019),
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        img_size=image_size,
    )
    return save_artifact(
        model,
        out_dir / f"vit_{depth}x{width}_{image_size}px" / "model",
        classes=list(ISIC2019.names),
        preprocess=PreprocessConfig(image_size=image_size),
    )


async def closed_loop_clients(url: str, images: list[bytes], ids: range, window: tuple[float, float]) -> tuple[list, int]:
    """Clients `ids`, each posting, waiting for the answer, posting again, until the window ends.

    Returns the latencies (s) of the successful answers that finished inside the window, and the
    number of failed ones (non-200 answers and transport errors) inside it. Times are time.monotonic().
    """
    start, end = window
    latencies: list[float] = []
    errors = 0

    async def client(index: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            sent = index
            while (began := time.monotonic()) < end:
                data = images[sent % len(images)]
                sent += len(ids)
                try:
                    response = await http.post("/v1/predict", files={"file": ("lesion.jpg", data, "image/jpeg")})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                finished = time.monotonic()
                if start <= finished <= end:
                    if ok:
                        latencies.append(finished - began)
                    else:
                        errors += 1

    await asyncio.gather(*(client(i) for i in ids))
    return latencies, errors


def client_process(url, images, ids, barrier, window, results) -> None:
    """One process of clients (out of the server's process, so they do not compete for its GIL)."""
    barrier.wait()  # the window is set once every process is up
    results.put(asyncio.run(closed_loop_clients(url, images, ids, (window[0], window[1]))))


def run_load(url: str, images: list[bytes], clients: int, processes: int, warmup: float, seconds: float) -> dict:
    """`clients` closed-loop clients in `processes` processes: warm-up, then the measured window."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    window = context.Array("d", 2)
    results = context.Queue()
    workers = [
        context.Process(target=client_process, args=(url, images, range(i, clients, processes), barrier, window, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    now = time.monotonic()
    window[0], window[1] = now + warmup, now + warmup + seconds
    barrier.wait()
    with httpx.Client(base_url=url) as http:
        time.sleep(max(0.0, window[0] - time.monotonic()))
        before = http.get("/v1/stats").json()
        collected = [results.get() for _ in workers]
        after = http.get("/v1/stats").json()
    for worker in workers:
        worker.join()
    latencies = np.array([x for lat, _ in collected for x in lat]) * 1000
    batches = after["batches"] - before["batches"]
    return {
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "errors": sum(err for _, err in collected),
        "mean_batch_size": (after["requests"] - before["requests"]) / batches if batches else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact directory (default: a random ViT, see --depth etc.)")
    parser.add_argument("--depth", type=int, default=6, help="default model: blocks (default 6)")
    parser.add_argument("--width", type=int, default=384, help="default model: embedding width (default 384)")
    parser.add_argument("--heads", type=int, default=6, help="default model: attention heads (default 6)")
    parser.add_argument("--image-size", type=int, default=224, help="default model: input size (default 224)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"folder of JPEGs (default {DEFAULT_IMAGES})")
    parser.add_argument("--num-images", type=int, default=64, help="distinct images cycled through (default 64)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--client-processes",
        type=int,
        help="processes the clients are spread over (default: a quarter of the CPUs, at least 1, at most --clients)",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per mode (default 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default 3)")
    parser.add_argument("--max-batch", type=int, default=32, help="batching mode's max batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batching mode's max wait (default 5)")
    parser.add_argument("--backend", default="torch", help="torch, onnx or onnx-int8 (default torch)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    processes = min(args.clients, args.client_processes or max(1, (os.cpu_count() or 1) // 4))

    import torch

    from skindistil.models import load_model
    from skindistil.serve import create_app, serve_in_background

    paths = sorted(args.images.glob("*.jpg"))[: args.num_images]
    if not paths:
        parser.error(f"no .jpg images in {args.images}")
    images = [p.read_bytes() for p in paths]

    with tempfile.TemporaryDirectory(prefix="skindistil-load-") as tmp:
        model_dir = args.model or build_default_model(Path(tmp), args.depth, args.width, args.heads, args.image_size)
        loaded = load_model(model_dir, args.device)
        kw = loaded.config["architecture"]["kwargs"]
        print(
            f"model: {kw.get('depth')} blocks, width {kw.get('embed_dim')}, {loaded.preprocess.image_size} px, "
            f"{loaded.config.get('num_parameters', 0):,} parameters; backend {args.backend} on {args.device}; "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {args.clients} clients in {processes} "
            f"process(es), "
            f"{args.warmup:g} s warm-up + {args.seconds:g} s per mode; {len(images)} images from {args.images}",
            flush=True,
        )
        results = {}
        for mode, max_batch in (("batching", args.max_batch), ("no batching", 1)):
            app = create_app(loaded, backend=args.backend, max_batch=max_batch, max_wait_ms=args.max_wait_ms, device=args.device)
            with serve_in_background(app, log_level="error") as url:
                figures = run_load(url, images, args.clients, processes, args.warmup, args.seconds)
            results[mode] = {"max_batch": max_batch, **figures}
            print(f"{mode}: {figures}", flush=True)

    speedup = results["batching"]["throughput"] / results["no batching"]["throughput"]
    print()
    print("| mode | max batch | clients | throughput (req/s) | p50 (ms) | p99 (ms) | errors | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['max_batch']} | {args.clients} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch_size']:.1f} |"
        )
    print(f"\nbatching speedup: {speedup:.2f}x the throughput of batch-1 serving")
    if args.out:
        args.out.write_text(json.dumps({"settings": vars(args) | {"speedup": speedup}, "results": results}, indent=2, default=str) + "\n")
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
