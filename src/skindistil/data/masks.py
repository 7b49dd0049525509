"""Lesion segmentation masks: finding the mask of an image, and reading it.

A mask is a greyscale image of the same size as its dermoscopic image, lesion = white. Masks
downscaled with anti-aliasing have grey edges, so a pixel is lesion when its value is at least
MASK_THRESHOLD (128 of 255), after every resize (the HAM10000 masks' README gives that rule).

`--masks` takes a folder or a pattern:

- a folder: the mask of image <stem>.<ext> is the first of <stem>_segmentation.png (ISIC 2018,
  HAM10000), <stem>_Segmentation.png (ISIC 2016/2017), <stem>_mask.png, <stem>.png found there;
- a pattern with ``{stem}``, e.g. ``masks/{stem}_seg.png``: that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skindistil.errors import ConfigError, ImageError

MASK_THRESHOLD = 128
MASK_NAMES = ("{stem}_segmentation.png", "{stem}_Segmentation.png", "{stem}_mask.png", "{stem}.png")


@dataclass(frozen=True)
class MaskLocator:
    """Where the masks of images live: a folder (searched for MASK_NAMES) or a ``{stem}`` pattern.

    Picklable (prepare's worker processes use it). Raises ConfigError for a spec that is neither.
    """

    spec: str

    def __post_init__(self):
        if "{stem}" in self.spec:
            try:
                self.spec.format(stem="x")
            except (KeyError, IndexError, ValueError):
                raise ConfigError(f"--masks {self.spec}: a pattern may hold only the field {{stem}}") from None
        elif not Path(self.spec).is_dir():
            raise ConfigError(f"--masks {self.spec}: not a folder, and not a pattern with {{stem}} "
                              "(e.g. masks/{stem}_segmentation.png)")

    def candidates(self, stem: str) -> list[Path]:
        """The paths that may hold the mask of the image named `stem`, in the order they are tried."""
        if "{stem}" in self.spec:
            return [Path(self.spec.format(stem=stem))]
        return [Path(self.spec) / name.format(stem=stem) for name in MASK_NAMES]

    def find(self, image: str | Path) -> Path | None:
        """The mask file of `image` (a path, or an image id; its stem is used), or None if it has none."""
        stem = Path(str(image)).stem
        return next((path for path in self.candidates(stem) if path.is_file()), None)


def read_mask(path: str | Path, size: tuple[int, int] | None = None, image: str | None = None) -> np.ndarray:
    """A mask file as uint8 [H, W] (0-255; lesion where >= MASK_THRESHOLD).

    Decoded by `skindistil.data.imageio.read_image` (so 1-bit, 8/16-bit greyscale and palette files
    follow its rules); the result must be grey (equal colour channels). `size` (width, height): the
    size of `image`, which the mask must match. Raises ImageError naming the file for a colour mask,
    a size that differs from the image's, or a file that is not an image.
    """
    from skindistil.data.imageio import read_image

    where = str(path)
    img = read_image(path, name=where)
    rgb = np.asarray(img)
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
        raise ImageError(where, "a mask with colours; a lesion mask must be greyscale (lesion = white)")
    if size is not None and img.size != tuple(size):
        of = f" of {image}" if image else ""
        raise ImageError(where, f"mask is {img.size[0]}x{img.size[1]} but the image{of} is {size[0]}x{size[1]} "
                                "(a mask must have its image's size)")
    return np.ascontiguousarray(rgb[..., 0])
