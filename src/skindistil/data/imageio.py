"""Safe image decoding and the once-per-image geometry: EXIF orientation, black-border crop, resize."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skindistil.errors import ImageError

# 100 megapixels: above every real dermoscope image (ISIC's largest are 6000x4000 = 24 MP), far
# below what a decompression bomb asks for. Pillow's own guard is switched off in favour of this one
# so that the message names the file.
DEFAULT_MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None


def read_image(src: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode a file or bytes to an RGB image with EXIF orientation applied.

    Raises ImageError naming the file for: missing, empty, not an image, over `max_pixels`,
    truncated or corrupt data.
    """
    where = name or (str(src) if not isinstance(src, bytes) else "<upload>")
    if isinstance(src, bytes):
        data = src
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(where, "file not found")
        data = path.read_bytes()
    if not data:
        raise ImageError(where, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(where, f"invalid dimensions {width}x{height}")
            if width * height > max_pixels:
                raise ImageError(
                    where,
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                    "(possible decompression bomb)",
                )
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(where, "not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or "premature" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise ImageError(where, f"corrupt image: {reason}") from None
    # a malformed EXIF block must not lose the image: its pixels are already decoded
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def border_crop_box(rgb: np.ndarray, threshold: int = 20) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the bright region inside a black dermoscope vignette.

    The paper's preprocessing: grayscale, threshold at `threshold`, largest external contour, its
    bounding box. Here the largest 4-connected bright component stands in for the contour (same box
    for a filled region). Without a dark border the box is the whole image; an all-dark image, or a
    component too small to be a lesion field (< 1% of the image), also keeps the whole image, so the
    crop never produces nothing.
    """
    height, width = rgb.shape[:2]
    full = (0, 0, width, height)
    if int(rgb.min()) > threshold:
        # every channel of every pixel is above the threshold, so the grey level (weights summing to
        # 1) is too: no border, the same answer as the full computation, 10x sooner (most images)
        return full
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    mask = gray > threshold
    if mask.all() or not mask.any():
        return full
    box = _largest_component_box(mask)
    x0, y0, x1, y1 = box
    if (x1 - x0) * (y1 - y0) < 0.01 * width * height:
        return full
    return box


def _largest_component_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 1:
        ys, xs = np.nonzero(mask)
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        ys, xs = np.nonzero(labels == int(sizes.argmax()))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def resize_shorter(img: Image.Image, short_side: int) -> Image.Image:
    """Resize so the shorter side is `short_side`, aspect kept (antialiased)."""
    width, height = img.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return img
    return img.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
