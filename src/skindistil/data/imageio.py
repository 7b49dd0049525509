"""Image decoding (THE one decode path) and the once-per-image geometry: black-border crop, resize.

`read_image` (files, bytes) and `to_rgb` / `as_rgb_array` (PIL images, arrays already in memory)
turn every Pillow mode into 8-bit RGB by the rules of `to_rgb`; prepare, predict, serve, explain and
export all decode through them, so one file gives the same pixels everywhere.
"""

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

# Transparent pixels are composited on black: the colour of a dermoscope's vignette, which the
# black-border crop then removes like any other dark margin.
ALPHA_BACKGROUND = (0, 0, 0)
# Modes Pillow converts to RGB without loss of range (8 bits per channel, or fewer).
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# ISO base media 'ftyp' brands of HEIF images (HEIC from phones) and of AVIF images.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIF_HINT = "decoding HEIC/HEIF needs the optional package pillow-heif: pip install 'skindistil[heif]'"
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339
_FLOAT_REFUSAL = (
    "floating-point pixels have no defined white level (0..1 or 0..255?), so they cannot be converted "
    "to 8 bits without guessing; give 8-bit (uint8) or 16-bit (uint16) pixels, or an 8- or 16-bit PNG or TIFF"
)


def read_image(src: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode a file or bytes to an 8-bit RGB image (mode "RGB", uint8 per channel) with EXIF
    orientation applied and the pixel values converted by `to_rgb`'s rules.

    Formats: everything this Pillow opens, plus HEIC/HEIF when pillow-heif is installed (the extra
    `heif`). Raises ImageError naming the file (`name`, else the path, else "<upload>") for: missing
    file or broken symbolic link, empty, not an image, HEIC/HEIF without pillow-heif, over
    `max_pixels`, truncated or corrupt data, and the modes `to_rgb` refuses.
    """
    where = name or (str(src) if not isinstance(src, bytes) else "<upload>")
    if isinstance(src, bytes):
        data = src
    else:
        path = Path(src)
        if not path.is_file():
            if path.is_symlink():
                raise ImageError(where, f"broken symbolic link (its target {str(path.readlink())!r} does not exist)")
            raise ImageError(where, "a folder, not an image file" if path.is_dir() else "file not found")
        data = path.read_bytes()
    if not data:
        raise ImageError(where, "empty file (0 bytes)")
    _enable_heif_for(data, where)
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the warning is an error here (above); Pillow's guard is off unless another module turned it on
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower() or "premature" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise ImageError(where, f"corrupt image: {reason}") from None
    # a malformed EXIF block must not lose the image: its pixels are already decoded
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return to_rgb(img, where)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header without decoding its pixels; None if unreadable."""
    try:
        _enable_heif_for(data, "<upload>")
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # whatever Pillow raises, read_image reports it with a proper message
        return None


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Any Pillow image -> 8-bit RGB (mode "RGB"); ImageError naming `where` for what cannot be converted.

    Rules, by Pillow mode:
    - 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's conversion (8 bits or fewer per channel).
    - LA, La, PA, RGBA, RGBa, and P/L/RGB with a transparent colour: composited on `ALPHA_BACKGROUND`
      (black) by their alpha.
    - I;16, I;16B, I;16L, I;16N (16-bit greyscale): scaled by the full 16-bit range,
      round(v * 255 / 65535), then grey -> RGB. (Pillow's own conversion clips at 255: all white.)
    - I (32-bit integer): only where the file says its samples are 16-bit unsigned (a PNG, which
      holds at most 16 bits; a TIFF with BitsPerSample 16): scaled as above. Otherwise refused: a
      32-bit integer image has no defined white level.
    - F (32-bit float): refused; float images have no defined white level (0..1? 0..255?).
    - any other mode: refused.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES or (mode in ("1", "L", "P", "RGB") and "transparency" in img.info):
        rgba = img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _EIGHT_BIT_MODES:
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and _holds_16_bit_samples(img)):
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(where, f"16-bit image (Pillow mode {mode}) holds values outside 0..65535")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "I":
        raise ImageError(
            where,
            "32-bit integer image (Pillow mode I): its white level is not defined, so it cannot be converted "
            "to 8 bits without guessing; save it as an 8-bit or 16-bit PNG or TIFF",
        )
    if mode == "F":
        raise ImageError(where, f"32-bit floating-point image (Pillow mode F): {_FLOAT_REFUSAL}")
    raise ImageError(where, f"unsupported image mode {mode!r}; convert it to 8-bit RGB")


def as_rgb_array(image, where: str = "image") -> np.ndarray:
    """A path, bytes, PIL image or numpy array -> HxWx3 uint8 RGB, by the rules of `read_image`/`to_rgb`.

    Arrays: HxWx3 uint8 is taken as RGB; other shapes and dtypes go through `Image.fromarray` (HxW
    uint8 grey, HxW uint16 16-bit grey, HxWx4 uint8 RGBA, ...) and then `to_rgb`; float arrays are
    refused like mode F. Raises ImageError naming `where` for anything else.
    """
    if isinstance(image, (str, Path, bytes)):
        image = read_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return image
        if image.dtype.kind == "f":
            raise ImageError(where, f"{image.dtype} array: {_FLOAT_REFUSAL}")
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError) as exc:
            raise ImageError(where, f"array of shape {list(image.shape)} and dtype {image.dtype} is not an image ({exc})") from None
    if not isinstance(image, Image.Image):
        raise ImageError(where, f"cannot read {type(image).__name__} as an image: expected a path, bytes, PIL image or array")
    return np.asarray(to_rgb(image, where))


def _holds_16_bit_samples(img: Image.Image) -> bool:
    if img.format == "PNG":
        return True
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        bits = tags.get(_TIFF_BITS_PER_SAMPLE)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return bits == 16 and tags.get(_TIFF_SAMPLE_FORMAT, 1) in (1, (1,))
    return False


def _enable_heif_for(data: bytes, where: str) -> None:
    """Register pillow-heif's opener when `data` is a HEIF file; ImageError naming it if not installed."""
    if data[4:8] != b"ftyp":
        return
    brand = data[8:12]
    if brand in _AVIF_BRANDS:
        from PIL import features

        if not features.check("avif"):
            raise ImageError(where, "AVIF image, and this Pillow was built without AVIF support")
    elif brand in _HEIF_BRANDS:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            raise ImageError(where, f"HEIC/HEIF image; {HEIF_HINT}") from None
        register_heif_opener()


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


def as_image_list(images) -> list:
    """The images of a `predict(images)` call as a list: one path, bytes, PIL image or array is one image.

    A 2-D or 3-D array (HxW, HxWxC) is one image and a 4-D array (NxHxWxC) a batch of N; any
    other iterable (list, tuple, generator of images) gives its items. A bare string is one path,
    never a sequence of characters.
    """
    if isinstance(images, (str, Path, bytes, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)
