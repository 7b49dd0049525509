"""Inference backends: one model, several ways to run it, one call signature.

A backend turns a model into a callable `fn(batch) -> logits` for a float32 image batch [B, 3, H, W]
(already preprocessed) on the chosen device:

    eager         the PyTorch module as is, fp32
    bf16          the module under torch.autocast(dtype=torch.bfloat16)
    compile       torch.compile(module), fp32
    bf16-compile  torch.compile(module) under bf16 autocast (the usual fastest GPU setting)
    onnx          the module exported to ONNX (fp32), run by onnxruntime
    onnx-int8     that ONNX model with MatMul/Gemm weights quantised to int8 (dynamic quantisation)

The PyTorch backends call the module inside `torch.inference_mode()` and nothing else, so they add no
work over running the timm model directly. The onnxruntime backends return numpy arrays; they take a
torch tensor or a numpy array (a tensor on a GPU is copied to the host first, as onnxruntime's numpy
API would do anyway).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skindistil.errors import ConfigError, ModelError
from skindistil.models.artifact import LoadedModel, load_model

InferenceFn = Callable[[Any], Any]


class BackendUnavailable(ModelError):
    """A backend that cannot run on this machine (missing provider, package or device)."""


# ------------------------------------------------------------------------------------------ onnxruntime


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
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=_ort_providers(self.device))
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


def _ort_providers(device: torch.device) -> list:
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


# ------------------------------------------------------------------------------------------- PyTorch


class TorchRunner:
    """`module(x)` under torch.inference_mode, optionally inside autocast to `autocast_dtype`."""

    def __init__(self, module: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None):
        self.module = module
        self.device = device
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self.module(images)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Backend:
    """A named way to run a model. build(module, device, image_size, threads) -> InferenceFn.

    runtime: "torch" or "onnxruntime" (whose memory PyTorch's CUDA allocator does not see).
    """

    name: str
    description: str
    runtime: str
    build: Callable[[nn.Module, torch.device, tuple[int, int], int | None], InferenceFn]


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, description: str, runtime: str = "torch"):
    def decorator(build):
        BACKENDS[name] = Backend(name, description, runtime, build)
        return build

    return decorator


@register_backend("eager", "PyTorch eager, fp32")
def _build_eager(module, device, image_size, threads):
    return TorchRunner(module.eval().to(device), device)


@register_backend("bf16", "PyTorch eager under bf16 autocast")
def _build_bf16(module, device, image_size, threads):
    return TorchRunner(module.eval().to(device), device, torch.bfloat16)


@register_backend("compile", "torch.compile, fp32 (static shapes: one compilation per batch size)")
def _build_compile(module, device, image_size, threads):
    return TorchRunner(torch.compile(module.eval().to(device), dynamic=False), device)


@register_backend("bf16-compile", "torch.compile under bf16 autocast")
def _build_bf16_compile(module, device, image_size, threads):
    return TorchRunner(torch.compile(module.eval().to(device), dynamic=False), device, torch.bfloat16)


@register_backend("onnx", "ONNX (fp32) on onnxruntime", "onnxruntime")
def _build_onnx(module, device, image_size, threads):
    return _onnx_runner(module, device, image_size, threads, int8=False)


@register_backend("onnx-int8", "ONNX with int8 dynamic quantisation of MatMul/Gemm on onnxruntime", "onnxruntime")
def _build_onnx_int8(module, device, image_size, threads):
    return _onnx_runner(module, device, image_size, threads, int8=True)


def _onnx_runner(module, device, image_size, threads, *, int8: bool) -> OnnxRunner:
    # onnx and onnxruntime are the optional [export] extra, so they are imported only when used
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the onnx backends need onnx and onnxruntime (pip install 'skindistil[export]')") from None
    from skindistil.inference.export import export_onnx, quantize_int8

    _ort_providers(device)  # fail before the export when the device has no provider
    # onnxruntime reads the whole file into the session, so the files need not outlive it
    with tempfile.TemporaryDirectory(prefix="skindistil-onnx-") as tmp:
        path = export_onnx(module.eval(), Path(tmp) / "model.onnx", image_size=image_size)
        if int8:
            path = quantize_int8(path, Path(tmp) / "model.int8.onnx")
        return OnnxRunner(path, device, threads)


def check_backends(names) -> list[str]:
    """The names, validated against the registry (ConfigError naming the unknown ones)."""
    names = [str(n).strip() for n in names]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ConfigError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    return names


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model expects: a ViT's patch-embedding size, else timm's pretrained_cfg input_size."""
    vit = getattr(model, "vit", model)  # a DepthViT wraps its ViT
    patch_embed = getattr(vit, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        height, width = patch_embed.img_size
        return int(height), int(width)
    input_size = getattr(vit, "pretrained_cfg", {}).get("input_size")
    if input_size:
        return int(input_size[1]), int(input_size[2])
    raise ModelError(f"{type(model).__name__}: cannot tell its input size; pass image_size")


def build_backend(
    name: str,
    model,
    device: str | torch.device = "cpu",
    *,
    image_size: int | tuple[int, int] | None = None,
    threads: int | None = None,
) -> InferenceFn:
    """A callable images [B, 3, H, W] -> logits running `model` with backend `name` on `device`.

    model: an nn.Module (moved to `device` in place by the PyTorch backends), a LoadedModel, or an
    artifact path (model/ or run directory). image_size: the input size for the ONNX export (default:
    the artifact's preprocessing size, else read from the model). threads: onnxruntime intra-op threads.
    """
    (name,) = check_backends([name])
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        image_size = image_size or model.preprocess.image_size
        model = model.model
    if image_size is None:
        image_size = model_input_size(model)
    elif isinstance(image_size, int):
        image_size = (image_size, image_size)
    return BACKENDS[name].build(model, torch.device(device), tuple(image_size), threads)
