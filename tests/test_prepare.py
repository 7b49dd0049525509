"""prepare: cache + manifest from real HAM10000 images, bad images, resume after interruption, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import skindistil.data.prepare as prepare_module
from skindistil import cli
from skindistil.data.prepare import (
    MANIFEST_COLUMNS,
    MANIFEST_METADATA,
    MASK_COLUMN,
    cache_file_for,
    load_manifest,
    prepare_dataset,
)
from skindistil.data.sources import ImageFolderSource, build_source
from skindistil.errors import DataError, ImageError


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _folder_dataset(ham_root: Path, root: Path, per_class: int = 4) -> Path:
    """root/<dx>/<image>.jpg with `per_class` real HAM10000 images of two classes."""
    table = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    for dx in ("mel", "nv"):
        (root / dx).mkdir(parents=True)
        for image in table.loc[table["dx"] == dx, "image_id"].head(per_class):
            shutil.copy(ham_root / "images" / f"{image}.jpg", root / dx / f"{image}.jpg")
    return root


BAD_IMAGES = {
    "truncated.jpg": ("half", "truncated"),
    "empty.jpg": (b"", "empty file"),
    "text.jpg": (b"this is a text file, not a JPEG\n", "not an image"),
    "bomb.png": (_png_header_claiming(60000, 60000), "decompression bomb"),
}


def _add_bad_image(root: Path, name: str) -> None:
    content, _ = BAD_IMAGES[name]
    if content == "half":
        real = next((root / "nv").glob("*.jpg")).read_bytes()
        content = real[: len(real) // 2]
    (root / "nv" / name).write_bytes(content)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ham_prepared(ham_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ham") / "prepared"
    source = build_source("ham10000", ham_root)
    result = prepare_dataset(source, out, limit=60, workers=2, folds=3, progress=False)
    return result, out


def test_prepare_real_ham_writes_cache_and_manifest(ham_prepared):
    result, out = ham_prepared
    manifest, info = load_manifest(out)
    assert result.num_images == len(manifest) == 60 and result.num_decoded == 60
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, *MANIFEST_METADATA, MASK_COLUMN]
    assert (manifest[MASK_COLUMN] == "").all() and info["masks"] is None  # prepared without --masks
    assert info["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert info["source"] == "ham10000" and info["short_side"] == 256 and info["num_images"] == 60
    assert info["splits"] == {"seed": 42, "fractions": [0.7, 0.15, 0.15], "folds": 3, "predefined": False,
                              "drawn_from_train": []}
    assert (manifest["lesion_id"] == manifest["group"]).all() and set(manifest["sex"]) <= {"male", "female", ""}
    assert set(manifest["class_name"]) == set(info["classes"])  # --limit keeps every class
    # No lesion on two sides; folds cover train+val only.
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert manifest.loc[manifest["split"] == "test", "fold"].isna().all()
    assert set(manifest.loc[manifest["split"] != "test", "fold"]) == {0, 1, 2}
    counts = manifest.groupby(["split", "class_name"]).size()
    assert info["counts"]["train"]["nv"] == counts["train", "nv"]
    for row in manifest.head(10).itertuples():
        cached = np.load(out / row.cache_file)
        assert cached.dtype == np.uint8 and cached.shape == (row.height, row.width, 3)
        assert min(cached.shape[:2]) == 256
        assert (row.orig_width, row.orig_height) == (200, 150)
        assert row.cache_file == cache_file_for(row.image_id)
        assert row.sha256 == hashlib.sha256(Path(row.source).read_bytes()).hexdigest()
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["num_skipped"] == 0 and report["problems"] == []
    assert result.images_per_second > 0 and set(result.timings) >= {"parse", "decode", "split", "write", "total"}


def test_rerun_reuses_the_cache(ham_root, ham_prepared, tmp_path):
    _, out = ham_prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = prepare_dataset(build_source("ham10000", ham_root), copy, limit=60, workers=0, folds=3, progress=False)
    assert result.num_reused == 60 and result.num_decoded == 0
    pd.testing.assert_frame_equal(load_manifest(copy)[0], load_manifest(out)[0])


def test_border_crop_on_real_uda_images(uda_root, tmp_path):
    """UDA-1 images are real original-resolution dermoscopy; the crop box stays inside the image."""
    result = prepare_dataset(
        build_source("isic2019", uda_root), tmp_path, limit=8, short_side=64, workers=0, progress=False
    )
    manifest, _ = load_manifest(tmp_path)
    assert result.num_images == 8
    assert (manifest["crop_x1"] <= manifest["orig_width"]).all() and (manifest["crop_x0"] >= 0).all()
    assert (manifest["crop_x1"] > manifest["crop_x0"]).all() and (manifest["crop_y1"] > manifest["crop_y0"]).all()
    assert (np.minimum(manifest["width"], manifest["height"]) == 64).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_bad_image_fails_naming_the_file(ham_root, tmp_path, bad):
    root = _folder_dataset(ham_root, tmp_path / "src")
    _add_bad_image(root, bad)
    with pytest.raises(ImageError, match=rf"{bad}: .*{BAD_IMAGES[bad][1]}"):
        prepare_dataset(ImageFolderSource(root), tmp_path / "out", short_side=32, workers=2, progress=False)
    # Nothing half-written: not a prepared dataset, no temporary files.
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_manifest(tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_bad_images_are_skipped_and_reported(ham_root, tmp_path):
    root = _folder_dataset(ham_root, tmp_path / "src")
    for name in BAD_IMAGES:
        _add_bad_image(root, name)
    result = prepare_dataset(
        ImageFolderSource(root), tmp_path / "out", short_side=32, workers=2, on_error="skip", progress=False
    )
    assert result.num_images == 8
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    reasons = {Path(p["where"]).name: p["reason"] for p in report["problems"]}
    assert set(reasons) == set(BAD_IMAGES)
    for name, (_, expected) in BAD_IMAGES.items():
        assert expected in reasons[name]
    manifest, _ = load_manifest(tmp_path / "out")
    assert not any(Path(s).name in BAD_IMAGES for s in manifest["source"])


def test_pixel_limit(ham_root, tmp_path):
    root = _folder_dataset(ham_root, tmp_path / "src", per_class=2)
    with pytest.raises(ImageError, match=r"\.jpg: image is 200x150 = 30,000 pixels, over the limit of 29,999"):
        prepare_dataset(ImageFolderSource(root), tmp_path / "out", max_pixels=29_999, workers=0, progress=False)


def test_bad_csv_row_through_prepare(ham_root, tmp_path):
    image = next((ham_root / "images").glob("*.jpg"))
    shutil.copy(image, tmp_path / "a.jpg")
    (tmp_path / "list.csv").write_text("path,label\na.jpg,x\nb.jpg,y\na.jpg,z\n")
    with pytest.raises(DataError, match=r"list\.csv row 3: image file .*b\.jpg.* not found"):
        prepare_dataset(build_source("csv", tmp_path / "list.csv"), tmp_path / "out", workers=0, progress=False)
    result = prepare_dataset(
        build_source("csv", tmp_path / "list.csv"), tmp_path / "out", on_error="skip", short_side=32, workers=0, progress=False
    )
    assert result.num_images == 1
    assert [p.where.rsplit(" ", 1)[-1] for p in result.problems] == ["3", "4"]  # missing image, duplicate id


def test_load_manifest_rejects_other_folders(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "dataset.json").write_text('{"format": 99}')
    with pytest.raises(DataError, match="unsupported prepared-dataset format 99"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- resume


def test_interrupted_prepare_resumes(ham_root, tmp_path, monkeypatch):
    source = build_source("ham10000", ham_root)
    options = {"limit": 24, "short_side": 48, "workers": 0, "progress": False}
    reference = prepare_dataset(source, tmp_path / "reference", **options)

    calls = {"n": 0}
    real_cache_image = prepare_module._cache_image

    def dies_after_ten(*args):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real_cache_image(*args)

    monkeypatch.setattr(prepare_module, "_cache_image", dies_after_ten)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(source, tmp_path / "resumed", **options)
    monkeypatch.undo()
    out = tmp_path / "resumed"
    assert len(list(out.rglob("*.npy"))) == 10 and not (out / "dataset.json").exists()
    # Leftovers of a harder kill: a temporary file and a journal line cut short.
    stray = out / "cache" / "00" / "ISIC_0000000.npy.123.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"partial")
    with open(out / "cache" / "journal.jsonl", "a") as journal:
        journal.write('{"image_id": "ISIC_00')

    resumed = prepare_dataset(source, out, **options)
    assert resumed.num_reused == 10 and resumed.num_decoded == 14
    assert not stray.exists()
    expected, _ = load_manifest(tmp_path / "reference")
    got, _ = load_manifest(out)
    pd.testing.assert_frame_equal(got, expected)
    for cache_file in expected["cache_file"]:
        assert np.array_equal(np.load(out / cache_file), np.load(tmp_path / "reference" / cache_file))
    assert resumed.counts == reference.counts


def test_changed_source_image_is_decoded_again(ham_root, tmp_path):
    root = _folder_dataset(ham_root, tmp_path / "src", per_class=2)
    options = {"short_side": 32, "workers": 0, "progress": False}
    prepare_dataset(ImageFolderSource(root), tmp_path / "out", **options)
    changed = sorted((root / "nv").glob("*.jpg"))[0]
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=95)
    result = prepare_dataset(ImageFolderSource(root), tmp_path / "out", **options)
    assert (result.num_reused, result.num_decoded) == (3, 1)
    # Different settings invalidate the whole cache.
    assert prepare_dataset(ImageFolderSource(root), tmp_path / "out", short_side=40, workers=0, progress=False).num_reused == 0


# --------------------------------------------------------------------------- predefined splits, CLI


def test_dermamnist_prepare_keeps_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 14), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(tmp_path / "dermamnist.npz", **arrays)
    prepare_dataset(build_source("dermamnist", tmp_path / "dermamnist.npz"), tmp_path / "out", short_side=32, workers=0, progress=False)
    manifest, info = load_manifest(tmp_path / "out")
    assert manifest["split"].value_counts().to_dict() == {"train": 14, "test": 4, "val": 3}
    assert info["splits"]["predefined"] is True and info["splits"]["fractions"] is None
    assert manifest["group"].isna().all()
    first = manifest.iloc[0]
    assert first["image_id"] == "dermamnist_train_00000" and (first["width"], first["height"]) == (32, 32)


def test_cli_end_to_end(ham_root, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare", "--source", "ham10000", "--labels", "isic2019", "--root", str(ham_root), "--out", str(out)]
    code = cli.main([*argv, "--limit", "20", "--short-side", "32", "--workers", "0", "--split", "0.6,0.2,0.2", "--seed", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prepared 20 images" in printed and "MEL" in printed
    manifest, info = load_manifest(out)
    assert len(manifest) == 20 and info["classes"][0] == "MEL" and info["splits"]["fractions"] == [0.6, 0.2, 0.2]

    code = cli.main(["prepare", "--source", "folder", "--root", str(tmp_path / "missing"), "--out", str(out)])
    assert code == 1
    assert "missing: image folder not found" in capsys.readouterr().err
    code = cli.main(["prepare", "--source", "isic2019", "--labels", "dx", "--root", str(ham_root), "--out", str(out)])
    assert code == 1
    assert "--labels do(es) not apply to --source isic2019" in capsys.readouterr().err


FRAME = 24  # px of black frame added around each real image


def _framed_dataset(ham_root: Path, root: Path, frame: int) -> Path:
    """root/<dx>/<image>.png: 4 real HAM10000 images per class, decoded and written losslessly inside
    a black frame of `frame` px (0: as they are)."""
    table = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    for dx in ("mel", "nv"):
        (root / dx).mkdir(parents=True)
        for image in table.loc[table["dx"] == dx, "image_id"].head(4):
            pixels = np.asarray(Image.open(ham_root / "images" / f"{image}.jpg").convert("RGB"))
            framed = np.pad(pixels, ((frame, frame), (frame, frame), (0, 0)))
            Image.fromarray(framed).save(root / dx / f"{image}.png")
    return root


def _cached_arrays(out: Path) -> dict[str, np.ndarray]:
    manifest, _ = load_manifest(out)
    return {Path(row.image_id).name: np.load(out / row.cache_file) for row in manifest.itertuples()}


def test_border_crop_removes_a_black_frame_from_the_cached_array(ham_root, tmp_path):
    """Real images inside a black frame cache, with border crop, exactly the pixels of the unframed
    images; without it, the frame stays in the cached array."""
    kwargs = {"short_side": 64, "workers": 0, "progress": False, "duplicates": "keep"}
    framed_src = _framed_dataset(ham_root, tmp_path / "framed", FRAME)
    plain_src = _framed_dataset(ham_root, tmp_path / "plain", 0)
    prepare_dataset(ImageFolderSource(framed_src), tmp_path / "cropped", border_crop=True, **kwargs)
    prepare_dataset(ImageFolderSource(framed_src), tmp_path / "uncropped", border_crop=False, **kwargs)
    prepare_dataset(ImageFolderSource(plain_src), tmp_path / "reference", border_crop=True, **kwargs)
    cropped, uncropped, reference = (_cached_arrays(tmp_path / d) for d in ("cropped", "uncropped", "reference"))
    assert len(cropped) == 8 and set(cropped) == set(uncropped) == set(reference)
    manifest = load_manifest(tmp_path / "cropped")[0].set_index("image_id")
    plain_manifest = load_manifest(tmp_path / "reference")[0].set_index("image_id")
    for name, array in cropped.items():
        np.testing.assert_array_equal(array, reference[name])  # the frame is gone, nothing else changed
        assert uncropped[name].shape != array.shape
        edge = np.concatenate([uncropped[name][0], uncropped[name][-1], uncropped[name][:, 0], uncropped[name][:, -1]])
        assert edge.max() <= 20  # without border crop the cached array still starts with the black frame
    for image_id, row in manifest.iterrows():
        plain = plain_manifest.loc[image_id]
        assert [row.crop_x0, row.crop_y0, row.crop_x1, row.crop_y1] == [
            plain.crop_x0 + FRAME, plain.crop_y0 + FRAME, plain.crop_x1 + FRAME, plain.crop_y1 + FRAME]
