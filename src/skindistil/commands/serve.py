"""`skindistil serve`: the REST API and web page for a model artifact.

    skindistil serve --model runs/student/model
    skindistil serve --model runs/student --host 0.0.0.0 --port 8080 --backend onnx --max-batch 16

Endpoints: POST /v1/predict and /v1/explain (multipart image upload in the field `file`), GET /v1/model,
/v1/stats, /health; the web page at /, the OpenAPI schema at /openapi.json. Requests that arrive together
run as one model call (--max-batch 1 turns batching off). The model is loaded, and run once at every
batch size the server will use (compiled backends build their graphs then), before the server accepts
requests, so a bad --model fails at once and no request waits for a compilation. Stop it with Ctrl+C.

No client can starve it: --max-connections are served at once (requests on more get 503), request
headers must arrive within --header-timeout seconds and bodies within --body-timeout (else the
connection is closed, or 408), and uploads are decoded only within --decode-memory-mb; /v1/stats
counts each refusal and cut-off. The soft limit on open files is raised to what --max-connections needs.
/docs works offline.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

# "torch" (= eager) and the names of skindistil.inference.backends.BACKENDS (not imported here: the
# CLI parses its arguments before loading PyTorch; a test keeps the two lists equal)
SERVE_BACKENDS = ["torch", "eager", "bf16", "compile", "bf16-compile", "fast", "onnx", "onnx-int8"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="artifact: model/ or run directory"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--backend",
        choices=SERVE_BACKENDS,
        default="torch",
        help="torch (PyTorch fp32); bf16 (autocast: about 3x the batched throughput on CPUs with AMX); "
        "compile, bf16-compile or fast (compiled for every batch size at start-up); onnx or onnx-int8 "
        "(onnxruntime; exported at start-up) (default torch)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most requests per model call; 1 disables batching (default 32)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch that is not full waits for more requests (default 5)",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted image file, MiB (default 20)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest accepted image, in decoded pixels (default 40,000,000)",
    )
    parser.add_argument("--tta", action="store_true", help="average probabilities over four flips of each image")
    parser.add_argument("--workers", type=int, help="image-decoding threads (default: CPU count, at most 8)")
    parser.add_argument(
        "--decode-memory-mb",
        type=float,
        default=2048.0,
        help="memory for the uploads being decoded, MiB: each takes its size + 40 bytes per pixel, the "
        "others wait on disk; must hold one upload at --max-upload-mb and --max-pixels (default 2048)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="connections served at once; requests on more are answered 503 (default 1024)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request's line and headers may take before the connection is closed (default 10)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a request's body may take after its headers before a 408 (default 60)",
    )
    parser.add_argument(
        "--operating-point",
        metavar="NAME",
        help="stored operating point whose binary decision /v1/predict reports (e.g. cancer@sens95; `all` or "
        "`none`); default: the artifact's default point, when it stores any",
    )
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="uvicorn's log level (default info)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from skindistil.errors import ModelError
    from skindistil.serve.app import create_app
    from skindistil.serve.server import raise_fd_limit, server_config
    from skindistil.serve.uploads import SERVE_MAX_PIXELS

    raise_fd_limit(args.max_connections)
    app = create_app(
        args.model,
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels or SERVE_MAX_PIXELS,
        device=args.device,
        tta=args.tta,
        workers=args.workers,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        decode_memory_mb=args.decode_memory_mb,
        operating_point=args.operating_point,
    )
    server = uvicorn.Server(server_config(app, args.host, args.port, args.log_level))
    # uvicorn shuts down gracefully on Ctrl+C, then re-raises it (as uvicorn.run, exit 0)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise ModelError(f"the server did not start: {app.state.startup_error or 'see the log above'}")
    return 0
