"""Dataset sources: real HAM10000 / ISIC 2019 parsing, layouts, and every bad-input case by name."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skindistil.data.sources import (
    CSVSource,
    DermaMNISTSource,
    HAM10000Source,
    ImageFolderSource,
    ISIC2019Source,
    build_source,
)
from skindistil.data.vocab import HAM10000, ISIC2019
from skindistil.errors import CSVError, DataError

ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"


def _onehot_row(image: str, cls: str | None, unk: int = 0) -> str:
    values = ["1.0" if name == cls else "0.0" for name in ISIC2019.names]
    return ",".join([image, *values, f"{unk}.0"]) + "\n"


def _real_images(root: Path, count: int) -> list[Path]:
    return sorted((root / "images").glob("*.jpg"))[:count]


# --------------------------------------------------------------------------- real data


def test_ham10000_dx_counts_and_groups(ham_root):
    source = build_source("ham10000", ham_root)
    records = source.records()
    assert source.vocab == HAM10000
    assert source.problems == []
    assert source.vocab.counts([r.label for r in records]) == {
        "akiec": 228, "bcc": 359, "bkl": 768, "df": 81, "mel": 778, "nv": 4693, "vasc": 98,
    }  # fmt: skip
    assert len({r.group for r in records}) == 5251
    assert all(r.group and r.group.startswith("HAM_") for r in records)
    assert all(Path(r.source).is_file() and r.split is None for r in records[:50])
    assert records[0].meta["localization"]


def test_ham10000_with_isic2019_labels(ham_root):
    source = build_source("ham10000", ham_root, labels="isic2019")
    records = source.records()
    assert source.vocab == ISIC2019
    assert source.vocab.counts([r.label for r in records]) == {
        "MEL": 778, "NV": 4693, "BCC": 359, "AK": 91, "BKL": 768, "DF": 81, "VASC": 98, "SCC": 137,
    }  # fmt: skip
    # akiec is the only HAM class that splits (into AK and SCC); the rest map one to one.
    by_dx = pd.crosstab([r.meta["dx"] for r in records], [ISIC2019.names[r.label] for r in records])
    assert set(by_dx.loc["akiec"][by_dx.loc["akiec"] > 0].index) == {"AK", "SCC"}
    assert by_dx.loc["mel", "MEL"] == 778


def test_isic2019_uda1(uda_root):
    source = build_source("isic2019", uda_root)
    records = source.records()
    counts = source.vocab.counts([r.label for r in records])
    assert counts == {"MEL": 83, "NV": 253, "BCC": 0, "AK": 0, "BKL": 0, "DF": 0, "VASC": 0, "SCC": 0}
    assert all(r.group is None for r in records)  # lesion_id is empty for every UDA-1 image
    assert records[0].meta["anatom_site_general"]
    assert len({r.image_id for r in records}) == 336


def test_sources_are_picklable(ham_root, uda_root, tmp_path):
    npz = _write_npz(tmp_path / "dermamnist.npz")
    for source in (build_source("ham10000", ham_root), build_source("isic2019", uda_root), build_source("dermamnist", npz)):
        source.records()
        clone = pickle.loads(pickle.dumps(source))
        record = source.records()[0]
        assert np.array_equal(np.asarray(clone.open(record)), np.asarray(source.open(record)))


# --------------------------------------------------------------------------- layouts


def test_ham10000_official_two_part_layout(ham_root, tmp_path):
    table = pd.read_csv(ham_root / "HAM10000_metadata.csv").head(6)
    table.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    for i, image in enumerate(table["image_id"]):
        part = tmp_path / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        os.symlink(ham_root / "images" / f"{image}.jpg", part / f"{image}.jpg")
    records = HAM10000Source(tmp_path).records()
    assert [r.image_id for r in records] == list(table["image_id"])
    assert {Path(r.source).parent.name for r in records} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_isic2019_input_folder_and_downsampled_names(ham_root, tmp_path):
    images = _real_images(ham_root, 3)
    folder = tmp_path / "ISIC_2019_Training_Input"
    folder.mkdir()
    shutil.copy(images[0], folder / images[0].name)
    shutil.copy(images[1], folder / f"{images[1].stem}_downsampled.jpg")  # ISIC 2019 ships some so
    Image.open(images[2]).save(folder / f"{images[2].stem}.png")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(
        ISIC_HEADER + "".join(_onehot_row(p.stem, cls) for p, cls in zip(images, ["NV", "MEL", "SCC"], strict=True))
    )
    (tmp_path / "ISIC_2019_Training_Metadata.csv").write_text(
        f"image,age_approx,lesion_id\n{images[0].stem},50,L1\n{images[1].stem},40,L1\n{images[2].stem},30,\n"
    )
    records = ISIC2019Source(tmp_path).records()
    assert [ISIC2019.names[r.label] for r in records] == ["NV", "MEL", "SCC"]
    assert [r.group for r in records] == ["L1", "L1", None]
    assert Path(records[1].source).name.endswith("_downsampled.jpg")
    assert Path(records[2].source).suffix == ".png"


def test_isic2019_images_in_any_decodable_format(ham_root, tmp_path):
    """ISIC images converted to WebP or TIFF are found like the .jpg originals (one suffix list for every
    reader), and one folder holding the same id twice (x.jpg and x.png) is refused naming both files."""
    images = _real_images(ham_root, 2)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(images[0]).save(folder / f"{images[0].stem}.webp", lossless=True)
    Image.open(images[1]).save(folder / f"{images[1].stem}.TIFF")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(
        ISIC_HEADER + "".join(_onehot_row(p.stem, cls) for p, cls in zip(images, ["NV", "MEL"], strict=True))
    )
    records = ISIC2019Source(tmp_path).records()
    assert [Path(r.source).name for r in records] == [f"{images[0].stem}.webp", f"{images[1].stem}.TIFF"]
    assert [ISIC2019.names[r.label] for r in records] == ["NV", "MEL"]

    shutil.copy(images[0], folder / images[0].name)  # the same id as .jpg beside the .webp
    with pytest.raises(DataError, match=rf"two images named '{images[0].stem}'.*{images[0].stem}\.jpg and {images[0].stem}\.webp"):
        ISIC2019Source(tmp_path).records()


def test_csv_source(ham_root, tmp_path):
    images = _real_images(ham_root, 4)
    (tmp_path / "img" / "a").mkdir(parents=True)
    for p in images:
        shutil.copy(p, tmp_path / "img" / "a" / p.name)
    rows = ["path,label,group"] + [f"img/a/{p.name},{cls},{g}" for p, cls, g in zip(images, ["zeta", "alpha", "zeta", "alpha"], ["g1", "g1", "", "g2"], strict=True)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    source = build_source("csv", tmp_path / "list.csv")
    records = source.records()
    assert source.vocab.names == ("alpha", "zeta")  # sorted label names
    assert [r.label for r in records] == [1, 0, 1, 0]
    assert [r.group for r in records] == ["g1", "g1", None, "g2"]
    assert records[0].image_id == f"img/a/{images[0].stem}"
    fixed = CSVSource(tmp_path / "list.csv", class_names=["zeta", "alpha"])
    assert [r.label for r in fixed.records()] == [0, 1, 0, 1]


def test_image_folder_source(ham_root, tmp_path):
    images = _real_images(ham_root, 5)
    for i, p in enumerate(images):
        folder = tmp_path / ("nv" if i < 3 else "mel") / ("sub" if i == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / p.name)
    (tmp_path / "nv" / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / "nv" / ".hidden.jpg").write_bytes(b"ignored: hidden")
    source = ImageFolderSource(tmp_path)
    records = source.records()
    assert source.vocab.names == ("mel", "nv")
    assert source.vocab.counts([r.label for r in records]) == {"mel": 2, "nv": 3}
    assert f"nv/sub/{images[0].stem}" in {r.image_id for r in records}


def test_build_source_errors(tmp_path):
    with pytest.raises(DataError, match="unknown source 'nope'"):
        build_source("nope", tmp_path)
    with pytest.raises(DataError, match="labels"):
        build_source("isic2019", tmp_path, labels="dx")
    with pytest.raises(DataError, match="needs --root"):
        build_source("ham10000", None)


def test_build_source_synthetic():
    source = build_source("synthetic", "24")
    records = source.records()
    assert len(records) == 24
    assert source.open(records[0]).mode == "RGB"


# --------------------------------------------------------------------------- DermaMNIST


def _write_npz(path: Path, sizes=(6, 2, 3), shape=(28, 28, 3), labels=None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(-1, 1) if labels is None else labels[split]
    np.savez_compressed(path, **arrays)
    return path


def test_dermamnist_keeps_official_splits(tmp_path):
    npz = _write_npz(tmp_path / "dermamnist_224.npz")
    source = build_source("dermamnist", tmp_path)  # a folder with exactly one dermamnist*.npz
    records = source.records()
    assert source.vocab.names == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert [r.split for r in records] == ["train"] * 6 + ["val"] * 2 + ["test"] * 3
    assert records[8].source == f"{npz}#test/0"
    image = source.open(records[8])
    assert image.mode == "RGB" and image.size == (28, 28)
    expected = np.load(npz)["test_images"][0]
    assert np.array_equal(np.asarray(image), expected)


def test_dermamnist_grayscale_arrays(tmp_path):
    npz = _write_npz(tmp_path / "dermamnist.npz", shape=(28, 28))
    source = DermaMNISTSource(npz)
    assert source.open(source.records()[0]).mode == "RGB"


def test_dermamnist_missing_file_says_where_to_download(tmp_path):
    with pytest.raises(DataError, match=r"dermamnist\.npz.*zenodo\.org/records/10519652"):
        DermaMNISTSource(tmp_path / "dermamnist.npz").records()
    with pytest.raises(DataError, match="found none"):
        DermaMNISTSource(tmp_path).records()


def test_dermamnist_bad_files(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"text\.npz.*not a readable \.npz"):
        DermaMNISTSource(tmp_path / "text.npz").records()
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((1, 4, 4, 3), np.uint8), train_labels=np.zeros((1, 1)))
    with pytest.raises(DataError, match=r"missing array\(s\) 'val_images', 'val_labels'"):
        DermaMNISTSource(tmp_path / "partial.npz").records()
    labels = {"train": np.array([[0], [9]]), "val": np.array([[1]]), "test": np.array([[2]])}
    npz = _write_npz(tmp_path / "badlabel.npz", sizes=(2, 1, 1), labels=labels)
    with pytest.raises(DataError, match=r"train_labels\[1\].*label 9"):
        DermaMNISTSource(npz).records()
    skipping = DermaMNISTSource(npz, on_error="skip")
    assert len(skipping.records()) == 3 and "train_labels[1]" in skipping.problems[0].where


# --------------------------------------------------------------------------- bad CSV input


@pytest.fixture
def isic_dir(ham_root, tmp_path) -> Path:
    """An ISIC 2019 folder with 4 real images and a ground truth the tests append bad rows to."""
    for p in _real_images(ham_root, 4):
        (tmp_path / "images").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / "images" / p.name)
    return tmp_path


def _isic_rows(isic_dir: Path) -> list[str]:
    stems = sorted(p.stem for p in (isic_dir / "images").glob("*.jpg"))
    return [_onehot_row(stems[0], "NV"), _onehot_row(stems[1], "MEL"), _onehot_row(stems[2], "BKL")]


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (lambda stems: _onehot_row(stems[3], None, unk=1), "labelled UNK"),
        (lambda stems: _onehot_row(stems[3], None), "exactly one class.*none"),
        (lambda stems: _onehot_row(stems[3], "MEL").replace(",0.0", ",1.0", 1), "exactly one class.*MEL, NV"),
        (lambda stems: _onehot_row(stems[3], "NV").replace("1.0", "yes"), "column 'NV' holds 'yes'"),
        (lambda stems: _onehot_row(stems[0], "NV"), "duplicate image id .*first at row 2"),
        (lambda stems: _onehot_row("ISIC_9999999", "NV"), "image 'ISIC_9999999' not found"),
    ],
    ids=["unk", "no-class", "two-classes", "non-numeric", "duplicate", "missing-image"],
)
def test_isic_bad_rows_fail_naming_the_row_or_skip(isic_dir, bad_row, message):
    stems = sorted(p.stem for p in (isic_dir / "images").glob("*.jpg"))
    gt = isic_dir / "ISIC_2019_Training_GroundTruth.csv"
    gt.write_text(ISIC_HEADER + "".join(_isic_rows(isic_dir)) + bad_row(stems))
    with pytest.raises(DataError, match=rf"ISIC_2019_Training_GroundTruth\.csv row 5: .*{message}"):
        ISIC2019Source(isic_dir).records()
    source = ISIC2019Source(isic_dir, on_error="skip")
    assert len(source.records()) == 3
    assert len(source.problems) == 1 and source.problems[0].where.endswith("row 5")


def test_csv_structure_errors_name_file_and_column(isic_dir):
    gt = isic_dir / "ISIC_2019_Training_GroundTruth.csv"
    gt.write_text("image,MEL,NV\nISIC_1,1,0\n")
    with pytest.raises(CSVError, match=r"GroundTruth\.csv: missing column\(s\) 'BCC', 'AK'"):
        ISIC2019Source(isic_dir, on_error="skip").records()
    gt.write_text("")
    with pytest.raises(CSVError, match=r"GroundTruth\.csv: empty"):
        ISIC2019Source(isic_dir).records()
    gt.unlink()
    with pytest.raises(DataError, match=r"GroundTruth\.csv: ISIC 2019 ground truth not found"):
        ISIC2019Source(isic_dir).records()
    gt.write_text(ISIC_HEADER + "".join(_isic_rows(isic_dir)))
    (isic_dir / "ISIC_2019_Training_Metadata.csv").write_text("image,age\nx,3\n")
    with pytest.raises(CSVError, match=r"Metadata\.csv: missing column\(s\) 'lesion_id'"):
        ISIC2019Source(isic_dir).records()


def test_ham_bad_rows(ham_root, tmp_path):
    images = _real_images(ham_root, 3)
    (tmp_path / "images").mkdir()
    for p in images:
        shutil.copy(p, tmp_path / "images" / p.name)
    good = [f"L{i},{p.stem},nv,histo,50,male,back" for i, p in enumerate(images)]
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization"
    cases = {
        "unknown dx 'cancer'": f"L9,{images[0].stem}x,cancer,histo,50,male,back",
        "duplicate image id": f"L9,{images[0].stem},nv,histo,50,male,back",
        "image 'ISIC_7777777' not found": "L9,ISIC_7777777,nv,histo,50,male,back",
    }
    for message, bad in cases.items():
        (tmp_path / "HAM10000_metadata.csv").write_text("\n".join([header, *good, bad]) + "\n")
        with pytest.raises(DataError, match=rf"HAM10000_metadata\.csv row 5: .*{message}"):
            HAM10000Source(tmp_path).records()
        skipping = HAM10000Source(tmp_path, on_error="skip")
        assert len(skipping.records()) == 3 and len(skipping.problems) == 1
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id\nL1,x\n")
    with pytest.raises(CSVError, match=r"HAM10000_metadata\.csv: missing column\(s\) 'dx'"):
        HAM10000Source(tmp_path).records()


def test_generic_csv_bad_rows(ham_root, tmp_path):
    image = _real_images(ham_root, 1)[0]
    shutil.copy(image, tmp_path / "a.jpg")
    shutil.copy(image, tmp_path / "b.jpg")
    cases = {
        "unknown label 'other'": "b.jpg,other",
        "duplicate image id 'a'": "a.jpg,x",
        "image file .*missing.jpg.* not found": "missing.jpg,x",
        "empty 'label' value": "b.jpg,",
    }
    for message, bad in cases.items():
        (tmp_path / "list.csv").write_text(f"path,label\na.jpg,x\n{bad}\n")
        with pytest.raises(DataError, match=rf"list\.csv row 3: {message}"):
            CSVSource(tmp_path / "list.csv", class_names=["x", "y"]).records()
    (tmp_path / "list.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(CSVError, match=r"missing column\(s\) 'path'"):
        CSVSource(tmp_path / "list.csv").records()
    for extra_fields in ("path,label\na.jpg,x,oops\n", "path,label\na.jpg,x\nb.jpg,y,oops\n"):
        (tmp_path / "list.csv").write_text(extra_fields)
        with pytest.raises(CSVError, match=r"list\.csv: unreadable image list"):
            CSVSource(tmp_path / "list.csv").records()


def test_image_folder_problems(ham_root, tmp_path):
    shutil.copytree(ham_root / "images", tmp_path / "nv", ignore=lambda d, names: sorted(names)[2:])
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class: class folder has no images"):
        ImageFolderSource(tmp_path).records()
    source = ImageFolderSource(tmp_path, on_error="skip")
    assert len(source.records()) == 2 and source.vocab.names == ("nv",)
    with pytest.raises(DataError, match="mel: class folder not found"):
        ImageFolderSource(tmp_path, class_names=["mel", "nv", "empty_class"]).records()
