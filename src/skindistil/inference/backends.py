"""Inference backends: one model, several ways to run it, one call signature.

A backend turns a model into a callable `fn(batch) -> logits` for a float32 image batch [B, 3, H, W]
(already preprocessed) on the chosen device:

    eager         the PyTorch module as is, fp32
    bf16          the module under torch.autocast(dtype=torch.bfloat16)
    compile       torch.compile(module), fp32
    bf16-compile  torch.compile(module) under bf16 autocast (plain timm's fastest GPU setting)
    fast          a bf16 copy of the module with the ViT patch embedding done as one matmul, compiled
                  (see `linear_patch_embed`): the fastest GPU setting here
    onnx          the module exported to ONNX (fp32), run by onnxruntime
    onnx-int8     that ONNX model with MatMul/Gemm weights quantised to int8 (dynamic quantisation)

The PyTorch backends call the module inside `torch.inference_mode()` and nothing else, so they add no
work over running the timm model directly. The compiled ones pad a batch whose size is not a power of
two up to the next one (zeros, cut off again after the call): torch.compile builds one graph per
batch size, and a server's batches come in every size, so this bounds the graphs to log2(max) + 1.
Benchmarks switch the padding off (`pad_batches=False`) so that a timed batch is the batch asked for. The onnxruntime backends return numpy arrays; they take a
torch tensor or a numpy array (a tensor on a GPU is copied to the host first, as onnxruntime's numpy
API would do anyway).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from skindistil.errors import BackendUnavailable, ConfigError, ModelError
from skindistil.inference.onnx import OnnxRunner, export_onnx, ort_providers, quantize_int8
from skindistil.models.artifact import LoadedModel, load_model

InferenceFn = Callable[[Any], Any]


# ------------------------------------------------------------------------------------------- PyTorch


# graphs a compiled runner may hold: one per power-of-two batch size up to 2**15
_COMPILED_GRAPHS = 16


class TorchRunner:
    """`module(x)` under torch.inference_mode, optionally inside autocast to `autocast_dtype`.

    input_dtype: the dtype images are cast to first (a module converted to bf16 takes bf16); the
    logits come back as float32 then. pad_batches: pad a batch to the next power of two (for compiled
    modules: one graph per padded size).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        *,
        input_dtype: torch.dtype | None = None,
        pad_batches: bool = False,
    ):
        self.module = module
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.input_dtype = input_dtype
        self.pad_batches = pad_batches

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.pad_batches:
            # dynamo's default limit (8 graphs per function) would send larger batches to eager unannounced
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=_COMPILED_GRAPHS))
        return stack

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if self.pad_batches and count & (count - 1):
            padded = 1 << (count - 1).bit_length()
            images = torch.cat([images, images.new_zeros(padded - count, *images.shape[1:])])
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        with self._context():
            logits = self.module(images)
        if self.input_dtype is not None:
            logits = logits.float()
        return logits[:count] if logits.shape[0] != count else logits


class LinearPatchEmbed(nn.Module):
    """A timm PatchEmbed whose convolution (kernel = stride, no padding) runs as one matmul over the
    flattened patches.

    It computes the same thing (the convolution is that matmul), in a form the compiler fuses: on an
    H100 at batch 256 the cuDNN convolution and its NCHW/NHWC conversions took 2.1 of the 12.7 ms of a
    6-block ViT-B/16's forward pass. Keeps img_size, patch_size and num_patches; output [B, N, D].
    """

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        conv = patch_embed.proj
        self.img_size = tuple(patch_embed.img_size)
        self.patch_size = tuple(conv.kernel_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # conv weight [D, C, ph, pw] flattens in the (C, ph, pw) order the patches are flattened in below
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.norm = patch_embed.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if (height, width) != self.img_size:
            raise ModelError(f"expected images of {self.img_size[0]}x{self.img_size[1]} px, got {height}x{width}")
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        patches = x.reshape(batch, channels, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, self.num_patches, channels * ph * pw)
        return self.norm(F.linear(patches, self.weight, self.bias))


def linear_patch_embed(model: nn.Module) -> bool:
    """Swap a ViT's (or MultiExitViT's) timm PatchEmbed for `LinearPatchEmbed`, in place, where that is
    exact: a plain convolution with kernel = stride, flattened output, fixed image size. Returns
    whether it was swapped."""
    vit = getattr(model, "vit", model)
    patch_embed = getattr(vit, "patch_embed", None)
    conv = getattr(patch_embed, "proj", None)
    exact = (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and getattr(patch_embed, "flatten", False)
        and not getattr(patch_embed, "dynamic_img_pad", False)
        and getattr(patch_embed, "img_size", None) is not None
        and all(s % k == 0 for s, k in zip(patch_embed.img_size, conv.kernel_size, strict=True))
    )
    if exact:
        vit.patch_embed = LinearPatchEmbed(patch_embed)
    return bool(exact)


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Backend:
    """A named way to run a model. build(module, device, image_size, threads, pad_batches) -> InferenceFn.

    runtime: "torch" or "onnxruntime" (whose memory PyTorch's CUDA allocator does not see).
    """

    name: str
    description: str
    runtime: str
    build: Callable[[nn.Module, torch.device, tuple[int, int], int | None, bool], InferenceFn]
    compiled: bool = False  # torch.compile: one graph per (padded) batch size, built on first use


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, description: str, runtime: str = "torch", compiled: bool = False):
    def decorator(build):
        BACKENDS[name] = Backend(name, description, runtime, build, compiled)
        return build

    return decorator


@register_backend("eager", "PyTorch eager, fp32")
def _build_eager(module, device, image_size, threads, pad_batches):
    return TorchRunner(module.eval().to(device), device)


@register_backend("bf16", "PyTorch eager under bf16 autocast")
def _build_bf16(module, device, image_size, threads, pad_batches):
    return TorchRunner(module.eval().to(device), device, torch.bfloat16)


@register_backend("compile", "torch.compile, fp32 (static shapes: one compilation per batch size)", compiled=True)
def _build_compile(module, device, image_size, threads, pad_batches):
    compiled = torch.compile(module.eval().to(device), dynamic=False)
    return TorchRunner(compiled, device, pad_batches=pad_batches)


@register_backend("bf16-compile", "torch.compile under bf16 autocast", compiled=True)
def _build_bf16_compile(module, device, image_size, threads, pad_batches):
    compiled = torch.compile(module.eval().to(device), dynamic=False)
    return TorchRunner(compiled, device, torch.bfloat16, pad_batches=pad_batches)


@register_backend(
    "fast", "bf16 weights, patch embedding as one matmul, torch.compile (a copy of the model)", compiled=True
)
def _build_fast(module, device, image_size, threads, pad_batches):
    # a copy: the caller's module stays fp32 (a server explains with it, an evaluation compares with it)
    fast = copy.deepcopy(module).eval()
    linear_patch_embed(fast)
    compiled = torch.compile(fast.to(device=device, dtype=torch.bfloat16), dynamic=False)
    return TorchRunner(compiled, device, input_dtype=torch.bfloat16, pad_batches=pad_batches)


@register_backend("onnx", "ONNX (fp32) on onnxruntime", "onnxruntime")
def _build_onnx(module, device, image_size, threads, pad_batches):
    return _onnx_runner(module, device, image_size, threads, int8=False)


@register_backend("onnx-int8", "ONNX with int8 dynamic quantisation of MatMul/Gemm on onnxruntime", "onnxruntime")
def _build_onnx_int8(module, device, image_size, threads, pad_batches):
    return _onnx_runner(module, device, image_size, threads, int8=True)


def _onnx_runner(module, device, image_size, threads, *, int8: bool) -> OnnxRunner:
    # onnx and onnxruntime are the optional [export] extra, so they are imported only when used
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the onnx backends need onnx and onnxruntime (pip install 'skindistil[export]')") from None
    ort_providers(device)  # fail before the export when the device has no provider
    # onnxruntime reads the whole file into the session, so the files need not outlive it
    with tempfile.TemporaryDirectory(prefix="skindistil-onnx-") as tmp:
        path = export_onnx(module.eval(), Path(tmp) / "model.onnx", image_size=image_size)
        if int8:
            path = quantize_int8(path, Path(tmp) / "model.int8.onnx")
        return OnnxRunner(path, device, threads)


def warmup_batch_sizes(name: str, max_batch: int) -> list[int]:
    """The batch sizes to run once before serving batches of 1..max_batch with backend `name`.

    Compiled backends (which pad to powers of two): every power of two up to max_batch rounded up, so
    no request waits for a compilation. Others: 1 and max_batch (first-call set-up of the kernels).
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if BACKENDS[name].compiled:
        return [1 << k for k in range((max_batch - 1).bit_length() + 1)]
    return sorted({1, max_batch})


def check_backends(names) -> list[str]:
    """The names, validated against the registry (ConfigError naming the unknown ones)."""
    names = [str(n).strip() for n in names]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ConfigError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    return names


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model expects: a ViT's patch-embedding size, else timm's pretrained_cfg input_size."""
    vit = getattr(model, "vit", model)  # a MultiExitViT wraps its ViT
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
    pad_batches: bool = True,
) -> InferenceFn:
    """A callable images [B, 3, H, W] -> logits running `model` with backend `name` on `device`.

    model: an nn.Module (moved to `device` in place by the PyTorch backends), a LoadedModel, or an
    artifact path (model/ or run directory). image_size: the input size for the ONNX export (default:
    the artifact's preprocessing size, else read from the model). threads: onnxruntime intra-op threads.
    pad_batches: let the compiled backends pad batches to a power of two (see the module doc).
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
    return BACKENDS[name].build(model, torch.device(device), tuple(image_size), threads, pad_batches)
