"""Input discovery, with real HAM10000 images laid out as users ship them: a folder unzipped on macOS,
Windows metadata, stray files, broken links, phone photos (HEIC) and CSVs written on Windows."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import serving_artifact
from skindistil.cli import main
from skindistil.data.discovery import discover_images, resolve_listed_path
from skindistil.data.prepare import prepare_dataset
from skindistil.data.sources import build_source
from skindistil.errors import DataError
from skindistil.inference.predictor import Predictor

# The 82-byte header of a macOS AppleDouble file (magic 0x00051607), as `zip` on macOS writes them.
APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(56)


@pytest.fixture(scope="module")
def images(ham_root):
    return sorted((ham_root / "images").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return serving_artifact(tmp_path_factory.mktemp("discovery"))


def _unzipped_on_macos(images, root):
    """photos/ as an archive made on macOS and Windows unpacks: 4 real images (one in a sub-folder, one
    with an upper-case extension), AppleDouble twins, __MACOSX/, .DS_Store, Thumbs.db, desktop.ini,
    a text note, a DICOM-named file, a broken link, and a link back up the tree."""
    photos = root / "photos"
    (photos / "visit2").mkdir(parents=True)
    names = [photos / images[0].name, photos / images[1].name, photos / "visit2" / images[2].name,
             photos / images[3].name.replace(".jpg", ".JPG")]
    for src, dst in zip(images, names, strict=False):
        shutil.copy(src, dst)
        (dst.parent / f"._{dst.name}").write_bytes(APPLE_DOUBLE)
        macosx = root / "__MACOSX" / dst.parent.relative_to(root)
        macosx.mkdir(parents=True, exist_ok=True)
        (macosx / f"._{dst.name}").write_bytes(APPLE_DOUBLE)
    shutil.move(root / "__MACOSX", photos / "__MACOSX")
    (photos / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (photos / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (photos / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (photos / "notes.txt").write_text("left arm, 2 visits")
    (photos / "scan.dcm").write_bytes(b"DICM")
    (photos / "gone.jpg").symlink_to(root / "deleted.jpg")
    (photos / "visit2" / "again").symlink_to(photos)
    return photos, sorted(names)


def test_discovery_ignores_os_metadata_and_lists_what_it_does_not_take(images, tmp_path):
    photos, real = _unzipped_on_macos(images, tmp_path)
    found = discover_images([photos])
    assert found.files == sorted([*real, photos / "gone.jpg"])  # the broken link is taken: decoding names it
    assert [p.where for p in found.skipped] == [
        str(photos / "notes.txt"), str(photos / "scan.dcm"), str(photos / "visit2" / "again")]
    assert "extension '.txt' is not an image extension" in found.skipped[0].reason
    assert "extension '.dcm' is not an image extension" in found.skipped[1].reason
    assert found.skipped[2].reason == f"not taken: folder already searched (it is {photos.resolve()})"
    assert found.unsearched == []
    # 4 AppleDouble twins, __MACOSX/, .DS_Store, Thumbs.db, desktop.ini
    assert found.ignored == 8
    # named directly, an AppleDouble file is listed, not decoded
    direct = discover_images([photos / f"._{images[0].name}", real[0]])
    assert direct.files == [real[0]] and "AppleDouble" in direct.skipped[0].reason


def test_predict_on_a_folder_unzipped_on_macos(images, artifact, tmp_path, capsys):
    photos, real = _unzipped_on_macos(images, tmp_path)
    out = tmp_path / "predictions.json"
    assert main(["predict", "--no-progress", "--model", str(artifact), str(photos), "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert [p["path"] for p in document["predictions"]] == [str(p) for p in real]
    expected = Predictor(artifact).predict(real)
    got = np.array([[p["probs"][c] for c in document["classes"]] for p in document["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert document["errors"] == [{"where": str(photos / "gone.jpg"),
                                   "reason": f"broken symbolic link (its target {str(tmp_path / 'deleted.jpg')!r} "
                                             "does not exist)"}]
    assert [s["where"] for s in document["skipped"]] == [
        str(photos / "notes.txt"), str(photos / "scan.dcm"), str(photos / "visit2" / "again")]
    err = capsys.readouterr().err
    assert "._" not in err and "__MACOSX" not in err
    assert f"not taken {photos / 'notes.txt'}: not taken: extension '.txt'" in err
    assert "predicted 4 image(s), 1 failed, 3 not taken (8 hidden or OS metadata file(s) ignored)" in err


def test_a_folder_of_heic_photos_is_predicted_or_refused_by_name(images, artifact, tmp_path, capsys, monkeypatch):
    pillow_heif = pytest.importorskip("pillow_heif")
    phone = tmp_path / "phone"
    phone.mkdir()
    jpegs = images[:3]
    for i, path in enumerate(jpegs):  # phone photos: HEIC, upper-case extension
        pillow_heif.from_pillow(Image.open(path)).save(phone / f"IMG_{i:04d}.HEIC", quality=-1)
    predict = ["predict", "--no-progress", "--model", str(artifact), str(phone), "--out", str(tmp_path / "p.csv")]
    assert main(predict) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table["image"]) == ["IMG_0000", "IMG_0001", "IMG_0002"]
    # near-lossless HEVC: the same predictions as the JPEGs they were made from
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(), Predictor(artifact).predict(jpegs), atol=0.02)
    assert "predicted 3 image(s), 0 failed, 0 not taken" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if the `heif` extra were not installed
    assert main(predict) == 1
    err = capsys.readouterr().err
    assert "predicted 0 image(s), 3 failed" in err
    assert f"failed {phone / 'IMG_0000.HEIC'}: HEIC/HEIF image; decoding HEIC/HEIF needs the optional" in err


def test_windows_separators_in_path_lists(images, artifact, tmp_path):
    folder = tmp_path / "export" / "images"
    folder.mkdir(parents=True)
    for path in images[:2]:
        shutil.copy(path, folder / path.name)
    listing = tmp_path / "export" / "list.csv"
    pd.DataFrame({
        "path": [f"images\\{images[0].name}", f".\\images\\{images[1].name}", "C:\\Users\\derm\\x.jpg"],
        "label": ["nv", "mel", "nv"],
    }).to_csv(listing, index=False)
    found = discover_images([listing], read_lists=True)
    assert found.files == [folder / images[0].name, folder / images[1].name]
    assert found.skipped[0].where == f"{listing} row 4" and "Windows drive or network path" in found.skipped[0].reason
    # the same list as a prepare source: both images found, the drive path refused naming its row
    with pytest.raises(DataError, match=r"list\.csv row 4: 'C:\\\\Users\\\\derm\\\\x\.jpg' is a Windows drive"):
        build_source("csv", listing).records()
    records = build_source("csv", listing, on_error="skip").records()
    assert [(r.image_id, r.source) for r in records] == [
        (f"images/{images[0].stem}", str(folder / images[0].name)),
        (f"images/{images[1].stem}", str(folder / images[1].name)),
    ]
    # a file whose name really holds a backslash (legal on Linux) is taken as it is
    odd = tmp_path / "export" / "a\\b.jpg"
    shutil.copy(images[2], odd)
    assert resolve_listed_path("a\\b.jpg", tmp_path / "export", "row 2") == odd


def test_prepare_an_image_folder_unzipped_on_macos(images, tmp_path):
    tree = tmp_path / "tree"
    for i, path in enumerate(images):
        dst = tree / ("nv" if i < 3 else "mel") / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
        macosx = tree / "__MACOSX" / dst.parent.name
        macosx.mkdir(parents=True, exist_ok=True)
        (macosx / f"._{path.name}").write_bytes(APPLE_DOUBLE)
        (dst.parent / f"._{path.name}").write_bytes(APPLE_DOUBLE)
    (tree / "nv" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tree / "mel" / "README.txt").write_text("melanomas")
    (tree / "labels.csv").write_text("image,label\n")
    result = prepare_dataset(build_source("folder", tree), tmp_path / "data", short_side=32, workers=0,
                             progress=False, fractions=(0.5, 0.25, 0.25))
    assert result.num_images == 6
    assert sorted(result.counts["train"]) == ["mel", "nv"]  # no __MACOSX class
    assert [(p.where, p.reason.split(":")[0]) for p in result.problems] == [
        (str(tree / "labels.csv"), "not taken"), (str(tree / "mel" / "README.txt"), "not taken")]
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["problems"] == [p.to_dict() for p in result.problems]


def test_an_unreadable_folder_is_named(images, tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    for cls in ("nv", "mel"):
        (tree / cls / "locked").mkdir(parents=True)
        shutil.copy(images[0 if cls == "nv" else 1], tree / cls / images[0 if cls == "nv" else 1].name)
    scandir = os.scandir

    def denied(path):  # as for a folder without read permission (the tests run as root, which ignores modes)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("skindistil.data.discovery.os.scandir", denied)
    found = discover_images([tree / "nv"])
    assert found.files == [tree / "nv" / images[0].name]
    assert [(p.where, p.reason) for p in found.unsearched] == [
        (str(tree / "nv" / "locked"), "folder cannot be read (Permission denied)")]
    # images may hide there: prepare fails naming the folder (or, skipping, lists it)
    with pytest.raises(DataError, match=r"mel/locked: folder cannot be read \(Permission denied\)"):
        build_source("folder", tree).records()
    source = build_source("folder", tree, on_error="skip")
    assert len(source.records()) == 2
    assert [p.where for p in source.problems] == [str(tree / "mel" / "locked"), str(tree / "nv" / "locked")]
