"""A procedural dermoscopy-like dataset: the built-in data of `skindistil demo` and of smoke tests.

Each image is a lesion on a skin-coloured background. The eight ISIC 2019 classes differ, loosely
after their dermoscopic patterns, in colour (brown/black melanocytic lesions, pink-red keratinocytic
ones, red-purple vascular ones), border (round and sharp to irregular and blurred) and texture
(pigment network, dots and globules, branching vessels, blue-grey veil), with per-lesion jitter in all
of them and class-independent nuisances (skin tone, lighting, hairs, a dark dermoscope vignette on a
third of the images, which the border crop removes). Class frequencies follow ISIC 2019 (NV about half,
DF and VASC about 1%, with a floor so every class has a few images).

Every image is a pure function of (seed, lesion, index, label, size): `SyntheticSource.open(record)`
regenerates it from the record, so nothing is stored. Rendering is vectorised numpy, a few
milliseconds for a 256 x 341 image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from skindistil.data.records import Record
from skindistil.data.sources import Source, register_source
from skindistil.data.vocab import ISIC2019
from skindistil.errors import DataError, ImageError

DEFAULT_NUM_IMAGES = 1200
DEFAULT_IMAGE_SIZE = 256
# ISIC 2019 training-set class counts (SPEC.md), in ISIC2019 vocabulary order.
ISIC2019_COUNTS = (4522, 12875, 3323, 867, 2624, 239, 253, 628)
# Fewest images any class gets (when the dataset is large enough), so that every split sees it.
MIN_PER_CLASS = 6
# Fraction of lesions photographed twice (HAM10000 has 1.34 images per lesion): exercises grouped splits.
SECOND_VIEW_FRACTION = 0.25
VIGNETTE_FRACTION = 0.35
HAIR_FRACTION = 0.3
_SOURCE_PATTERN = re.compile(r"^synthetic://(\d+)/(\d+)/(\d+)$")


@dataclass(frozen=True)
class LesionStyle:
    """How one class looks. Colours are RGB 0-255; sizes are fractions of the shorter side.

    radius: range of the lesion's mean radius. irregularity: amplitude of the border's angular
    harmonics (0 = an ellipse). softness: width of the border transition, relative to the radius.
    network / dots / vessels / veil: strength (0-1) of a pigment network, of dots or globules (of
    `dot_rgb`), of thin branching red vessels and of a blue-grey veil.
    """

    centre_rgb: tuple[float, float, float]
    edge_rgb: tuple[float, float, float]
    radius: tuple[float, float]
    irregularity: float
    softness: float
    network: float = 0.0
    dots: float = 0.0
    dot_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    dot_spacing: float = 0.06
    vessels: float = 0.0
    veil: float = 0.0


STYLES: dict[str, LesionStyle] = {
    # Melanoma: large, dark and multicoloured, asymmetric irregular border, atypical network, veil.
    "MEL": LesionStyle((70, 42, 36), (140, 92, 70), (0.24, 0.38), 0.24, 0.10, network=0.45, dots=0.35,
                       dot_rgb=(35, 25, 25), dot_spacing=0.09, veil=0.55),
    # Naevus: brown, round, regular network, smooth border.
    "NV": LesionStyle((112, 72, 50), (160, 112, 84), (0.14, 0.28), 0.05, 0.10, network=0.35),
    # Basal cell carcinoma: pink pearly, arborising vessels, blue-grey ovoid nests.
    "BCC": LesionStyle((214, 162, 168), (218, 170, 165), (0.18, 0.32), 0.12, 0.25, dots=0.55,
                       dot_rgb=(80, 90, 125), dot_spacing=0.12, vessels=0.8),
    # Actinic keratosis: red "strawberry" background with white follicular openings, blurred border.
    "AK": LesionStyle((196, 92, 88), (206, 128, 115), (0.2, 0.36), 0.10, 0.35, dots=0.55,
                      dot_rgb=(240, 232, 225), dot_spacing=0.05, vessels=0.2),
    # Benign keratosis: light brown, sharp "stuck-on" border, fingerprint ridges, milia-like cysts.
    "BKL": LesionStyle((155, 115, 78), (172, 132, 96), (0.2, 0.34), 0.09, 0.05, network=0.3, dots=0.5,
                       dot_rgb=(232, 222, 196), dot_spacing=0.14),
    # Dermatofibroma: small, central white scar-like patch, delicate brown peripheral network.
    "DF": LesionStyle((222, 205, 192), (150, 102, 76), (0.12, 0.22), 0.04, 0.2, network=0.25),
    # Vascular lesion: red-purple, sharp border, dark red lacunae.
    "VASC": LesionStyle((160, 34, 62), (128, 32, 72), (0.12, 0.24), 0.06, 0.04, dots=0.7,
                        dot_rgb=(85, 12, 40), dot_spacing=0.1),
    # Squamous cell carcinoma: white-yellow keratin centre, pink-red rim, glomerular vessels.
    "SCC": LesionStyle((232, 210, 182), (196, 96, 92), (0.2, 0.34), 0.18, 0.15, dots=0.45,
                       dot_rgb=(160, 32, 42), dot_spacing=0.07, vessels=0.4),
}

# Fitzpatrick I-IV-like skin tones; each image jitters its tone around one of them.
SKIN_TONES = ((234, 196, 178), (222, 176, 150), (205, 152, 122), (180, 128, 98))
VESSEL_RGB = (165, 30, 42)
VEIL_RGB = (105, 112, 140)


def class_counts_for(num_images: int, proportions=ISIC2019_COUNTS, min_per_class: int = MIN_PER_CLASS) -> np.ndarray:
    """Images per class: proportional to ISIC 2019, each class at least `min_per_class` (or an equal
    share when there are too few images for that), the largest class absorbing the rounding."""
    num_classes = len(proportions)
    if num_images < num_classes:
        raise DataError("num_images", f"need at least {num_classes} images (one per class), got {num_images}")
    floor = min(min_per_class, num_images // num_classes)
    share = np.asarray(proportions, dtype=np.float64) / np.sum(proportions)
    counts = np.maximum(floor, np.round(share * num_images).astype(np.int64))
    counts[int(np.argmax(share))] += num_images - counts.sum()
    return counts


def synthetic_records(num_images: int, seed: int) -> list[Record]:
    """Labels, lesion groups and ids of a synthetic dataset (deterministic in num_images and seed)."""
    rng = np.random.default_rng([seed, num_images])
    labels = rng.permutation(np.repeat(np.arange(len(ISIC2019)), class_counts_for(num_images)))
    # Consecutive images of a class form one lesion (two views) with probability SECOND_VIEW_FRACTION.
    lesion_of = np.empty(num_images, dtype=np.int64)
    next_lesion = 0
    for label in range(len(ISIC2019)):
        indices = np.flatnonzero(labels == label)
        second_view = rng.random(len(indices)) < SECOND_VIEW_FRACTION
        views = 0
        for position, index in enumerate(indices):
            if views == 1 and second_view[position]:
                views = 2
            else:
                next_lesion += 1
                views = 1
            lesion_of[index] = next_lesion - 1
    return [
        Record(
            image_id=f"SYN_{index:05d}",
            source=f"synthetic://{seed}/{lesion_of[index]}/{index}",
            label=int(labels[index]),
            group=f"SYN_L{lesion_of[index]:05d}",
        )
        for index in range(num_images)
    ]


def _rgb(colour) -> np.ndarray:
    """An RGB triple as a float32 [3, 1, 1] array (broadcasts over channel-first images)."""
    return np.asarray(colour, dtype=np.float32).reshape(3, 1, 1)


@lru_cache(maxsize=16)
def _interpolation_matrix(length: int, knots: int) -> np.ndarray:
    """[length, knots] weights of linear interpolation from `knots` evenly spaced values to `length` pixels."""
    position = np.linspace(0, knots - 1, length)
    left = np.minimum(position.astype(np.int64), knots - 2)
    matrix = np.zeros((length, knots), dtype=np.float32)
    matrix[np.arange(length), left] = 1 - (position - left)
    matrix[np.arange(length), left + 1] = position - left
    return matrix


def smooth_noise(rng: np.random.Generator, height: int, width: int, knots: int) -> np.ndarray:
    """Smooth random field [height, width]: a knots x knots grid of standard normal values, bilinearly
    upsampled, so features are about 1/knots of the image.

    The full-size product is an einsum, not `@`: a product this size starts a multithreaded BLAS call,
    which oversubscribes the CPU when many worker processes render at once.
    """
    values = rng.standard_normal((knots, knots), dtype=np.float32)
    columns = values @ _interpolation_matrix(width, knots).T
    return np.einsum("hk,kw->hw", _interpolation_matrix(height, knots), columns)


@lru_cache(maxsize=4)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the shorter side, origin at the image centre."""
    short = min(height, width)
    ys = ((np.arange(height, dtype=np.float32) + 0.5) - height / 2) / short
    xs = ((np.arange(width, dtype=np.float32) + 0.5) - width / 2) / short
    return ys[:, None], xs[None, :]


@lru_cache(maxsize=4)
def _radius_squared(height: int, width: int) -> np.ndarray:
    """Squared distance of each pixel centre from the image centre, in units of the shorter side."""
    ys, xs = _pixel_grid(height, width)
    return xs**2 + ys**2


def _lattice(u: np.ndarray, v: np.ndarray, warp: np.ndarray, sign: float, spacing: float) -> np.ndarray:
    """cos(k (u + sign warp)) * cos(k (v - sign warp)), k = 2 pi / spacing: peaks on a warped lattice
    (dots), zero sets on a warped grid (network)."""
    k = 2 * math.pi / spacing
    along_u = u + sign * warp
    along_u *= k
    along_v = v - sign * warp
    along_v *= k
    along_u = np.cos(along_u, out=along_u)
    along_u *= np.cos(along_v, out=along_v)
    return along_u


def _blend(image: np.ndarray, colour, weight: np.ndarray) -> None:
    """image <- image + (colour - image) * weight, in place (image [3, H, W], weight [H, W])."""
    rgb = _rgb(colour)
    image -= rgb
    image *= 1 - weight
    image += rgb


def render_lesion(style: LesionStyle, lesion_seed: tuple[int, ...], view_seed: tuple[int, ...],
                  height: int, width: int) -> Image.Image:
    """Render one RGB image of `height` x `width`.

    `lesion_seed` fixes the lesion (shape, colours, textures); `view_seed` the photograph of it
    (placement, rotation, skin, lighting, hairs, vignette), so two views of a lesion look alike.
    All arithmetic stays float32 (random scalars are Python floats so they do not promote arrays).
    """
    lesion_rng = np.random.default_rng(lesion_seed)
    view_rng = np.random.default_rng(view_seed)
    ys, xs = _pixel_grid(height, width)

    # Geometry: lesion coordinates (u, v) of a rotated, shifted ellipse; its radius varies with the
    # angle by low harmonics (asymmetry, lobes) plus a smooth field (notches, pseudopods).
    angle = view_rng.uniform(0, 2 * np.pi)
    centre_x, centre_y = (float(c) for c in view_rng.normal(0, 0.05, size=2))
    radius = lesion_rng.uniform(*style.radius)
    aspect = lesion_rng.uniform(0.75, 1.0)
    dx, dy = xs - centre_x, ys - centre_y
    cos, sin = math.cos(angle), math.sin(angle)
    u = dx * cos + dy * sin
    v = (dy * cos - dx * sin) / aspect
    phi = np.arctan2(v, u)
    boundary = np.ones_like(phi)
    for k in range(2, 5):
        amplitude = style.irregularity * lesion_rng.normal() / (k - 1)
        boundary += amplitude * np.cos(k * phi + lesion_rng.uniform(0, 2 * math.pi))
    field = smooth_noise(lesion_rng, height, width, 10)
    boundary += style.irregularity * 0.5 * field
    radial = np.sqrt(u * u + v * v) / (radius * np.maximum(boundary, 0.3))
    softness = max(style.softness * lesion_rng.uniform(0.7, 1.3), 1e-3)
    # Clipped exponent: exp overflows float32 far outside the lesion, where the mask is 0 anyway.
    mask = 1.0 / (1.0 + np.exp(np.minimum((radial - 1.0) / softness, 60.0)))

    # Colour: centre -> edge gradient with per-lesion jitter, then the class's textures. Colour arrays
    # are channel-first [3, H, W] so numpy's inner loops run along rows, not over 3 channels.
    centre_rgb = _rgb(style.centre_rgb) + lesion_rng.normal(0, 12, (3, 1, 1)).astype(np.float32)
    edge_rgb = _rgb(style.edge_rgb) + lesion_rng.normal(0, 12, (3, 1, 1)).astype(np.float32)
    t = np.minimum(radial, 1.0) ** lesion_rng.uniform(0.8, 1.6)
    lesion = (edge_rgb - centre_rgb) * t
    lesion += centre_rgb
    warp = 0.012 * field
    if style.network:
        grid = _lattice(u, v, warp, 1.0, lesion_rng.uniform(0.035, 0.05))
        lesion *= 1 - style.network * 0.45 * np.exp(-(grid**2) / 0.02)
    if style.dots:
        peaks = _lattice(u, v, warp, -1.0, style.dot_spacing * lesion_rng.uniform(0.8, 1.2))
        keep = smooth_noise(lesion_rng, height, width, 8) > lesion_rng.uniform(-0.3, 0.5)
        dots = style.dots * np.clip((peaks - 0.55) / 0.45, 0, 1) * keep
        _blend(lesion, style.dot_rgb, dots)
    if style.vessels:
        ridge = smooth_noise(lesion_rng, height, width, 7)
        vessel = style.vessels * np.exp(-((ridge / 0.06) ** 2))
        _blend(lesion, VESSEL_RGB, vessel)
    if style.veil:
        veil = style.veil * np.clip(smooth_noise(lesion_rng, height, width, 5), 0, 1)
        _blend(lesion, VEIL_RGB, veil)

    # Skin tone with slow shading; dermoscope lighting brighter at the centre; exposure.
    tone = _rgb(SKIN_TONES[view_rng.integers(len(SKIN_TONES))]) + view_rng.normal(0, 8, (3, 1, 1)).astype(np.float32)
    radius_squared = _radius_squared(height, width)
    light = 1 + 0.05 * smooth_noise(view_rng, height, width, 3) - view_rng.uniform(0.05, 0.2) * radius_squared
    light *= view_rng.uniform(0.85, 1.1)
    # In place from here on: the lesion array becomes the image.
    image = lesion
    image -= tone
    image *= mask
    image += tone
    if view_rng.random() < HAIR_FRACTION:
        # Zero crossings of a smooth field on one side of a random line: a few dark curved strands.
        strand = smooth_noise(view_rng, height, width, 4)
        side = (xs * math.cos(2 * angle) + ys * math.sin(2 * angle)) > view_rng.uniform(-0.3, 0.3)
        light = light * (1 - 0.7 * np.exp(-((strand / 0.012) ** 2)) * side)
    if view_rng.random() < VIGNETTE_FRACTION:
        # A circular field of view narrower than the image: black bands the border crop must remove.
        field_radius = view_rng.uniform(0.37, 0.46) * max(height, width) / min(height, width)
        light = light / (1.0 + np.exp((np.sqrt(radius_squared) - field_radius) / 0.006))
    image *= light
    planes = np.clip(image, 0, 255, out=image).astype(np.uint8)
    # Pillow interleaves the channel planes faster than a strided numpy transpose copy.
    return Image.merge("RGB", [Image.fromarray(plane) for plane in planes])


def parse_synthetic_source(source: str) -> tuple[int, int, int]:
    """(seed, lesion, index) from a record source ``synthetic://<seed>/<lesion>/<index>``."""
    match = _SOURCE_PATTERN.match(source)
    if match is None:
        raise ImageError(source, "not a synthetic image reference (expected synthetic://<seed>/<lesion>/<index>)")
    seed, lesion, index = (int(g) for g in match.groups())
    return seed, lesion, index


def _parse_root(root) -> int | None:
    """'builtin' (or None) -> the default size; a number of images as text or int -> that number."""
    text = "builtin" if root is None else str(root)
    if text == "builtin":
        return None
    if text.isdigit():
        return int(text)
    raise DataError("synthetic root", f"expected 'builtin' or a number of images, got {text!r}")


@register_source("synthetic")
class SyntheticSource(Source):
    """The procedural dataset as a source. `root`: "builtin" or a number of images (e.g. "600").

    Options: num_images (default 1200, or the number in `root`), image_size (shorter side; images are
    4:3 landscape like HAM10000), seed. The vocabulary is ISIC 2019's 8 classes.
    """

    def __init__(self, root="builtin", *, num_images: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                 seed: int = 42, **options):
        from_root = _parse_root(root)
        if from_root is not None and num_images is not None and from_root != num_images:
            raise DataError("num_images", f"root says {from_root} images but num_images={num_images}")
        super().__init__("builtin" if root is None else str(root), **options)
        self.num_images = int(num_images or from_root or DEFAULT_NUM_IMAGES)
        self.image_size = int(image_size)
        if self.image_size < 16:
            raise DataError("image_size", f"must be at least 16 pixels, got {self.image_size}")
        self.seed = int(seed)
        self.vocab = ISIC2019

    def records(self) -> list[Record]:
        return synthetic_records(self.num_images, self.seed)

    def open(self, record: Record) -> Image.Image:
        seed, lesion, index = parse_synthetic_source(record.source)
        if not 0 <= record.label < len(self.vocab):
            raise ImageError(record.source, f"label {record.label} outside 0..{len(self.vocab) - 1}")
        style = STYLES[self.vocab.names[record.label]]
        height, width = self.image_size, round(self.image_size * 4 / 3)
        return render_lesion(style, (seed, 0, lesion), (seed, 1, index), height, width)

    def fingerprint(self) -> str:
        return f"synthetic:num_images={self.num_images},image_size={self.image_size},seed={self.seed}"
