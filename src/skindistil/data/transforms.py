"""Train and eval transforms at the cached scale: a per-sample torchvision v2 path and a batched path.

The paper's training augmentation (SPEC.md) works on a shorter side of 450: shift/scale/rotate
(shift 5%, scale 5%, rotation up to 90 degrees, p=0.75, reflected borders as in albumentations'
ShiftScaleRotate), a random 400x400 crop, RGB shift (+-15 per channel, p=0.5), brightness/contrast
(+-0.2, p=0.5), resize to 224, scale to [0, 1], normalise. Here the same geometry is expressed at any
scale by `PreprocessConfig`: the shorter side is taken to `resize_size` = image_size / crop_fraction
and a crop of image_size is taken from it, so a crop always covers `crop_fraction` of the shorter side.
Evaluation uses the same scale with a centre crop (no aspect squash).

The geometric part (shift/scale/rotate + random crop + final resize) is one affine map from output to
input pixels, sampled once with `F.grid_sample`: one interpolation instead of three, reflected borders
instead of black corners, and only the output pixels are computed. The per-sample train transform
(`build_train_transform`, CPU DataLoader workers) and the batched `BatchAugment` (a whole uint8 batch
on the GPU) share that map and the colour formulas, so they draw from the same augmentation family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from skindistil.config import PreprocessConfig

# Luma weights of torchvision's rgb_to_grayscale (contrast blends towards the mean luma).
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and magnitudes of the training augmentation (defaults: the paper's).

    affine_p: probability of the shift/scale/rotate step.
    max_shift: shift as a fraction of the image's width and height, uniform in [-max, max].
    max_scale: zoom factor uniform in [1 - max, 1 + max].
    max_rotation: rotation in degrees, uniform in [-max, max].
    rgb_shift_p / max_rgb_shift: per-channel additive shift in 0-255 intensity units.
    brightness_contrast_p / max_brightness / max_contrast: multiplicative brightness factor and
    contrast factor (blend with the mean luma), each uniform in [1 - max, 1 + max].
    """

    affine_p: float = 0.75
    max_shift: float = 0.05
    max_scale: float = 0.05
    max_rotation: float = 90.0
    rgb_shift_p: float = 0.5
    max_rgb_shift: float = 15.0
    brightness_contrast_p: float = 0.5
    max_brightness: float = 0.2
    max_contrast: float = 0.2


PAPER_AUGMENT = AugmentConfig()


@dataclass(frozen=True)
class GeometryParams:
    """Per-sample geometry of a batch (all tensors have leading dimension B).

    rotation: radians. scale: zoom factor (>1 enlarges). shift: [B, 2] (x, y) as fractions of the
    resized image's width and height. crop_offset: [B, 2] (x, y) in [-1, 1], the crop centre's place in
    the room the resized image leaves around the crop (0 = centre crop).
    """

    rotation: Tensor
    scale: Tensor
    shift: Tensor
    crop_offset: Tensor

    @classmethod
    def identity(cls, batch_size: int) -> GeometryParams:
        """No shift/scale/rotate and a centre crop: the eval geometry."""
        return cls(
            rotation=torch.zeros(batch_size),
            scale=torch.ones(batch_size),
            shift=torch.zeros(batch_size, 2),
            crop_offset=torch.zeros(batch_size, 2),
        )


@dataclass(frozen=True)
class ColourParams:
    """Per-sample colour changes: rgb_shift [B, 3] (0-255 units), brightness and contrast factors [B]."""

    rgb_shift: Tensor
    brightness: Tensor
    contrast: Tensor

    @classmethod
    def identity(cls, batch_size: int) -> ColourParams:
        return cls(torch.zeros(batch_size, 3), torch.ones(batch_size), torch.ones(batch_size))


def _uniform(shape, limit: float, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * limit


def _coin(batch_size: int, p: float, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(batch_size, generator=generator) < p).float()


def sample_geometry(
    batch_size: int, aug: AugmentConfig, *, random_crop: bool = True, generator: torch.Generator | None = None
) -> GeometryParams:
    """Draw shift/scale/rotate (each sample with probability `aug.affine_p`) and a random crop place."""
    applied = _coin(batch_size, aug.affine_p, generator)
    rotation = _uniform(batch_size, math.radians(aug.max_rotation), generator) * applied
    scale = 1 + _uniform(batch_size, aug.max_scale, generator) * applied
    shift = _uniform((batch_size, 2), aug.max_shift, generator) * applied[:, None]
    crop_offset = _uniform((batch_size, 2), 1.0, generator)
    if not random_crop:
        crop_offset = torch.zeros_like(crop_offset)
    return GeometryParams(rotation, scale, shift, crop_offset)


def sample_colour(batch_size: int, aug: AugmentConfig, *, generator: torch.Generator | None = None) -> ColourParams:
    """Draw an RGB shift (probability `aug.rgb_shift_p`) and brightness/contrast (`aug.brightness_contrast_p`)."""
    shifted = _coin(batch_size, aug.rgb_shift_p, generator)
    rgb_shift = _uniform((batch_size, 3), aug.max_rgb_shift, generator) * shifted[:, None]
    adjusted = _coin(batch_size, aug.brightness_contrast_p, generator)
    brightness = 1 + _uniform(batch_size, aug.max_brightness, generator) * adjusted
    contrast = 1 + _uniform(batch_size, aug.max_contrast, generator) * adjusted
    return ColourParams(rgb_shift, brightness, contrast)


def geometry_theta(params: GeometryParams, in_height: int, in_width: int, cfg: PreprocessConfig) -> Tensor:
    """Affine matrices [B, 2, 3] for `F.affine_grid` (align_corners=False), output -> input coordinates.

    With the input resized by r = resize_size / shorter side, an output pixel u (centred, in resized
    pixels, one output pixel = one resized pixel) lies at q = u + o in the transformed image (o: crop
    centre), which came from p = R(-rotation) (q - t) / scale in the resized image (t: shift), i.e. from
    p / r in the input. The matrices map the normalised [-1, 1] coordinates of both images.
    """
    out = cfg.image_size
    r = cfg.resize_size / min(in_height, in_width)
    frame = torch.tensor([in_width * r, in_height * r])
    room = (frame - out).clamp(min=0) / 2
    offset = params.crop_offset * room
    shift = params.shift * frame
    cos, sin = torch.cos(params.rotation), torch.sin(params.rotation)
    inverse_rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    to_input = inverse_rotation / (r * params.scale)[:, None, None]
    input_half = torch.tensor([in_width / 2, in_height / 2])
    linear = to_input * (out / 2) / input_half[None, :, None]
    translation = (to_input @ (offset - shift)[:, :, None])[..., 0] / input_half
    return torch.cat([linear, translation[:, :, None]], dim=2)


def antialias_downscale(images: Tensor, cfg: PreprocessConfig, max_ratio: float = 1.25) -> Tensor:
    """Resize images [..., H, W] (antialiased) to a shorter side of `cfg.resize_size` when they are more
    than `max_ratio` times larger: bilinear `grid_sample` would skip pixels (alias) at such ratios."""
    height, width = images.shape[-2:]
    short = min(height, width)
    if short <= cfg.resize_size * max_ratio:
        return images
    size = [max(1, round(height * cfg.resize_size / short)), max(1, round(width * cfg.resize_size / short))]
    return TF.resize(images, size, interpolation=v2.InterpolationMode(cfg.interpolation), antialias=True)


def warp_batch(images: Tensor, theta: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Resample float images [B, C, H, W] to [B, C, size, size] through `theta` (reflected borders)."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), [images.shape[0], images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="reflection", align_corners=False)


def adjust_colour(images: Tensor, params: ColourParams, max_value: float) -> Tensor:
    """RGB shift, then brightness, then contrast, per sample, on float images in [0, max_value].

    Brightness scales the pixels; contrast blends each image with its mean luma (torchvision's
    definitions); every step clips to [0, max_value] as the uint8 pipelines do.
    """
    device, dtype = images.device, images.dtype
    shift = params.rgb_shift.to(device, dtype) * (max_value / 255)
    images = (images + shift[:, :, None, None]).clamp_(0, max_value)
    images = images.mul_(params.brightness.to(device, dtype)[:, None, None, None]).clamp_(0, max_value)
    luma = torch.tensor(_LUMA, device=device, dtype=dtype)
    mean_luma = torch.einsum("bchw,c->b", images, luma) / (images.shape[-1] * images.shape[-2])
    contrast = params.contrast.to(device, dtype)
    images = images.mul_(contrast[:, None, None, None]).add_(((1 - contrast) * mean_luma)[:, None, None, None])
    return images.clamp_(0, max_value)


class BatchAugment(nn.Module):
    """The training augmentation for a whole uint8 batch [B, 3, H, W], on the batch's device.

    In training mode: per-sample shift/scale/rotate (p=`aug.affine_p`) + random crop + resize to
    `cfg.image_size` as ONE `grid_sample` (after an antialiased downscale when the input is much larger
    than `cfg.resize_size`), then per-sample RGB shift and brightness/contrast, then
    scaling to [0, 1] and normalisation with `cfg.mean`/`cfg.std`. In eval mode (`.eval()`): the eval
    transform (centre crop of `crop_fraction` of the shorter side, resized to image_size), no colour
    change. Random parameters are drawn on the CPU from `generator` (or torch's global RNG).
    Output: float32 [B, 3, image_size, image_size].
    """

    def __init__(self, cfg: PreprocessConfig, aug: AugmentConfig = PAPER_AUGMENT, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.aug = aug
        self.generator = generator

    def sample_params(self, batch_size: int) -> tuple[GeometryParams, ColourParams]:
        if not self.training:
            return GeometryParams.identity(batch_size), ColourParams.identity(batch_size)
        return (
            sample_geometry(batch_size, self.aug, generator=self.generator),
            sample_colour(batch_size, self.aug, generator=self.generator),
        )

    def apply(self, images: Tensor, geometry: GeometryParams, colour: ColourParams) -> Tensor:
        """Apply given parameters to uint8 (or 0-255 float) images [B, 3, H, W]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchAugment expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        images = antialias_downscale(images, self.cfg)
        theta = geometry_theta(geometry, images.shape[-2], images.shape[-1], self.cfg)
        out = warp_batch(images.float(), theta, self.cfg.image_size, self.cfg.interpolation)
        out = adjust_colour(out, colour, max_value=255.0)
        std = torch.tensor(self.cfg.std, device=out.device)
        mean = torch.tensor(self.cfg.mean, device=out.device)
        # (x / 255 - mean) / std as one multiply-add per channel.
        return out.mul_((1 / (255 * std))[:, None, None]).sub_((mean / std)[:, None, None])

    def forward(self, images: Tensor) -> Tensor:
        return self.apply(images, *self.sample_params(images.shape[0]))

    def extra_repr(self) -> str:
        return f"image_size={self.cfg.image_size}, resize_size={self.cfg.resize_size}, aug={self.aug}"


class RandomShiftScaleRotateCrop(v2.Transform):
    """Per-sample v2 transform: shift/scale/rotate + random crop + resize to image_size, one resample.

    Takes a uint8 or float image [3, H, W] at any size; returns float32 in [0, 1],
    [3, image_size, image_size]. `random_crop=False` centres the crop. Draws from torch's global RNG
    (seeded per DataLoader worker).
    """

    def __init__(self, cfg: PreprocessConfig, aug: AugmentConfig = PAPER_AUGMENT, random_crop: bool = True):
        super().__init__()
        self.cfg = cfg
        self.aug = aug
        self.random_crop = random_crop

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"geometry": sample_geometry(1, self.aug, random_crop=self.random_crop)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Tensor):
            return inpt
        image = antialias_downscale(inpt.as_subclass(Tensor), self.cfg)
        scale = 1 / 255 if not image.is_floating_point() else 1.0
        theta = geometry_theta(params["geometry"], image.shape[-2], image.shape[-1], self.cfg)
        out = warp_batch(image[None].float(), theta, self.cfg.image_size, self.cfg.interpolation)[0]
        out = out.mul_(scale).clamp_(0, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


class RandomRGBShift(v2.Transform):
    """Per-sample v2 transform: with probability `p`, add a shift uniform in [-max_shift, max_shift]
    (0-255 units) to each channel, clipping to the valid range (uint8 or float in [0, 1])."""

    def __init__(self, max_shift: float = 15.0, p: float = 0.5):
        super().__init__()
        self.max_shift = max_shift
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        applied = _coin(1, self.p, None)
        return {"shift": (_uniform(3, self.max_shift, None) * applied)[:, None, None]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, Tensor):
            return inpt
        image = inpt.as_subclass(Tensor)
        if image.is_floating_point():
            out = (image + params["shift"] / 255).clamp_(0, 1)
        else:
            out = (image.to(torch.int16) + params["shift"].round().to(torch.int16)).clamp_(0, 255).to(image.dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def build_train_transform(cfg: PreprocessConfig, aug: AugmentConfig = PAPER_AUGMENT) -> v2.Compose:
    """Per-sample training transform: PIL image or uint8 tensor [3, H, W] -> normalised float32
    [3, image_size, image_size] (see the module docstring for the definition)."""
    return v2.Compose(
        [
            v2.ToImage(),
            RandomShiftScaleRotateCrop(cfg, aug),
            RandomRGBShift(aug.max_rgb_shift, aug.rgb_shift_p),
            v2.RandomApply(
                [v2.ColorJitter(brightness=aug.max_brightness, contrast=aug.max_contrast)],
                p=aug.brightness_contrast_p,
            ),
            v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )


def build_eval_transform(cfg: PreprocessConfig) -> v2.Compose:
    """Deterministic eval transform: shorter side to `resize_size` (aspect kept), centre crop of
    `image_size`, scale to [0, 1], normalise. PIL image or uint8 tensor in, float32 CHW out."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(cfg.resize_size, interpolation=v2.InterpolationMode(cfg.interpolation), antialias=True),
            v2.CenterCrop(cfg.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )


def eval_resize_crop(image: Tensor, cfg: PreprocessConfig) -> Tensor:
    """uint8 CHW -> uint8 [3, image_size, image_size]: the geometric half of `build_eval_transform`
    (the same torchvision kernels, so the same pixels)."""
    interpolation = v2.InterpolationMode(cfg.interpolation)
    resized = TF.resize(image, [cfg.resize_size], interpolation=interpolation, antialias=True)
    return TF.center_crop(resized, [cfg.image_size])


def normalize_uint8(images: Tensor, cfg: PreprocessConfig) -> Tensor:
    """uint8 [..., 3, H, W] -> float32 scaled to [0, 1] and normalised: the rest of
    `build_eval_transform`, the same operations in the same order (so bit-identical values), on a
    whole batch at once and on the batch's device."""
    x = images.to(torch.float32).mul_(1.0 / 255)
    mean = torch.as_tensor(cfg.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(cfg.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def reprocess(images: Tensor, source: PreprocessConfig, target: PreprocessConfig) -> Tensor:
    """Model inputs [B, 3, S, S] made with `source`'s preprocessing -> the same view in `target`'s.

    Undo `source`'s normalisation, resize to `target.image_size` (antialiased, `target.interpolation`)
    and normalise with `target`'s mean and std: how a teacher and a student that differ in input size
    or normalisation see one augmented image. The view itself (crop, augmentation) is `source`'s; the
    crop fraction and border crop of `target` are not re-applied. Returns `images` itself when size,
    mean and std agree. float32 in, float32 out, on the images' device.
    """
    if (source.image_size, tuple(source.mean), tuple(source.std)) == (target.image_size, tuple(target.mean), tuple(target.std)):
        return images
    device = images.device
    src_mean, src_std, dst_mean, dst_std = (
        torch.as_tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
        for v in (source.mean, source.std, target.mean, target.std)
    )
    x = images.float() * src_std + src_mean
    if x.shape[-1] != target.image_size or x.shape[-2] != target.image_size:
        x = TF.resize(x, [target.image_size, target.image_size],
                      interpolation=v2.InterpolationMode(target.interpolation), antialias=True)
    return (x - dst_mean) / dst_std
