"""Every ISIC challenge layout, split-folder trees, and the guards against degenerate datasets.

Each layout is rebuilt in tmp_path from the real HAM10000 / ISIC 2019 images, with the CSVs written in
the exact column layout the challenge ships; the tests check labels, groups, splits and metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skindistil.data.prepare import load_manifest, prepare_dataset
from skindistil.data.sources import build_source, detect_source
from skindistil.data.vocab import BINARY, ISIC2017, ISIC2018, ISIC2019
from skindistil.errors import ConfigError, CSVError, DataError

DX_TO_2018 = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AKIEC", "bkl": "BKL", "df": "DF", "vasc": "VASC"}


@pytest.fixture(scope="module")
def ham_meta(ham_root) -> pd.DataFrame:
    """HAM10000 metadata rows whose image is in the shared folder, indexed by image_id."""
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    present = {p.stem for p in (ham_root / "images").glob("*.jpg")}
    return meta[meta["image_id"].isin(present)].set_index("image_id")


def _pick(ham_meta: pd.DataFrame, per_class: dict[str, int]) -> pd.DataFrame:
    """The first images of each dx, lesions with several images first (so groups are tested)."""
    sizes = ham_meta.groupby("lesion_id")["dx"].transform("size")
    ordered = ham_meta.assign(size=sizes).sort_values(["size", "lesion_id"], ascending=[False, True], kind="stable")
    return pd.concat([ordered[ordered["dx"] == dx].head(n) for dx, n in per_class.items()])


def _copy(ham_root: Path, images, folder: Path, names=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        shutil.copy(ham_root / "images" / f"{image}.jpg", folder / f"{(names or images)[i]}.jpg")


# --------------------------------------------------------------------------- ISIC 2018 task 3


def _isic2018(ham_root, ham_meta, root: Path, groupings: bool = True) -> pd.DataFrame:
    chosen = _pick(ham_meta, dict.fromkeys(DX_TO_2018, 3))
    gt_dir = root / "ISIC2018_Task3_Training_GroundTruth"  # where the official zip unpacks it
    gt_dir.mkdir(parents=True)
    onehot = pd.DataFrame({"image": chosen.index})
    for dx, column in DX_TO_2018.items():
        onehot[column] = (chosen["dx"].to_numpy() == dx).astype(float)
    onehot.to_csv(gt_dir / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    if groupings:
        pd.DataFrame({"image": chosen.index, "lesion_id": chosen["lesion_id"].to_numpy(),
                      "diagnosis_confirm_type": chosen["dx_type"].to_numpy()}).to_csv(
            root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    _copy(ham_root, list(chosen.index), root / "ISIC2018_Task3_Training_Input")
    return chosen


def test_isic2018_task3_classes_checked_against_isic2019(ham_root, ham_meta, tmp_path):
    chosen = _isic2018(ham_root, ham_meta, tmp_path)
    assert detect_source(tmp_path) == "isic2018"
    source = build_source("isic2018", tmp_path)
    records = source.records()
    assert source.vocab == ISIC2018 and source.vocab.names == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert len(records) == 21 and {source.vocab.names[r.label] for r in records} == set(ISIC2018.names)
    assert all(r.group == chosen.loc[r.image_id, "lesion_id"] for r in records)
    # ISIC 2019's ground truth of the same images: every class keeps its name there except AKIEC,
    # which ISIC 2019 split into AK and SCC, so renaming it AK would mislabel most of it
    isic2019 = pd.read_csv(ham_root / "ISIC_2019_Training_GroundTruth.csv").set_index("image")[list(ISIC2019.names)]
    isic_label = isic2019.idxmax(axis=1)
    for record in records:
        name = source.vocab.names[record.label]
        assert isic_label[record.image_id] == name or (name == "AKIEC" and isic_label[record.image_id] in ("AK", "SCC"))
    every_akiec = isic_label[ham_meta.index[ham_meta["dx"] == "akiec"]].value_counts().to_dict()
    assert every_akiec == {"SCC": 137, "AK": 91}
    assert any("AKIEC" in note and "AK or SCC" in note for note in source.notes)

    out = tmp_path / "prepared"
    prepare_dataset(source, out, short_side=32, workers=0, progress=False)
    manifest, info = load_manifest(out)
    assert info["classes"] == list(ISIC2018.names) and info["source"] == "isic2018"
    assert any("AKIEC" in note for note in info["notes"])
    assert (manifest["lesion_id"] == manifest["group"]).all()
    assert manifest.groupby("group")["split"].nunique().max() == 1  # no lesion on two sides
    akiec = set(chosen.index[chosen["dx"] == "akiec"])
    assert set(manifest.loc[manifest["class_name"] == "AKIEC", "image_id"]) == akiec


def test_isic2018_without_lesion_groupings_says_splits_can_leak(ham_root, ham_meta, tmp_path):
    _isic2018(ham_root, ham_meta, tmp_path, groupings=False)
    source = build_source("isic2018", tmp_path)
    records = source.records()
    assert all(r.group is None for r in records)
    assert any("LesionGroupings" in note and "both sides" in note for note in source.notes)


# --------------------------------------------------------------------------- ISIC 2017 / 2016 part 3


def test_isic2017_part3_classes_and_metadata(ham_root, ham_meta, tmp_path):
    chosen = _pick(ham_meta, {"mel": 3, "nv": 4, "bkl": 3})
    data = tmp_path / "ISIC-2017_Training_Data"
    _copy(ham_root, list(chosen.index), data)
    # the training zip also holds superpixel maps: never images of a lesion
    shutil.copy(ham_root / "images" / f"{chosen.index[0]}.jpg", data / f"{chosen.index[0]}_superpixels.png")
    pd.DataFrame({"image_id": chosen.index, "melanoma": (chosen["dx"] == "mel").astype(float).to_numpy(),
                  "seborrheic_keratosis": (chosen["dx"] == "bkl").astype(float).to_numpy()}).to_csv(
        tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv", index=False)
    pd.DataFrame({"image_id": chosen.index, "age_approximate": chosen["age"].to_numpy(),
                  "sex": chosen["sex"].to_numpy()}).to_csv(data / "ISIC-2017_Training_Data_metadata.csv", index=False)
    assert detect_source(tmp_path) == "isic2017"
    source = build_source("isic2017", tmp_path)
    records = source.records()
    assert source.vocab == ISIC2017
    expected = {"mel": "MEL", "nv": "NV", "bkl": "BKL"}
    assert {r.image_id: source.vocab.names[r.label] for r in records} == {
        i: expected[d] for i, d in chosen["dx"].items()}
    assert all(r.source.endswith(".jpg") for r in records)
    first = next(r for r in records if r.image_id == chosen.index[0])
    assert first.meta["sex"] == chosen["sex"].iloc[0] and first.meta["age"] == str(int(float(chosen["age"].iloc[0])))
    assert any("BKL" in note for note in source.notes)

    both = tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv"
    both.write_text(both.read_text() + f"{chosen.index[1]}x,1.0,1.0\n")
    with pytest.raises(CSVError, match=r"row 12: .*at most one class set to 1 \(set: melanoma, seborrheic_keratosis\)"):
        build_source("isic2017", tmp_path).records()


def test_isic2016_part3_headerless_benign_malignant_and_01(uda_root, tmp_path):
    truth = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv")
    rows = pd.concat([truth[truth["MEL"] == 1].head(3), truth[truth["NV"] == 1].head(4)])
    data = tmp_path / "ISBI2016_ISIC_Part3_Training_Data"
    data.mkdir()
    for image in rows["image"]:
        (data / f"{image}.jpg").symlink_to(uda_root / "images" / f"{image}.jpg")
    verdict = np.where(rows["MEL"] == 1, "malignant", "benign")
    lines = "".join(f"{i},{v}\n" for i, v in zip(rows["image"], verdict, strict=True))
    (tmp_path / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv").write_text(lines)
    assert detect_source(tmp_path) == "isic2016"
    source = build_source("isic2016", tmp_path)
    labels = {r.image_id: source.vocab.names[r.label] for r in source.records()}
    assert source.vocab == BINARY and labels == dict(zip(rows["image"], verdict, strict=True))
    # the test ground truth writes 0.0/1.0
    test_gt = tmp_path / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv"
    test_gt.write_text("".join(f"{i},{float(m)}\n" for i, m in zip(rows["image"], rows["MEL"], strict=True)))
    source = build_source("isic2016", tmp_path, ground_truth=test_gt)
    assert {r.image_id: source.vocab.names[r.label] for r in source.records()} == labels
    test_gt.write_text(test_gt.read_text() + "ISIC_0999999,maybe\n")
    with pytest.raises(CSVError, match=r"Test_GroundTruth.csv row 8: .*'maybe' is not benign/malignant"):
        build_source("isic2016", tmp_path, ground_truth=test_gt).records()


# --------------------------------------------------------------------------- SIIM-ISIC 2020


ISIC2020_COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
                    "benign_malignant", "target"]


def _isic2020(ham_root, ham_meta, root: Path, csv_name: str = "train.csv", folder: str = "train") -> pd.DataFrame:
    chosen = _pick(ham_meta, {"mel": 8, "nv": 12, "bkl": 4})
    diagnosis = {"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic keratosis"}
    frame = pd.DataFrame({
        "image_name": chosen.index,
        "patient_id": [f"IP_{i % 6:07d}" for i in range(len(chosen))],  # 6 patients with 4 images each
        "sex": chosen["sex"].to_numpy(),
        "age_approx": chosen["age"].to_numpy(),
        "anatom_site_general_challenge": chosen["localization"].to_numpy(),
        "diagnosis": [diagnosis[d] if i % 5 else "unknown" for i, d in enumerate(chosen["dx"])],
        "benign_malignant": np.where(chosen["dx"] == "mel", "malignant", "benign"),
        "target": (chosen["dx"] == "mel").astype(int).to_numpy(),
    }, columns=ISIC2020_COLUMNS)
    frame.to_csv(root / csv_name, index=False)
    _copy(ham_root, list(chosen.index), root / folder)
    return frame


def test_isic2020_binary_target_grouped_by_patient_with_metadata(ham_root, ham_meta, tmp_path):
    frame = _isic2020(ham_root, ham_meta, tmp_path)
    assert detect_source(tmp_path) == "isic2020"
    out = tmp_path / "prepared"
    prepare_dataset(build_source("isic2020", tmp_path), out, short_side=32, workers=0, progress=False)
    manifest, info = load_manifest(out)
    assert info["classes"] == ["benign", "malignant"]
    truth = frame.set_index("image_name")
    assert (manifest["class_name"] == truth.loc[manifest["image_id"], "benign_malignant"].to_numpy()).all()
    assert (manifest["group"] == truth.loc[manifest["image_id"], "patient_id"].to_numpy()).all()
    assert (manifest["patient_id"] == manifest["group"]).all()
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1  # no patient on two sides
    assert (manifest["site"] == truth.loc[manifest["image_id"], "anatom_site_general_challenge"]
            .replace("unknown", "").to_numpy()).all()
    assert set(manifest["sex"]) <= {"male", "female", ""} and manifest["age"].str.fullmatch(r"\d+|").all()


def test_isic2020_diagnosis_labels_leave_unknown_out(ham_root, ham_meta, tmp_path):
    frame = _isic2020(ham_root, ham_meta, tmp_path, "ISIC_2020_Training_GroundTruth_v2.csv",
                      "ISIC_2020_Training_JPEG/train")
    assert detect_source(tmp_path) == "isic2020"
    source = build_source("isic2020", tmp_path, labels="diagnosis")
    records = source.records()
    known = frame[frame["diagnosis"] != "unknown"]
    assert source.vocab.names == ("melanoma", "nevus", "seborrheic keratosis")
    assert {r.image_id: source.vocab.names[r.label] for r in records} == dict(
        zip(known["image_name"], known["diagnosis"], strict=True))
    assert any(f"{len(frame) - len(known)} image(s) with diagnosis 'unknown'" in note for note in source.notes)
    with pytest.raises(DataError, match="isic2020 takes target or diagnosis"):
        build_source("isic2020", tmp_path, labels="dx")


def test_isic2020_contradicting_target_names_the_row(ham_root, ham_meta, tmp_path):
    frame = _isic2020(ham_root, ham_meta, tmp_path)
    frame.loc[3, "target"] = 1 - frame.loc[3, "target"]
    frame.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(CSVError, match=r"train\.csv row 5: image .*contradicts benign_malignant"):
        build_source("isic2020", tmp_path).records()
    source = build_source("isic2020", tmp_path, on_error="skip")
    assert len(source.records()) == len(frame) - 1 and len(source.problems) == 1


# --------------------------------------------------------------------------- ISIC 2024 SLICE-3D


def _isic2024(ham_root, ham_meta, root: Path, *, hdf5: bool, folder: bool) -> pd.DataFrame:
    chosen = _pick(ham_meta, {"mel": 6, "nv": 10})
    names = [f"ISIC_{9000000 + i:07d}" for i in range(len(chosen))]  # SLICE-3D ids, renamed real images
    frame = pd.DataFrame({
        "isic_id": names, "target": (chosen["dx"] == "mel").astype(int).to_numpy(),
        "patient_id": [f"IP_{i % 4:07d}" for i in range(len(chosen))], "age_approx": chosen["age"].to_numpy(),
        "sex": chosen["sex"].to_numpy(), "anatom_site_general": chosen["localization"].to_numpy(),
        "clin_size_long_diam_mm": 3.0, "image_type": "TBP tile: close-up", "lesion_id": "",
        "iddx_full": np.where(chosen["dx"] == "mel", "Malignant::Melanoma", "Benign"),
    })
    frame.to_csv(root / "train-metadata.csv", index=False)
    if folder:
        _copy(ham_root, list(chosen.index), root / "train-image" / "image", names)
    if hdf5:
        import h5py

        with h5py.File(root / "train-image.hdf5", "w") as f:
            for name, image in zip(names, chosen.index, strict=True):
                f.create_dataset(name, data=np.void((ham_root / "images" / f"{image}.jpg").read_bytes()))
    return frame.assign(original=chosen.index.to_numpy())


@pytest.mark.parametrize("layout", ["hdf5", "jpeg"])
def test_isic2024_hdf5_or_jpeg_folder(ham_root, ham_meta, tmp_path, layout):
    from skindistil.data.imageio import read_image

    frame = _isic2024(ham_root, ham_meta, tmp_path, hdf5=layout == "hdf5", folder=layout == "jpeg")
    assert detect_source(tmp_path) == "isic2024"
    source = build_source("isic2024", tmp_path)
    records = source.records()
    assert source.vocab == BINARY and len(records) == len(frame)
    assert all(("#" in r.source) == (layout == "hdf5") for r in records)
    truth = frame.set_index("isic_id")
    record = records[0]
    decoded = np.asarray(source.open(record))
    reference = np.asarray(read_image(ham_root / "images" / f"{truth.loc[record.image_id, 'original']}.jpg"))
    assert np.array_equal(decoded, reference)
    out = tmp_path / "prepared"
    prepare_dataset(source, out, short_side=32, workers=2 if layout == "hdf5" else 0, progress=False)
    manifest, info = load_manifest(out)
    assert info["classes"] == ["benign", "malignant"]
    assert (manifest["label"] == truth.loc[manifest["image_id"], "target"].to_numpy()).all()
    assert (manifest["group"] == truth.loc[manifest["image_id"], "patient_id"].to_numpy()).all()
    assert manifest.groupby("group")["split"].nunique().max() == 1
    assert (manifest["site"] != "").any() and (manifest["lesion_id"] == "").all()


def test_isic2024_missing_hdf5_entry_names_the_row(ham_root, ham_meta, tmp_path):
    frame = _isic2024(ham_root, ham_meta, tmp_path, hdf5=True, folder=False)
    with pytest.raises(DataError, match=r"train-metadata\.csv row 2: image 'ISIC_9000000' not in .*train-image\.hdf5"):
        import h5py

        with h5py.File(tmp_path / "train-image.hdf5", "a") as f:
            del f[frame["isic_id"][0]]
        build_source("isic2024", tmp_path).records()


# --------------------------------------------------------------------------- split-folder trees


def _tree(ham_root, ham_meta, root: Path, layout: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """root/<split>/<class>/ with real images; returns split -> image ids (relative paths)."""
    ids: dict[str, list[str]] = {}
    used: set[str] = set()
    for split, classes in layout.items():
        for dx, n in classes.items():
            pool = [i for i in ham_meta.index[ham_meta["dx"] == dx] if i not in used][:n]
            used.update(pool)
            _copy(ham_root, pool, root / split / dx)
            ids.setdefault(split, []).extend(f"{split}/{dx}/{i}" for i in pool)
    return ids


def test_split_folders_are_splits_never_classes(ham_root, ham_meta, tmp_path):
    ids = _tree(ham_root, ham_meta, tmp_path / "tree", {"Train": {"mel": 10, "nv": 14}, "Test": {"mel": 3, "nv": 4}})
    assert detect_source(tmp_path / "tree") == "folder"
    source = build_source("folder", tmp_path / "tree")
    assert source.vocab.names == ("mel", "nv")
    out = tmp_path / "prepared"
    prepare_dataset(source, out, short_side=32, workers=0, progress=False)
    manifest, info = load_manifest(out)
    assert info["classes"] == ["mel", "nv"] and info["splits"]["predefined"] is True
    assert info["splits"]["drawn_from_train"] == ["val"]
    assert sorted(manifest.loc[manifest["split"] == "test", "image_id"]) == sorted(ids["Test"])
    from_train = manifest[manifest["image_id"].isin(ids["Train"])]
    assert set(from_train["split"]) == {"train", "val"} and (from_train["split"] == "val").sum() >= 2
    assert (manifest["class_name"] == manifest["image_id"].str.split("/").str[1]).all()


def test_split_folder_tree_errors(ham_root, ham_meta, tmp_path):
    _tree(ham_root, ham_meta, tmp_path, {"train": {"mel": 2, "nv": 2}, "mel": {"bkl": 1}})
    with pytest.raises(DataError, match=r"mixes split folders \(train\) with other folders holding images \(mel\)"):
        build_source("folder", tmp_path).records()
    shutil.rmtree(tmp_path / "mel")
    _copy(ham_root, list(ham_meta.index[:2]), tmp_path / "valid" / "mel")
    _copy(ham_root, list(ham_meta.index[2:3]), tmp_path / "val" / "mel")
    with pytest.raises(DataError, match="folders val and valid name the same split"):
        build_source("folder", tmp_path).records()
    # SIIM-ISIC 2020's train/ of JPEGs without its train.csv: no class folders to read
    loose = tmp_path / "siim"
    _copy(ham_root, list(ham_meta.index[:3]), loose / "train")
    with pytest.raises(DataError, match=r"siim/train: 3 image\(s\) lie directly here, outside any class folder"):
        build_source("folder", loose).records()


# --------------------------------------------------------------------------- detection


def test_detect_every_layout_and_refuse_the_rest(ham_root, uda_root, ham_meta, tmp_path):
    from skindistil.experiments.pipeline import detect_source as detect_data

    assert detect_source(ham_root) == "ham10000" and detect_source(uda_root) == "isic2019"
    not_2020 = tmp_path / "other"
    not_2020.mkdir()
    (not_2020 / "train.csv").write_text("path,label\na.jpg,x\n")  # a train.csv of another layout
    assert detect_source(not_2020 / "train.csv") == "csv"
    with pytest.raises(ConfigError, match="not a prepared dataset .*ISIC 2016/2017/2018"):
        detect_data(not_2020)
    with pytest.raises(ConfigError, match="nowhere: not found"):
        detect_data(tmp_path / "nowhere")


# --------------------------------------------------------------------------- metadata of the other sources


def test_ham_and_isic2019_manifests_keep_age_sex_site(ham_root, uda_root, tmp_path):
    prepare_dataset(build_source("isic2019", uda_root), tmp_path / "uda", short_side=32, limit=12, workers=2,
                    progress=False)
    manifest, _ = load_manifest(tmp_path / "uda")
    meta = pd.read_csv(uda_root / "ISIC_2019_Training_Metadata.csv", dtype=str, keep_default_na=False).set_index("image")
    rows = meta.loc[manifest["image_id"]]
    assert (manifest["site"] == rows["anatom_site_general"].to_numpy()).all()
    assert (manifest["sex"] == rows["sex"].to_numpy()).all()
    assert (manifest["age"] == rows["age_approx"].map(lambda a: str(int(float(a))) if a else "").to_numpy()).all()

    source = build_source("ham10000", ham_root)
    record = next(r for r in source.records() if r.meta["localization"] != "unknown")
    assert record.meta["site"] == record.meta["localization"] and record.meta["lesion_id"] == record.group


# --------------------------------------------------------------------------- guards


def test_check_trainable():
    from skindistil.data.splits import check_trainable

    check_trainable({"mel": 3, "nv": 5}, "data")
    with pytest.raises(DataError, match="data: only 1 class \\(train\\)"):
        check_trainable({"train": 40}, "data")
    with pytest.raises(DataError, match="holds images of 1 class\\(es\\) only \\(nv\\)"):
        check_trainable({"mel": 0, "nv": 5}, "data")
    with pytest.raises(DataError, match="has no image of class\\(es\\) df: "):
        check_trainable({"df": 0, "mel": 3, "nv": 5}, "data")


def test_one_class_tree_and_missing_train_class_refused_before_training(ham_root, ham_meta, tmp_path):
    from conftest import tiny_train_config
    from skindistil.training.teacher import train_classifier

    one = tmp_path / "one"
    _copy(ham_root, list(ham_meta.index[:12]), one / "train")  # the old reading: class "train"
    (one / "train" / "lesions").mkdir()
    for p in sorted((one / "train").glob("*.jpg")):
        p.rename(one / "train" / "lesions" / p.name)
    prepared = tmp_path / "one-prepared"
    result = prepare_dataset(build_source("folder", one), prepared, short_side=32, workers=0, progress=False)
    assert any("only 1 class(es) with images (lesions)" in note for note in result.notes)
    with pytest.raises(DataError, match="only 1 class \\(lesions\\)"):
        train_classifier(tiny_train_config(prepared, tmp_path / "runs"))
    assert not (tmp_path / "runs" / "teacher" / "checkpoints").exists()

    tree = tmp_path / "tree"
    _tree(ham_root, ham_meta, tree, {"train": {"mel": 8, "nv": 8}, "test": {"mel": 2, "nv": 2, "df": 3}})
    prepared = tmp_path / "tree-prepared"
    result = prepare_dataset(build_source("folder", tree), prepared, short_side=32, workers=0, progress=False)
    assert any(note.startswith("train has no image of class(es) df") for note in result.notes)
    assert any(note.startswith("val has no image of class(es) df") for note in result.notes)
    with pytest.raises(DataError, match="train split has no image of class\\(es\\) df"):
        train_classifier(tiny_train_config(prepared, tmp_path / "runs2"))
    assert not (tmp_path / "runs2" / "teacher" / "checkpoints").exists()


def test_resume_on_other_classes_is_refused():
    from skindistil.training.trainer import CLASSES_KEY, check_resume_classes

    check_resume_classes({CLASSES_KEY: ["mel", "nv"]}, ["mel", "nv"], "last.ckpt")
    check_resume_classes({}, ["mel", "nv"], "last.ckpt")  # written before classes were recorded
    with pytest.raises(ConfigError, match=r"last\.ckpt: checkpoint was trained on classes \['nv', 'mel'\]"):
        check_resume_classes({CLASSES_KEY: ["nv", "mel"]}, ["mel", "nv"], "last.ckpt")


def _tiny_model(out: Path, classes: list[str]) -> Path:
    import torch

    from skindistil.config import PreprocessConfig
    from skindistil.models import create_teacher, save_artifact

    torch.manual_seed(0)
    model = create_teacher("vit_base_patch16_224", num_classes=len(classes), embed_dim=32, depth=2, num_heads=2,
                           patch_size=8, img_size=32)
    return save_artifact(model, out / "model", classes=classes, preprocess=PreprocessConfig(image_size=32),
                         extra={"role": "teacher"})


def test_evaluate_refuses_other_classes_and_labels_an_incomplete_split(ham_root, ham_meta, tmp_path):
    from skindistil.evaluation.evaluate import evaluate_model

    tree = tmp_path / "tree"
    _tree(ham_root, ham_meta, tree, {"train": {"mel": 6, "nv": 6}, "test": {"nv": 5}})
    data = tmp_path / "prepared"
    prepare_dataset(build_source("folder", tree), data, short_side=32, workers=0, progress=False)

    other = _tiny_model(tmp_path / "isic", list(ISIC2019.names))
    with pytest.raises(DataError, match=r"dataset classes \['mel', 'nv'\] differ from the model's \['MEL'"):
        evaluate_model(other, data, "test", progress=False, num_workers=0)
    assert not (tmp_path / "isic" / "eval").exists()

    model = _tiny_model(tmp_path / "run", ["mel", "nv"])
    metrics = evaluate_model(model, data, "test", progress=False, num_workers=0)
    assert metrics["complete"] is False and metrics["absent_classes"] == ["mel"]
    written = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert written["complete"] is False and written["absent_classes"] == ["mel"]
    report = (tmp_path / "run" / "eval" / "test" / "report.md").read_text()
    assert "**INCOMPLETE: no truth samples of mel." in report
    assert "| balanced_accuracy (1 of 2 classes) |" in report
    artifact = json.loads((model / "metrics.json").read_text())["test"]
    assert "balanced_accuracy" not in artifact and artifact["classes_absent"] == 1
    assert artifact["balanced_accuracy_incomplete"] == pytest.approx(metrics["headline"]["balanced_accuracy"])
    assert "test.balanced_accuracy_incomplete" in (model / "model_card.md").read_text()


def test_run_data_on_a_one_class_tree_stops_before_training(ham_root, ham_meta, tmp_path):
    from skindistil.commands.run import recipe_path
    from skindistil.config import RunConfig, apply_overrides, load_yaml
    from skindistil.experiments.pipeline import Pipeline
    from skindistil.experiments.pipeline import detect_source as detect_data

    tree = tmp_path / "benign-only"
    _copy(ham_root, list(ham_meta.index[ham_meta["dx"] == "nv"][:8]), tree / "train" / "nv")
    _copy(ham_root, list(ham_meta.index[ham_meta["dx"] == "nv"][8:11]), tree / "test" / "nv")
    kind, root = detect_data(tree)
    assert kind == "folder"
    data = load_yaml(recipe_path("quickstart"))
    data["data"].update({"source": kind, "root": root, "options": {}, "workers": 0})
    cfg = RunConfig.from_dict(apply_overrides({**data, "name": "one", "out_dir": str(tmp_path / "runs")}, []))
    pipeline = Pipeline(cfg, progress=False)
    data_dir = pipeline.prepare()
    assert json.loads((data_dir / "dataset.json").read_text())["classes"] == ["nv"]
    with pytest.raises(DataError, match="only 1 class \\(nv\\)"):
        pipeline.train_teacher(data_dir)
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and not list((tmp_path / "runs").rglob("model.safetensors"))
