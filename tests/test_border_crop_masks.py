"""The black-border crop against the lesion masks: over EVERY masked image in ../shared/data, the crop
box found on the decoded image keeps every lesion pixel (mask >= 128, the masks' README rule)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from skindistil.data.imageio import as_rgb_array, border_crop_box, read_image
from skindistil.data.masks import MASK_THRESHOLD, read_mask


def _lesion_outside_box(pair) -> tuple[str, int, int, tuple[int, int, int, int]]:
    """(image, lesion pixels the crop removes, mask weight it removes in grey levels, box)."""
    image_path, mask_path = pair
    rgb = as_rgb_array(read_image(image_path))
    mask = read_mask(mask_path, size=(rgb.shape[1], rgb.shape[0]), image=str(image_path))
    x0, y0, x1, y1 = border_crop_box(rgb)
    kept = np.zeros(mask.shape, dtype=bool)
    kept[y0:y1, x0:x1] = True
    lost = int(((mask >= MASK_THRESHOLD) & ~kept).sum())
    return image_path.name, lost, int(mask[~kept].astype(np.int64).sum()), (x0, y0, x1, y1)


@pytest.mark.slow
def test_border_crop_never_removes_lesion_pixels(ham_root):
    pairs = []
    for mask_path in sorted((ham_root / "masks").glob("*_segmentation.png")):
        image_path = ham_root / "images" / f"{mask_path.name[: -len('_segmentation.png')]}.jpg"
        pairs.append((image_path, mask_path))
    assert len(pairs) == 7005  # every image of the DEV set has its mask
    with ThreadPoolExecutor(4) as pool:  # decoding releases the GIL
        results = list(pool.map(_lesion_outside_box, pairs, chunksize=64))
    cropped = [r for r in results if r[3][:2] != (0, 0) or r[3][2:] != (200, 150)]
    worst = max(results, key=lambda r: (r[1], r[2]))
    print(f"\n{len(cropped)} of {len(results)} images border-cropped; worst case {worst[0]}: {worst[1]} lesion "
          f"pixel(s) removed, removed mask weight {worst[2]} grey levels, box {worst[3]}")
    assert [r for r in results if r[1]] == []
    assert cropped  # the crop does act on some of these images, so the check above has something to check
