"""ONNX files: export a PyTorch classifier, quantise it to int8, run it with onnxruntime.

The export uses torch.onnx's TorchScript exporter (`dynamo=False`): the dynamo exporter needs the
onnxscript package, which is not a dependency. timm's fused attention (scaled_dot_product_attention)
exports as plain ONNX ops at opset >= 14, so it stays on. The batch axis is dynamic: one file serves
any batch size. onnx and onnxruntime are the optional [export] extra, imported only when used.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skindistil.errors import BackendUnavailable, ConfigError, ModelError
from skindistil.files import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention has an ONNX translation from opset 14


def export_onnx(
    model: nn.Module, path: str | Path, *, image_size: int | tuple[int, int], opset: int = DEFAULT_OPSET
) -> Path:
    """Write `model` (eval mode) to `path` as ONNX: input 'images' [batch, 3, H, W] -> output 'logits'."""
    if not MIN_OPSET <= opset <= 20:
        raise ConfigError(f"opset {opset}: supported range is {MIN_OPSET}..20")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    # a batch of 2 keeps the tracer from folding a batch size of 1 into the graph as a constant
    example = torch.zeros(2, 3, height, width, device=device)
    model.eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-side shape checks (timm's image-size asserts) and the exporter
        # about being the legacy one; a shape baked into the graph shows up in the parity check instead,
        # which runs the file at two batch sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with atomic_path(path) as tmp:
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    return path


class _DropRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """int8 dynamic quantisation of the MatMul and Gemm weights (per output channel) of an ONNX model.

    Activations are quantised on the fly per batch (onnxruntime.quantization.quantize_dynamic), so no
    calibration data is needed. Returns `out_path`.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    # quantize_dynamic logs a generic advice to run shape-inference pre-processing on the root logger;
    # ViT graphs quantise fine without it, so the advice is dropped rather than shown on every export
    advice = _DropRecord("Please consider to run pre-processing before quantization")
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        with atomic_path(out_path) as tmp:
            quantize_dynamic(
                str(onnx_path),
                str(tmp),
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                weight_type=QuantType.QInt8,
            )
    finally:
        root.removeFilter(advice)
    return out_path


class OnnxRunner:
    """An onnxruntime session over an exported classifier: images [B, 3, H, W] -> logits [B, C].

    device: "cpu" or "cuda[:index]" (the latter needs onnxruntime-gpu's CUDAExecutionProvider).
    threads: intra-op threads; None leaves onnxruntime's default (one per physical core).
    """

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: ONNX file not found")
        self.file_bytes = self.path.stat().st_size  # the initialisers the session holds (the file may go)
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=ort_providers(self.device))
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelError(f"{self.path}: onnxruntime cannot load this model ({exc})") from None
        self.threads = threads
        self.input_name = self.session.get_inputs()[0].name

    @property
    def input_shape(self) -> list:
        """The model input's shape; the batch axis is a name (e.g. 'batch') when it is dynamic."""
        return list(self.session.get_inputs()[0].shape)

    def __call__(self, images) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        batch = np.ascontiguousarray(images, dtype=np.float32)
        if batch.ndim != 4:
            raise ModelError(f"{self.path.name}: expected images [B, 3, H, W], got shape {list(batch.shape)}")
        return self.session.run(None, {self.input_name: batch})[0]


def ort_providers(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu to run ONNX on CUDA)"
            )
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    raise BackendUnavailable(f"onnxruntime backends support cpu and cuda devices, not {device.type!r}")
