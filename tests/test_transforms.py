"""Train/eval transforms and BatchAugment on real HAM10000 images at the cached scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

from skindistil.config import PreprocessConfig
from skindistil.data.imageio import read_image, resize_shorter
from skindistil.data.transforms import (
    AugmentConfig,
    BatchAugment,
    ColourParams,
    GeometryParams,
    RandomShiftScaleRotateCrop,
    adjust_colour,
    build_eval_transform,
    build_train_transform,
)

NO_AUGMENT = AugmentConfig(affine_p=0.0, rgb_shift_p=0.0, brightness_contrast_p=0.0)
CFG_224 = PreprocessConfig()
CFG_64 = PreprocessConfig(image_size=64)


@pytest.fixture(scope="module")
def ham_images(ham_root) -> list[Image.Image]:
    """Three real HAM10000 images at the cache scale (shorter side 256, aspect kept)."""
    paths = sorted((ham_root / "images").glob("*.jpg"))[:3]
    return [resize_shorter(read_image(path), 256) for path in paths]


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _centre_square(image: torch.Tensor) -> torch.Tensor:
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[..., top:top + side, left:left + side]


def _value_range(cfg: PreprocessConfig) -> tuple[float, float]:
    return (0 - max(cfg.mean)) / min(cfg.std), (1 - min(cfg.mean)) / min(cfg.std)


@pytest.mark.parametrize("cfg", [CFG_224, CFG_64], ids=["224", "64"])
def test_eval_transform_shape_dtype_range_and_determinism(ham_images, cfg):
    transform = build_eval_transform(cfg)
    low, high = _value_range(cfg)
    for image in ham_images:
        from_tensor = transform(_chw(image))
        assert from_tensor.shape == (3, cfg.image_size, cfg.image_size)
        assert from_tensor.dtype == torch.float32
        assert low - 1e-6 <= from_tensor.min() and from_tensor.max() <= high + 1e-6
        assert from_tensor.std() > 0.02  # not a constant image
        torch.testing.assert_close(transform(_chw(image)), from_tensor)
        # PIL input takes the same route (Pillow's and torch's antialiasing differ by rounding only).
        assert (transform(image) - from_tensor).abs().mean() < 0.01


def test_eval_transform_keeps_aspect_no_squash():
    """A circle on a 3:2 canvas stays a circle: shorter side resized, centre crop, no squash."""
    canvas = Image.new("RGB", (450, 300))
    ImageDraw.Draw(canvas).ellipse((165, 90, 285, 210), fill=(255, 255, 255))  # 120 px circle at the centre
    out = build_eval_transform(CFG_64)(canvas)
    bright = (out[0] > 0).numpy()
    rows, cols = np.nonzero(bright)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1
    # Scale: shorter side 300 -> resize_size, so the circle spans 120 * resize_size / 300 pixels.
    assert abs(width - 120 * CFG_64.resize_size / 300) <= 2


def test_train_transform_random_but_seeded(ham_images):
    transform = build_train_transform(CFG_224)
    image = _chw(ham_images[0])
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    again = transform(image)
    torch.manual_seed(1)
    other = transform(image)
    assert first.shape == (3, 224, 224) and first.dtype == torch.float32
    low, high = _value_range(CFG_224)
    assert low - 1e-6 <= first.min() and first.max() <= high + 1e-6
    torch.testing.assert_close(first, again)
    assert (first - other).abs().mean() > 0.05
    torch.manual_seed(2)
    assert build_train_transform(CFG_224)(ham_images[1]).shape == (3, 224, 224)  # PIL input


@pytest.mark.parametrize("cfg", [CFG_224, CFG_64], ids=["224", "64"])
def test_train_geometry_without_augmentation_is_the_eval_transform(ham_images, cfg):
    geometry = RandomShiftScaleRotateCrop(cfg, NO_AUGMENT, random_crop=False)
    eval_transform = build_eval_transform(cfg)
    for image in ham_images:
        unnormalised = (eval_transform(_chw(image)) * 0.5 + 0.5)
        assert (geometry(_chw(image)) - unnormalised).abs().mean() < 0.01


def test_batch_augment_shapes_ranges_and_variety(ham_images):
    batch = torch.stack([_centre_square(_chw(image)) for image in ham_images] * 3)
    augment = BatchAugment(CFG_224, generator=torch.Generator().manual_seed(0)).train()
    out = augment(batch)
    assert out.shape == (9, 3, 224, 224) and out.dtype == torch.float32
    low, high = _value_range(CFG_224)
    assert torch.isfinite(out).all() and low - 1e-5 <= out.min() and out.max() <= high + 1e-5
    # Copies of one image are augmented independently.
    assert (out[0] - out[3]).abs().mean() > 0.05
    # Seeded generator: reproducible.
    again = BatchAugment(CFG_224, generator=torch.Generator().manual_seed(0)).train()(batch)
    torch.testing.assert_close(out, again)


@pytest.mark.parametrize("cfg", [CFG_224, CFG_64], ids=["224", "64"])
def test_batch_augment_eval_mode_matches_eval_transform(ham_images, cfg):
    batch = torch.stack([_centre_square(_chw(image)) for image in ham_images])
    out = BatchAugment(cfg).eval()(batch)
    expected = torch.stack([build_eval_transform(cfg)(_chw(image)) for image in ham_images])
    assert (out - expected).abs().mean() < 0.02


def test_batch_augment_with_zero_probabilities_is_a_random_crop_of_the_eval_image(ham_images):
    """With every probability 0, training mode only moves the crop window: the output equals the
    eval-scale image at some offset within the room around the centre crop."""
    cfg = CFG_64
    image = _chw(ham_images[0])
    square = _centre_square(image)
    room = (cfg.resize_size - cfg.image_size) // 2
    resized = TF.resize(square, [cfg.resize_size, cfg.resize_size], antialias=True).float() / 127.5 - 1
    augment = BatchAugment(cfg, NO_AUGMENT, generator=torch.Generator().manual_seed(3)).train()
    outputs = augment(square[None].expand(6, -1, -1, -1))
    offsets = set()
    for out in outputs:
        errors = {
            (dy, dx): (out - resized[:, room + dy: room + dy + 64, room + dx: room + dx + 64]).abs().mean().item()
            for dy in range(-room, room + 1)
            for dx in range(-room, room + 1)
        }
        best = min(errors, key=errors.get)
        assert errors[best] < 0.03
        offsets.add(best)
    assert len(offsets) > 1  # the window does move


def test_batch_augment_rotation_by_90_degrees_rotates_the_image(ham_images):
    square = _centre_square(_chw(ham_images[1]))[None]
    augment = BatchAugment(CFG_64)
    plain = augment.apply(square, GeometryParams.identity(1), ColourParams.identity(1))
    quarter = GeometryParams.identity(1)
    quarter = GeometryParams(torch.tensor([math.pi / 2]), quarter.scale, quarter.shift, quarter.crop_offset)
    rotated = augment.apply(square, quarter, ColourParams.identity(1))
    error = min((rotated - torch.rot90(plain, k, dims=(2, 3))).abs().mean().item() for k in (1, 3))
    assert error < 0.01
    assert (rotated - plain).abs().mean() > 0.05


def test_batch_augment_accepts_channels_last_batches(ham_images):
    square = _centre_square(_chw(ham_images[2]))[None].contiguous()
    channels_last = square.contiguous(memory_format=torch.channels_last)
    augment = BatchAugment(CFG_64).eval()
    torch.testing.assert_close(augment(channels_last), augment(square))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment(square[0])


def test_colour_step_matches_torchvision_brightness_and_contrast(ham_images):
    """Per-sample factors give what torchvision's adjust_brightness then adjust_contrast give."""
    images = torch.stack([build_eval_transform(CFG_64)(image) * 0.5 + 0.5 for image in ham_images[:2]])
    params = ColourParams(torch.zeros(2, 3), torch.tensor([1.15, 0.85]), torch.tensor([0.8, 1.2]))
    out = adjust_colour(images.clone(), params, max_value=1.0)
    for i in range(2):
        expected = TF.adjust_contrast(TF.adjust_brightness(images[i], params.brightness[i].item()),
                                      params.contrast[i].item())
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)
    shifted = adjust_colour(images.clone(), ColourParams(torch.tensor([[15.0, 0, -15.0]] * 2), torch.ones(2),
                                                         torch.ones(2)), max_value=1.0)
    torch.testing.assert_close(shifted[:, 0], (images[:, 0] + 15 / 255).clamp(0, 1))
    torch.testing.assert_close(shifted[:, 2], (images[:, 2] - 15 / 255).clamp(0, 1))


# Each augmentation of the paper alone, at the paper's magnitude and probability 1 (SPEC.md).
ONE_AUGMENTATION = {
    "shift": {"affine_p": 1.0, "max_scale": 0.0, "max_rotation": 0.0},
    "scale": {"affine_p": 1.0, "max_shift": 0.0, "max_rotation": 0.0},
    "rotate": {"affine_p": 1.0, "max_shift": 0.0, "max_scale": 0.0},
    "rgb_shift": {"rgb_shift_p": 1.0},
    "brightness": {"brightness_contrast_p": 1.0, "max_contrast": 0.0},
    "contrast": {"brightness_contrast_p": 1.0, "max_brightness": 0.0},
}


def test_the_augmentation_defaults_are_the_papers():
    assert AugmentConfig() == AugmentConfig(affine_p=0.75, max_shift=0.05, max_scale=0.05, max_rotation=90.0,
                                            rgb_shift_p=0.5, max_rgb_shift=15.0, brightness_contrast_p=0.5,
                                            max_brightness=0.2, max_contrast=0.2)


def _per_sample(aug, image, seed):
    torch.manual_seed(seed)
    return build_train_transform(CFG_64, aug)(image)


def _batched(aug, image, seed):
    return BatchAugment(CFG_64, aug, generator=torch.Generator().manual_seed(seed)).train()(image[None])[0]


@pytest.mark.parametrize("path", [_per_sample, _batched], ids=["per-sample", "batched"])
@pytest.mark.parametrize("name", list(ONE_AUGMENTATION))
def test_every_augmentation_of_the_paper_changes_its_input(ham_images, path, name):
    """The train transform with one augmentation switched on differs from the same draw with it
    switched off (same seed, so the crop window is the same): each step is in the pipeline and acts."""
    image = _centre_square(_chw(ham_images[0]))
    on = AugmentConfig(**{**NO_AUGMENT.__dict__, **ONE_AUGMENTATION[name]})
    changes = [(path(on, image, seed) - path(NO_AUGMENT, image, seed)).abs().mean().item() for seed in range(4)]
    assert min(changes) > 0, f"{name} left some input unchanged: {changes}"
    assert np.mean(changes) > 0.01, f"{name} barely changes its input: {changes}"


def test_the_random_crop_moves(ham_images):
    image = _centre_square(_chw(ham_images[0]))
    assert (_per_sample(NO_AUGMENT, image, 0) - _per_sample(NO_AUGMENT, image, 1)).abs().mean() > 0.01
