"""`skindistil export`: an artifact to ONNX (dynamic batch), with a parity check against PyTorch and,
with --int8, a dynamically quantised copy with its top-1 agreement, size and CPU-latency change.

    skindistil export --model runs/student/model --int8 --images ../shared/data/ham10000/images --max-images 20

Writes model.onnx (and model.int8.onnx) and export.json into the artifact directory unless --out says
where the ONNX file goes (export.json is written next to it). Exits with 1 when the parity check fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="artifact: model/ or run directory")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    parser.add_argument("--int8", action="store_true", help="also write an int8 dynamically quantised model")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, at least 14)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="ONNX file (default <model dir>/model.onnx)")
    parser.add_argument(
        "--images",
        nargs="+",
        default=[],
        metavar="DIR_OR_FILE",
        help="images for the parity check and the int8 agreement, through the artifact's eval preprocessing",
    )
    parser.add_argument("--max-images", type=int, default=32, help="use at most this many images (default 32)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |logit difference| (default 1e-4)")
    parser.add_argument("--threads", type=int, help="onnxruntime CPU threads (default: onnxruntime's)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from skindistil.errors import ModelError
    from skindistil.inference.export import collect_images, export_artifact

    console = Console()
    found = collect_images(args.images, args.max_images) if args.images else None
    for problem in found.not_taken if found else []:
        console.print(f"not taken {problem.where}: {problem.reason}", markup=False, highlight=False)
    images = found.files if found else []
    record = export_artifact(
        args.model,
        out=args.out,
        int8=args.int8,
        opset=args.opset,
        images=images,
        tolerance=args.tolerance,
        threads=args.threads,
    )
    parity = record["parity"]
    onnx_path = Path(record["model"]) / record["onnx"] if args.out is None else args.out
    console.print(
        f"wrote {onnx_path} ({record['onnx_bytes'] / 1e6:.2f} MB, opset {record['opset']}, input {record['input']['shape']})"
    )
    console.print(
        f"parity: max abs logit difference {parity['max_abs_diff']:.3g} over {parity['random_inputs']} random inputs "
        f"and {parity['images']} images ({'ok' if parity['ok'] else 'FAILED'}, tolerance {parity['tolerance']:g})"
    )
    if "int8" in record:
        q = record["int8"]
        latency = q["cpu_latency_ms"]
        console.print(
            f"int8: {q['onnx']} {q['onnx_bytes'] / 1e6:.2f} MB ({q['size_ratio']:.1%} of fp32); "
            f"top-1 agreement with fp32 {q['top1_agreement']:.4f} on {q['num_inputs']} {q['agreement_on']}; "
            f"CPU latency at batch 1 {latency['fp32']:.2f} -> {latency['int8']:.2f} ms ({q['cpu_latency_change']:+.1%})"
        )
    if not parity["ok"]:
        raise ModelError(
            f"parity check failed: max abs logit difference {parity['max_abs_diff']:.3g} > tolerance "
            f"{parity['tolerance']:g} (recorded in {onnx_path.parent / 'export.json'})"
        )
    return 0
