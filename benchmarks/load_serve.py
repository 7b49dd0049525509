"""Load test of `skindistil serve`: N concurrent clients for T seconds, micro-batching on and off.

    .venv/bin/python benchmarks/load_serve.py                     # the ham10000-scratch student's shape
    .venv/bin/python benchmarks/load_serve.py --image-size 224 --backends torch,bf16,onnx-int8
    .venv/bin/python benchmarks/load_serve.py --model runs/student/model --clients 32 --rounds 5
    .venv/bin/python benchmarks/load_serve.py --backends torch,bf16,fast --out load.json
    .venv/bin/python benchmarks/load_serve.py --device cuda --backends fast
    .venv/bin/python benchmarks/load_serve.py --scenario slow-clients --slow 600 --seconds 15
    .venv/bin/python benchmarks/load_serve.py --scenario large-uploads --uploads 40

The servers run in this process (uvicorn in threads, 127.0.0.1, free ports), two per backend on the
same model: with batching (--max-batch, default 32) and without (max batch 1). All of them start, and
warm their backends up (compiled backends build their graphs then), before anything is measured. Then
--rounds rounds each give every server one window of load in turn, so a change in the machine's load
(a shared VM is noisy) hits every configuration alike: --clients clients post real HAM10000 images to
/v1/predict as fast as they are answered, for --warmup seconds and then --seconds measured. The
clients send pre-built HTTP/1.1 requests over raw asyncio streams, one keep-alive connection each, so
the load generator takes little of the shared cores; they run in --client-processes processes so that
they do not compete with the server for its interpreter lock.

Reported per configuration, over its windows: throughput (answers per second), each window's
throughput, p50/p99 latency, errors (non-200 answers and transport failures) and the server's mean
batch size; then the speedup of batching per backend, and the best batched configuration against the
best batch-1 one. Traffic goes to 127.0.0.1 only.

--scenario slow-clients: one batching server; --slow connections (from a process of their own) each
send the start of a request and then one header byte every --slow-interval seconds, reconnecting when
the server closes them; once all are open, --clients well-behaved clients load the server as above.
Reported: the slow connections open when the window started and still open when it ended, the
reconnections, the well-behaved answers (200s per second, errors, p50/p99), the server's counters
(/v1/stats: header timeouts, refusals, peak connections) and the process's peak RSS.

--scenario large-uploads: --uploads simultaneous uploads of one ~--upload-mb MB JPEG (a real HAM10000
image enlarged to --upload-side px with noise, so that it compresses badly); reported: the statuses,
the time until all are answered, and the server process's RSS before and at its peak (sampled every
5 ms), i.e. the memory these uploads take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import threading
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


BOUNDARY = "skindistil-load-boundary"


def predict_request(host: str, port: int, image: bytes) -> bytes:
    """The complete HTTP/1.1 request (keep-alive) that uploads `image` to /v1/predict, built once."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="lesion.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    """Send one request, read its whole answer; True for a 200 carrying a prediction."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    return head[9:12] == b"200" and b'"top_class"' in body


async def closed_loop_clients(url: str, images: list[bytes], ids: range, window: tuple[float, float]) -> tuple[list, int]:
    """Clients `ids`, each posting, waiting for the answer, posting again, until the window ends.

    Each client keeps one HTTP/1.1 connection and sends pre-built requests over raw asyncio streams:
    a load generator this light leaves the (shared) cores to the server, as a separate machine of
    clients would. Returns the latencies (s) of the successful answers that finished inside the
    window, and the number of failed ones (other answers, transport errors) inside it. Times are
    time.monotonic().
    """
    start, end = window
    host, port = httpx.URL(url).host, httpx.URL(url).port
    requests = [predict_request(host, port, image) for image in images]
    latencies: list[float] = []
    errors = 0

    async def client(index: int) -> None:
        nonlocal errors
        sent = index
        reader = writer = None
        while (began := time.monotonic()) < end:
            request = requests[sent % len(requests)]
            sent += len(ids)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                ok = await asyncio.wait_for(exchange(reader, writer, request), 120)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                ok = False
                if writer is not None:
                    writer.close()
                reader = writer = None  # reconnect for the next request
            finished = time.monotonic()
            if start <= finished <= end:
                if ok:
                    latencies.append(finished - began)
                else:
                    errors += 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(i) for i in ids))
    return latencies, errors


def client_process(url, images, ids, barrier, window, results) -> None:
    """One process of clients (out of the server's process, so they do not compete for its GIL)."""
    try:
        import uvloop  # the event loop uvicorn itself uses when it is installed

        uvloop.install()
    except ImportError:
        pass
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
    return {
        "seconds": seconds,
        "latencies_ms": [x * 1000 for lat, _ in collected for x in lat],
        "errors": sum(err for _, err in collected),
        "model_requests": after["requests"] - before["requests"],
        "batches": after["batches"] - before["batches"],
    }


# ------------------------------------------------------------------------------ starvation scenarios


class RssSampler:
    """This process's resident memory (VmRSS), sampled every `interval` s in a thread: `peak_mb`."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mb = self.now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def slow_connections(host: str, port: int, count: int, interval: float, opened, stop) -> dict:
    """`count` connections that each send the start of a request and then one header byte every
    `interval` s (a slowloris); one the server closes is reconnected. `opened` is set once all are
    open; runs until `stop` is set. Returns the counts of connections open at the start, still open at
    the end (never cut off) and reconnections."""
    first_open = set()
    reconnects = 0

    async def one(index: int) -> None:
        nonlocal reconnects
        first = True
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
                await writer.drain()
            except OSError:
                await asyncio.sleep(interval)
                continue
            if first:
                first_open.add(index)
            while not stop.is_set():
                await asyncio.sleep(interval)
                if reader.at_eof():
                    break
                try:
                    writer.write(b"a")
                    await writer.drain()
                except OSError:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1024), 0.001)  # notices a close (and any answer)
            else:
                writer.close()
                return  # held to the end
            writer.close()  # closed by the server: cut off
            if first:
                first_open.discard(index)
                first = False
            reconnects += 1

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    while len(first_open) < count and not stop.is_set():
        await asyncio.sleep(0.05)
    at_start = len(first_open)
    opened.set()
    await asyncio.gather(*tasks)
    return {"open_at_start": at_start, "held_to_end": len(first_open), "reconnects": reconnects}


def slow_process(url: str, count: int, interval: float, opened, stop, results) -> None:
    host, port = httpx.URL(url).host, httpx.URL(url).port

    async def run() -> dict:
        loop_stop = asyncio.Event()
        watcher = threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(loop_stop.set)), daemon=True)
        loop = asyncio.get_running_loop()
        watcher.start()
        return await slow_connections(host, port, count, interval, opened, loop_stop)

    results.put(asyncio.run(run()))


def slow_clients_scenario(url: str, images: list[bytes], args, processes: int) -> dict:
    """The --scenario slow-clients measurement against the server at `url` (see the module docstring)."""
    context = multiprocessing.get_context("spawn")
    opened, stop, results = context.Event(), context.Event(), context.Queue()
    attacker = context.Process(target=slow_process, args=(url, args.slow, args.slow_interval, opened, stop, results))
    with RssSampler() as rss:
        attacker.start()
        if not opened.wait(120):
            raise RuntimeError(f"could not open {args.slow} slow connections in 120 s")
        window = run_load(url, images, args.clients, processes, args.warmup, args.seconds)
        stop.set()
        slow = results.get(timeout=120)
        attacker.join()
    stats = httpx.get(f"{url}/v1/stats").json()
    figures = combine_windows([window])
    return {
        "slow_connections": args.slow,
        **slow,
        "served": figures["requests"],
        "served_per_s": figures["throughput"],
        "errors": figures["errors"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "header_timeouts": stats.get("header_timeouts", "n/a"),
        "connections_refused": stats.get("connections_refused", "n/a"),
        "connections_peak": stats.get("connections_peak", "n/a"),
        "rss_peak_mb": rss.peak_mb,
    }


def large_upload(path: Path, side: int, target_mb: float) -> bytes:
    """A JPEG of about `target_mb` MB: the image at `path` enlarged to `side` px wide with noise added
    (noise compresses badly), at the lowest quality from 85 to 100 that reaches the size."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    height = round(side * image.height / image.width)
    pixels = np.asarray(image.resize((side, height), Image.BILINEAR), dtype=np.int16)
    noise = np.random.default_rng(0).normal(0, 24, pixels.shape).astype(np.int16)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    data = b""
    for quality in range(85, 101, 3):
        buffer = io.BytesIO()
        noisy.save(buffer, "JPEG", quality=quality)
        data = buffer.getvalue()
        if len(data) >= target_mb * 1e6:
            break
    return data


async def simultaneous_uploads(url: str, request: bytes, count: int) -> list[str]:
    """`count` connections each sending `request` at once; the status code of each answer."""
    host, port = httpx.URL(url).host, httpx.URL(url).port

    async def one() -> str:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 300)
            writer.close()
            return head[9:12].decode()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            return type(exc).__name__

    return await asyncio.gather(*(one() for _ in range(count)))


def upload_process(url: str, request: bytes, count: int, results) -> None:
    results.put(asyncio.run(simultaneous_uploads(url, request, count)))


def large_uploads_scenario(url: str, image_path: Path, args) -> dict:
    """The --scenario large-uploads measurement against the server at `url` (see the module docstring)."""
    from collections import Counter

    data = large_upload(image_path, args.upload_side, args.upload_mb)
    host, port = httpx.URL(url).host, httpx.URL(url).port
    request = predict_request(host, port, data).replace(b"keep-alive", b"close")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    sender = context.Process(target=upload_process, args=(url, request, args.uploads, results))
    before = RssSampler.now_mb()
    with RssSampler() as rss:
        started = time.monotonic()
        sender.start()
        statuses = results.get(timeout=600)
        elapsed = time.monotonic() - started
        sender.join()
    return {
        "uploads": args.uploads,
        "upload_mb": len(data) / 1e6,
        "statuses": dict(Counter(statuses)),
        "seconds": elapsed,
        "rss_before_mb": before,
        "rss_peak_mb": rss.peak_mb,
        "rss_growth_mb": rss.peak_mb - before,
    }


def run_scenario(args, loaded, images: list[bytes], paths: list[Path], processes: int) -> dict:
    """Start one batching server with the given limits, run the scenario, print and return its figures."""
    from skindistil.serve import create_app, serve_in_background

    limits = {
        key: value
        for key, value in (("header_timeout_s", args.header_timeout), ("decode_memory_mb", args.decode_memory_mb))
        if value is not None  # unset: the server's defaults (and a version without these options runs)
    }
    app = create_app(loaded, backend=args.backends.split(",")[0], max_batch=args.max_batch,
                     max_wait_ms=args.max_wait_ms, device=args.device, **limits)
    with serve_in_background(app, log_level="error", timeout=1800) as url:
        if args.scenario == "slow-clients":
            figures = slow_clients_scenario(url, images, args, processes)
        else:
            figures = large_uploads_scenario(url, paths[0], args)
        serving = httpx.get(f"{url}/v1/model").json()["serving"]
    figures["server"] = {k: serving.get(k) for k in ("max_connections", "header_timeout_s", "body_timeout_s",
                                                     "decode_memory_mb")}
    print()
    print("| figure | value |")
    print("| --- | --- |")
    for key, value in figures.items():
        print(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return figures


def combine_windows(windows: list[dict]) -> dict:
    """One configuration's figures over its measured windows: answers per second over all of them,
    latency percentiles over all answers, errors, the server's mean batch size, and the throughput
    of each window (its spread shows the machine's noise)."""
    latencies = np.array([x for w in windows for x in w["latencies_ms"]])
    seconds = sum(w["seconds"] for w in windows)
    batches = sum(w["batches"] for w in windows)
    return {
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "window_throughputs": [len(w["latencies_ms"]) / w["seconds"] for w in windows],
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        "errors": sum(w["errors"] for w in windows),
        "mean_batch_size": sum(w["model_requests"] for w in windows) / batches if batches else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact directory (default: a random ViT, see --depth etc.)")
    parser.add_argument("--depth", type=int, default=6, help="default model: blocks (default 6)")
    parser.add_argument("--width", type=int, default=384, help="default model: embedding width (default 384)")
    parser.add_argument("--heads", type=int, default=6, help="default model: attention heads (default 6)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="default model: input size (default 128: with 6 blocks of width 384, the student that "
        "configs/ham10000-scratch.yaml distills)",
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"folder of JPEGs (default {DEFAULT_IMAGES})")
    parser.add_argument("--num-images", type=int, default=64, help="distinct images cycled through (default 64)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--client-processes",
        type=int,
        help="processes the clients are spread over (default: a quarter of the CPUs, at least 1, at most --clients)",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per window (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window (default 2)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds; each measures one window of every configuration in turn, so that a change in the "
        "machine's load hits all of them alike (default 3)",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="batching mode's max batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batching mode's max wait (default 5)")
    parser.add_argument(
        "--backends",
        default="torch",
        help="comma-separated serving backends, each measured with and without batching (default torch)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--scenario",
        choices=["throughput", "slow-clients", "large-uploads"],
        default="throughput",
        help="throughput (batching on and off), slow-clients or large-uploads (see above; default throughput)",
    )
    parser.add_argument("--slow", type=int, default=600, help="slow-clients: slow connections (default 600)")
    parser.add_argument(
        "--slow-interval", type=float, default=1.0, help="slow-clients: seconds between their header bytes (default 1)"
    )
    parser.add_argument("--uploads", type=int, default=40, help="large-uploads: simultaneous uploads (default 40)")
    parser.add_argument("--upload-mb", type=float, default=14.0, help="large-uploads: upload size, MB (default 14)")
    parser.add_argument(
        "--upload-side", type=int, default=5000, help="large-uploads: the upload's width in pixels (default 5000)"
    )
    parser.add_argument("--header-timeout", type=float, help="server's header timeout, s (default: the server's)")
    parser.add_argument("--decode-memory-mb", type=float, help="server's decoding memory, MiB (default: the server's)")
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
        kw = loaded.architecture["kwargs"]
        print(
            f"model: {kw.get('depth')} blocks, width {kw.get('embed_dim')}, {loaded.preprocess.image_size} px, "
            f"{loaded.config.get('num_parameters', 0):,} parameters; backends {args.backends} on {args.device}; "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {args.clients} clients in {processes} "
            f"process(es), "
            f"{args.rounds} round(s) of {args.warmup:g} s warm-up + {args.seconds:g} s per configuration; "
            f"{len(images)} images from {args.images}",
            flush=True,
        )
        if args.scenario != "throughput":
            figures = run_scenario(args, loaded, images, paths, processes)
            if args.out:
                args.out.write_text(json.dumps({"settings": vars(args), "figures": figures}, indent=2, default=str) + "\n")
            return 0
        configs = [
            (backend, mode, max_batch)
            for backend in [b.strip() for b in args.backends.split(",") if b.strip()]
            for mode, max_batch in (("batching", args.max_batch), ("no batching", 1))
        ]
        windows: dict[tuple, list] = {config: [] for config in configs}
        with contextlib.ExitStack() as stack:
            urls = {}
            for backend, mode, max_batch in configs:
                app = create_app(loaded, backend=backend, max_batch=max_batch, max_wait_ms=args.max_wait_ms, device=args.device)
                # the timeout covers the start-up warm-up (a compiled backend compiles every batch size)
                urls[backend, mode, max_batch] = stack.enter_context(serve_in_background(app, log_level="error", timeout=1800))
            for round_index in range(args.rounds):
                for config in configs:
                    window = run_load(urls[config], images, args.clients, processes, args.warmup, args.seconds)
                    windows[config].append(window)
                    print(
                        f"round {round_index + 1}/{args.rounds}, {config[0]}, {config[1]}: "
                        f"{len(window['latencies_ms']) / window['seconds']:.1f} req/s, {window['errors']} errors",
                        flush=True,
                    )
        results = [
            {"backend": backend, "mode": mode, "max_batch": max_batch, **combine_windows(windows[backend, mode, max_batch])}
            for backend, mode, max_batch in configs
        ]

    print()
    print(
        "| backend | mode | max batch | clients | throughput (req/s) | windows (req/s) | p50 (ms) | p99 (ms) "
        "| errors | mean batch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        spread = f"{min(r['window_throughputs']):.1f}-{max(r['window_throughputs']):.1f}"
        print(
            f"| {r['backend']} | {r['mode']} | {r['max_batch']} | {args.clients} | {r['throughput']:.1f} | {spread} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch_size']:.1f} |"
        )
    print()
    speedups = summarize(results)
    for line in speedups["lines"]:
        print(line)
    if args.out:
        document = {"settings": vars(args), "results": results, "speedups": speedups["figures"]}
        args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0 if all(r["errors"] == 0 for r in results) else 1


def summarize(results: list[dict]) -> dict:
    """Batching speedup per backend (same backend, batching vs batch-1 serving) and the best batched
    configuration against the best batch-1 configuration, as printable lines and figures."""
    by = {(r["backend"], r["mode"]): r["throughput"] for r in results}
    figures, lines = {}, []
    for backend in dict.fromkeys(r["backend"] for r in results):
        speedup = by[backend, "batching"] / by[backend, "no batching"]
        figures[backend] = speedup
        lines.append(f"{backend}: batching gives {speedup:.2f}x the throughput of batch-1 serving")
    best_on = max((r for r in results if r["mode"] == "batching"), key=lambda r: r["throughput"])
    best_off = max((r for r in results if r["mode"] == "no batching"), key=lambda r: r["throughput"])
    figures["best_vs_best"] = best_on["throughput"] / best_off["throughput"]
    lines.append(
        f"best batched ({best_on['backend']}, {best_on['throughput']:.1f} req/s) vs best batch-1 "
        f"({best_off['backend']}, {best_off['throughput']:.1f} req/s): {figures['best_vs_best']:.2f}x"
    )
    return {"figures": figures, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
