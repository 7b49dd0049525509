"""The one decode path: every Pillow mode, built from one real HAM10000 image, decodes to the right 8-bit RGB."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from skindistil.data.imageio import as_rgb_array, read_image, to_rgb
from skindistil.errors import ImageError


@pytest.fixture(scope="module")
def original(ham_root):
    """A real HAM10000 image (8-bit RGB JPEG) and its pixels."""
    path = sorted((ham_root / "images").glob("*.jpg"))[0]
    return path, np.asarray(Image.open(path).convert("RGB"))


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _mad(decoded, reference: np.ndarray) -> float:
    decoded = np.asarray(decoded)
    assert decoded.dtype == np.uint8 and decoded.shape == (*reference.shape[:2], 3)
    reference = reference if reference.ndim == 3 else np.repeat(reference[..., None], 3, axis=2)
    return float(np.abs(decoded.astype(np.float64) - reference).mean())


def _file(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def _png_rgb16(rgb16: np.ndarray) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow cannot write, written by hand."""
    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _jfif_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """RGB -> YCbCr by the JFIF (JPEG) definition, in floating point, rounded once."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.round(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def test_every_mode_that_holds_the_image_decodes_to_it(original):
    path, rgb = original
    grey = _grey(rgb)
    grey16 = grey.astype(np.uint16) * 257  # the same grey levels at 16 bits (255 -> 65535)
    opaque = np.full(grey.shape, 255, dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, opaque]))
    la = Image.fromarray(np.dstack([grey, opaque]))
    grey_palette = Image.fromarray(grey, mode="P")
    grey_palette.putpalette([v for level in range(256) for v in (level, level, level)])
    cases = {
        # files, through read_image: what users have on disk
        "RGB jpeg": (path.read_bytes(), rgb),
        "L png": (_file(Image.fromarray(grey), "PNG"), grey),
        "LA png": (_file(la, "PNG"), grey),
        "P png": (_file(grey_palette, "PNG"), grey),
        "RGBA png": (_file(rgba, "PNG"), rgb),
        "CMYK tiff": (_file(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb),
        "LAB tiff": (_file(Image.fromarray(rgb).convert("LAB"), "TIFF"), rgb),
        "I;16 png": (_file(Image.fromarray(grey16), "PNG"), grey),
        "I;16 tiff": (_file(Image.fromarray(grey16), "TIFF"), grey),
        "RGB 16-bit png": (_png_rgb16(rgb.astype(np.uint16) * 257), rgb),
        # images in memory, through to_rgb: what Python callers pass
        "RGBX": (Image.fromarray(rgb).convert("RGBX"), rgb),
        "RGBa": (rgba.convert("RGBa"), rgb),
        "La": (la.convert("La"), grey),
        "PA": (grey_palette.convert("PA"), grey),
        "YCbCr": (Image.fromarray(_jfif_ycbcr(rgb), mode="YCbCr"), rgb),
        "HSV": (Image.fromarray(rgb).convert("HSV"), rgb),
        "I;16B": (Image.frombytes("I;16B", grey.shape[::-1], grey16.astype(">u2").tobytes()), grey),
        "I;16L": (Image.frombytes("I;16L", grey.shape[::-1], grey16.astype("<u2").tobytes()), grey),
        "I;16N": (Image.frombytes("I;16N", grey.shape[::-1], grey16.astype(np.uint16).tobytes()), grey),
    }
    for name, (item, reference) in cases.items():
        if isinstance(item, bytes):
            opened = Image.open(io.BytesIO(item))
            assert opened.mode == name.split()[0] or name == "RGB 16-bit png", (name, opened.mode)
            decoded = read_image(item, name=name)
        else:
            assert item.mode == name, name
            decoded = to_rgb(item, name)
        assert decoded.mode == "RGB", name
        assert _mad(decoded, reference) < 1.0, (name, _mad(decoded, reference))
    # the bug this replaces: Pillow's own conversion of 16-bit grey clips everything above 255 to white
    assert _mad(Image.fromarray(grey16).convert("RGB"), grey) > 50
    assert as_rgb_array(grey16, "array").tolist() == np.repeat(grey[..., None], 3, axis=2).tolist()


def test_modes_that_hold_less_decode_to_what_they_hold(original):
    _, rgb = original
    grey = _grey(rgb)
    # 1 bit: black or white, exactly where the bits are
    bilevel = Image.fromarray(grey).convert("1")
    bits = np.asarray(bilevel)
    assert _mad(read_image(_file(bilevel, "PNG")), np.where(bits, 255, 0).astype(np.uint8)) == 0
    # 256 colours: each pixel the palette colour of its index
    quantised = Image.fromarray(rgb).quantize(64)
    palette = np.array(quantised.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    assert _mad(read_image(_file(quantised, "PNG")), palette[np.asarray(quantised)]) == 0


def test_alpha_is_composited_on_black(original):
    _, rgb = original
    height, width = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))
    expected = rgb.astype(np.float64) * alpha[..., None] / 255
    decoded = read_image(_file(Image.fromarray(np.dstack([rgb, alpha])), "PNG"))
    assert _mad(decoded, expected) < 1.0
    assert np.asarray(decoded)[:, 0].max() == 0  # fully transparent column: the background
    # a palette image with a transparent colour (PNG tRNS): that colour becomes the background
    quantised = Image.fromarray(rgb).quantize(16)
    index = int(np.bincount(np.asarray(quantised).ravel()).argmax())
    decoded = np.asarray(read_image(_file(quantised, "PNG", transparency=index)))
    assert (decoded[np.asarray(quantised) == index] == 0).all()
    assert decoded[np.asarray(quantised) != index].max() > 0


def test_wide_integer_and_float_images_are_refused_by_name(original, tmp_path):
    _, rgb = original
    grey = _grey(rgb)
    for mode, what in (("I", "32-bit integer image"), ("F", "32-bit floating-point image")):
        path = tmp_path / f"grey_{mode}.tif"
        Image.fromarray(grey).convert(mode).save(path)
        assert Image.open(path).mode == mode
        with pytest.raises(ImageError, match=rf"grey_{mode}\.tif: {what} \(Pillow mode {mode}\)"):
            read_image(path)
    with pytest.raises(ImageError, match="lesion: float64 array: floating-point pixels"):
        as_rgb_array(rgb / 255.0, "lesion")
    # older Pillow opened 16-bit grey PNGs as mode I: a PNG holds at most 16 bits, so that is 16-bit data
    wide = Image.fromarray(grey.astype(np.int32) * 257)
    assert wide.mode == "I"
    wide.format = "PNG"
    assert _mad(to_rgb(wide), grey) == 0


def test_heic_is_decoded_with_pillow_heif_and_refused_by_name_without(original, tmp_path, monkeypatch):
    pillow_heif = pytest.importorskip("pillow_heif")
    _, rgb = original
    photo = tmp_path / "IMG_0001.HEIC"
    pillow_heif.from_pillow(Image.fromarray(rgb)).save(photo, quality=-1)  # lossless HEVC
    assert _mad(read_image(photo), rgb) < 1.0
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if the extra were not installed
    with pytest.raises(ImageError, match=r"IMG_0001\.HEIC: HEIC/HEIF image; .*pip install 'skindistil\[heif\]'"):
        read_image(photo)


def test_broken_links_and_folders_are_named(original, tmp_path):
    link = tmp_path / "lesion.jpg"
    link.symlink_to(tmp_path / "moved" / "lesion.jpg")
    with pytest.raises(ImageError, match=r"lesion\.jpg: broken symbolic link \(its target .*moved/lesion\.jpg"):
        read_image(link)
    with pytest.raises(ImageError, match="a folder, not an image file"):
        read_image(tmp_path)


def test_a_16_bit_png_is_the_same_image_as_its_8_bit_twin_everywhere(original, tmp_path):
    """The reported case: prepare, predict, serve and /v1/explain saw a 16-bit grey PNG as all white."""
    from fastapi.testclient import TestClient

    from conftest import serving_artifact
    from skindistil.cli import main
    from skindistil.data.prepare import load_manifest, prepare_dataset
    from skindistil.data.sources import build_source
    from skindistil.inference.predictor import Predictor
    from skindistil.serve import create_app

    _, rgb = original
    grey = _grey(rgb)
    tree = tmp_path / "tree"
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
    Image.fromarray(grey).save(tree / "a" / "twin8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tree / "a" / "twin16.png")
    Image.fromarray(np.ascontiguousarray(grey[::-1])).save(tree / "b" / "flipped.png")  # a second class
    twins = [tree / "a" / "twin8.png", tree / "a" / "twin16.png"]
    assert Image.open(twins[1]).mode == "I;16"

    # the twins are one image by design: `keep` lets them through, and the duplicate check, which hashes
    # the decoded pixels, puts the 8-bit and the 16-bit file in one cluster
    result = prepare_dataset(build_source("folder", tree), tmp_path / "data", short_side=64, workers=0,
                             progress=False, duplicates="keep")
    assert [sorted(c["images"]) for c in result.duplicates["clusters"]] == [["a/twin16", "a/twin8"]]
    manifest, _ = load_manifest(tmp_path / "data")
    cached = {row.image_id: np.load(tmp_path / "data" / row.cache_file) for row in manifest.itertuples()}
    assert np.array_equal(cached["a/twin8"], cached["a/twin16"]) and cached["a/twin16"].mean() < 250

    artifact = serving_artifact(tmp_path)
    probs = Predictor(artifact).predict(twins)
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-6)
    assert main(["predict", "--no-progress", "--model", str(artifact), *map(str, twins),
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert np.array_equal(*np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1, usecols=range(1, 9)))

    with TestClient(create_app(artifact)) as client:
        served = [client.post("/v1/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
                  for p in twins]
        assert served[0]["probabilities"] == served[1]["probabilities"]
        explained = [client.post("/v1/explain", files={"file": (p.name, p.read_bytes(), "image/png")}) for p in twins]
        assert explained[0].status_code == 200 and explained[0].content == explained[1].content


# ------------------------------------------------------------ geometry: border crop, resize, inputs


def _bright(original) -> np.ndarray:
    """The real image lifted above the threshold everywhere (no dark pixel of its own)."""
    return np.maximum(original[1], 40).astype(np.uint8)


def test_border_crop_box_finds_a_black_frame_around_a_real_image(original):
    from skindistil.data.imageio import border_crop_box

    rgb = _bright(original)
    height, width = rgb.shape[:2]
    assert border_crop_box(rgb) == (0, 0, width, height)  # no dark border: the whole image
    framed = np.pad(rgb, ((7, 11), (5, 3), (0, 0)))
    assert border_crop_box(framed) == (5, 7, 5 + width, 7 + height)
    assert border_crop_box(np.zeros_like(framed)) == (0, 0, framed.shape[1], framed.shape[0])  # all dark
    # the frame's level against the threshold: 30 is a border at threshold 40, not at the default 20
    grey_frame = np.pad(rgb, ((4, 4), (6, 6), (0, 0)), constant_values=30)
    assert border_crop_box(grey_frame) == (0, 0, width + 12, height + 8)
    assert border_crop_box(np.pad(np.maximum(rgb, 50), ((4, 4), (6, 6), (0, 0)), constant_values=30),
                           threshold=40) == (6, 4, 6 + width, 4 + height)


@pytest.mark.parametrize(("colour", "is_border"), [
    ((0, 0, 60), True), ((60, 0, 0), True), ((0, 60, 0), False),  # one channel: 6.8, 17.9, 35.2
    ((15, 15, 100), False), ((60, 10, 0), False), ((21, 21, 21), False),  # 24.7, 23.8, 21.0: above 20
])
def test_border_crop_uses_the_luma_of_each_channel(colour, is_border):
    """Grey = 0.299 R + 0.587 G + 0.114 B: blue 60 (6.8) and red 60 (17.9) are dark, green 60 (35.2) is not."""
    from skindistil.data.imageio import border_crop_box

    rgb = np.zeros((50, 60, 3), dtype=np.uint8)
    rgb[:] = colour
    rgb[10:40, 20:50] = 200
    assert border_crop_box(rgb) == ((20, 10, 50, 40) if is_border else (0, 0, 60, 50))


def test_border_crop_keeps_the_largest_bright_region_of_at_least_one_percent():
    from skindistil.data.imageio import border_crop_box

    rgb = np.zeros((100, 100, 3), dtype=np.uint8)
    rgb[5:15, 70:80] = 255  # 10 x 10 = exactly 1% of the image: a lesion field
    assert border_crop_box(rgb) == (70, 5, 80, 15)
    rgb[50:59, 10:30] = 255  # a larger region (9 x 20) elsewhere wins
    assert border_crop_box(rgb) == (10, 50, 30, 59)
    speck = np.zeros((100, 100, 3), dtype=np.uint8)
    speck[0:9, 0:10] = 255  # 90 pixels: under 1%, too small to be the field: keep the whole image
    assert border_crop_box(speck) == (0, 0, 100, 100)
    away = np.zeros((100, 100, 3), dtype=np.uint8)
    away[50:59, 50:60] = 255  # the same 90 pixels away from the corner: still too small
    assert border_crop_box(away) == (0, 0, 100, 100)


def test_resize_shorter_keeps_the_aspect_with_pillows_filters(original):
    from skindistil.data.imageio import resize_shorter

    image = Image.fromarray(original[1])
    width, height = image.size
    down = resize_shorter(image, height // 2)
    assert down.size == (round(width / 2), height // 2)
    assert np.array_equal(np.asarray(down), np.asarray(image.resize(down.size, Image.Resampling.LANCZOS)))
    up = resize_shorter(image, height * 2)
    assert up.size == (width * 2, height * 2)
    assert np.array_equal(np.asarray(up), np.asarray(image.resize(up.size, Image.Resampling.BICUBIC)))
    assert resize_shorter(image, height) is image
    assert resize_shorter(Image.new("RGB", (3, 600)), 1).size == (1, 200)
    assert resize_shorter(Image.new("RGB", (600, 3)), 1).size == (200, 1)


def test_image_size_reads_the_header_only(original):
    from skindistil.data.imageio import image_size

    path, rgb = original
    assert image_size(path.read_bytes()) == (rgb.shape[1], rgb.shape[0])
    assert image_size(b"not an image") is None


def test_as_image_list_and_as_rgb_array_take_every_input_kind(original):
    from skindistil.data.imageio import as_image_list

    path, rgb = original
    image = Image.fromarray(rgb)
    for one in (str(path), path, path.read_bytes(), image, rgb):
        assert len(as_image_list(one)) == 1 and as_image_list(one)[0] is one
    batch = np.stack([rgb, rgb[::-1]])
    assert [a.shape for a in as_image_list(batch)] == [rgb.shape] * 2
    assert as_image_list(x for x in (path, path)) == [path, path]
    assert as_rgb_array(rgb) is rgb  # already 8-bit RGB: taken as it is
    for source in (path, str(path), path.read_bytes(), image):
        assert np.array_equal(as_rgb_array(source), rgb)
    assert np.array_equal(as_rgb_array(_grey(rgb)), np.repeat(_grey(rgb)[..., None], 3, axis=2))
    with pytest.raises(ImageError, match=r"^upload 3: float32 array"):
        as_rgb_array(rgb.astype(np.float32), "upload 3")
    with pytest.raises(ImageError, match=r"^upload 4: array of shape \[2, 3, 4, 5\] and dtype uint8 is not an image"):
        as_rgb_array(np.zeros((2, 3, 4, 5), dtype=np.uint8), "upload 4")
    with pytest.raises(ImageError, match=r"^upload 5: cannot read int as an image"):
        as_rgb_array(7, "upload 5")


@pytest.mark.parametrize(("fmt", "tags", "converted"), [
    ("TIFF", {258: (16,), 339: (1,)}, True),  # 16-bit unsigned samples
    ("TIFF", {258: 16}, True),  # tags as plain numbers, sample format absent (unsigned by default)
    ("TIFF", {258: (16,), 339: 1}, True),
    ("TIFF", {258: (16,), 339: (2,)}, False),  # signed: no defined white level
    ("TIFF", {258: (32,), 339: (1,)}, False),
    ("TIFF", {}, False),
    ("TIFF", None, False),  # no tag directory at all
    ("JPEG", {258: (16,)}, False),
    (None, {}, False),
])
def test_a_mode_i_image_is_16_bit_only_where_its_file_says_so(original, fmt, tags, converted):
    grey = _grey(original[1])
    wide = Image.fromarray(grey.astype(np.int32) * 257)
    wide.format = fmt
    if tags is not None:
        wide.tag_v2 = tags
    if converted:
        assert _mad(to_rgb(wide, "scan.tif"), grey) == 0
    else:
        with pytest.raises(ImageError, match=r"^scan\.tif: 32-bit integer image"):
            to_rgb(wide, "scan.tif")


def test_read_image_names_the_file_and_the_fault(original, tmp_path):
    """Each refusal names the image (`name`, else the path, else <upload>) and says what is wrong."""
    path, rgb = original
    data = path.read_bytes()
    cases = [
        (tmp_path / "absent.jpg", {}, r"absent\.jpg: file not found$"),
        (tmp_path, {}, r": a folder, not an image file$"),
        (b"", {}, r"^<upload>: empty file \(0 bytes\)$"),
        (b"", {"name": "lesion-7"}, r"^lesion-7: empty file"),
        (b"plain text, not pixels", {}, r"^<upload>: not an image \(format not recognised\)$"),
        (data[: len(data) // 2], {}, r"^<upload>: corrupt image: truncated image data"),
        (data, {"max_pixels": 100}, rf"^<upload>: image is {rgb.shape[1]}x{rgb.shape[0]} = "
                                    rf"{rgb.shape[0] * rgb.shape[1]:,} pixels, over the limit of 100 "
                                    r"\(possible decompression bomb\)$"),
    ]
    for src, kwargs, message in cases:
        with pytest.raises(ImageError, match=message):
            read_image(src, **kwargs)
    assert np.array_equal(np.asarray(read_image(data, max_pixels=rgb.shape[0] * rgb.shape[1])), rgb)


def test_read_image_applies_the_exif_orientation(original, tmp_path):
    path, rgb = original
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.png"
    image.save(rotated, exif=exif)
    assert np.array_equal(np.asarray(read_image(rotated)), np.rot90(rgb, k=-1))
    with pytest.raises(ImageError, match=r"^upload 6: 32-bit floating-point image"):
        as_rgb_array(Image.fromarray(_grey(rgb)).convert("F"), "upload 6")


def test_every_16_bit_level_maps_to_the_nearest_8_bit_level():
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    decoded = np.asarray(to_rgb(Image.fromarray(levels), "ramp"))
    expected = np.round(levels.astype(np.float64) * 255 / 65535).astype(np.uint8)  # no exact halves occur
    assert np.array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    for outside in (-1, 65536):
        wide = Image.fromarray(np.full((4, 4), outside, dtype=np.int32))
        wide.format = "PNG"
        with pytest.raises(ImageError, match=r"^scan: 16-bit image \(Pillow mode I\) holds values outside 0\.\.65535$"):
            to_rgb(wide, "scan")


@pytest.mark.parametrize("mode", ["1", "L", "P"])
def test_a_transparent_colour_is_composited_on_black(mode):
    rgb = np.full((4, 6, 3), 255, dtype=np.uint8)
    rgb[:, :3] = (200, 200, 200) if mode != "1" else (255, 255, 255)
    rgb[:, 3:] = 0 if mode == "1" else 255
    image = Image.fromarray(rgb).convert(mode)
    key = image.getpixel((5, 0))  # the colour of the right half, in the mode's own terms
    image.info["transparency"] = key
    decoded = np.asarray(to_rgb(image))
    assert (decoded[:, 3:] == 0).all() and (decoded[:, :3] > 0).all()


def test_an_rgb_png_with_a_transparent_colour_is_composited_on_black(original):
    """A real image saved as an RGB PNG whose tRNS chunk names one colour: the pixels of that colour
    (and only those) decode as the black background, as for RGBA, LA and palette images."""
    rgb = original[1].copy()
    key = tuple(int(v) for v in rgb[10, 10])
    keyed = (rgb == key).all(axis=-1)
    decoded = np.asarray(read_image(_file(Image.fromarray(rgb), "PNG", transparency=key)))
    assert keyed.any() and (decoded[keyed] == 0).all()
    np.testing.assert_array_equal(decoded[~keyed], rgb[~keyed])


def test_avif_is_decoded_and_refused_by_name_without_pillow_support(original, tmp_path, monkeypatch):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    _, rgb = original
    path = tmp_path / "lesion.avif"
    Image.fromarray(rgb).save(path, quality=100)
    assert _mad(read_image(path), rgb) < 4.0
    monkeypatch.setattr(features, "check", lambda name: name != "avif")  # as if Pillow were built without it
    with pytest.raises(ImageError, match=r"lesion\.avif: AVIF image, and this Pillow was built without AVIF support"):
        read_image(path)


def test_pillows_decompression_bomb_guard_becomes_an_error_naming_the_file(original, monkeypatch):
    """skindistil switches Pillow's guard off for its own `max_pixels`; if another module turns it back on,
    Pillow's warning still becomes an ImageError naming the file, not a bare warning or exception."""
    path, rgb = original
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", rgb.shape[0] * rgb.shape[1] - 1)  # warns, does not raise
    with pytest.raises(ImageError, match=rf"{path.name}: corrupt image: .*decompression bomb"):
        read_image(path)


def test_a_mode_this_code_does_not_know_is_refused_by_name(original):
    image = Image.fromarray(original[1])
    image._mode = "RGB;future"  # what a later Pillow might hand over
    with pytest.raises(ImageError, match=r"^lesion\.png: unsupported image mode 'RGB;future'; convert it to 8-bit RGB"):
        to_rgb(image, "lesion.png")
    with pytest.raises(ImageError, match=r"^image: unsupported image mode"):
        to_rgb(image)
    with pytest.raises(ImageError, match=r"^image: unsupported image mode"):
        as_rgb_array(image)


def test_border_crop_treats_the_threshold_level_as_border_and_keeps_dark_images_whole(original):
    from skindistil.data.imageio import border_crop_box

    _, rgb = original
    framed = np.full((rgb.shape[0] + 40, rgb.shape[1] + 40, 3), 20, dtype=np.uint8)  # grey 20: the threshold
    framed[20:-20, 20:-20] = np.maximum(rgb, 21)  # the image, every pixel above the threshold
    assert border_crop_box(framed, threshold=20) == (20, 20, rgb.shape[1] + 20, rgb.shape[0] + 20)
    assert border_crop_box(np.full((50, 60, 3), 20, dtype=np.uint8)) == (0, 0, 60, 50)  # all dark: all kept
    assert border_crop_box(np.full((50, 60, 3), 21, dtype=np.uint8)) == (0, 0, 60, 50)  # no border
