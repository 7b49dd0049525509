"""Duplicates never straddle a split: exact and near copies of real HAM10000 / ISIC images.

Every dataset here is built from the real images in ../shared/data: copied under new ISIC ids
(byte-identical), re-encoded, resized, cropped, converted to PNG, re-laid out as HAM10000, ISIC 2019
and DermaMNIST ship them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skindistil import cli
from skindistil.data import duplicates as dups
from skindistil.data.prepare import duplicates_between, load_manifest, prepare_dataset
from skindistil.data.sources import build_source
from skindistil.errors import DataError

OPTIONS = {"short_side": 32, "workers": 0, "progress": False}


def _jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def _half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


# Copies a user meets: the same photograph re-encoded, resized, cropped (the cases the hash must match).
COPIES = {
    "jpeg70": _jpeg,
    "half+jpeg70": lambda im: _jpeg(_half(im)),
    "x3": lambda im: im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC),
    "crop5-corner": lambda im: _crop(im, 0, 0, 0.05, 0.05),
    "crop5-centre": lambda im: _crop(im, 0.025, 0.025, 0.025, 0.025),
    "crop5-left": lambda im: _crop(im, 0.05, 0, 0, 0),
    "crop3-random+jpeg": lambda im: _jpeg(_crop(im, 0.01, 0.02, 0.02, 0.005)),
}


@pytest.fixture(scope="module")
def ham_meta(ham_root) -> pd.DataFrame:
    return pd.read_csv(ham_root / "HAM10000_metadata.csv")


def _one_per_lesion(meta: pd.DataFrame, per_class: dict[str, int]) -> pd.DataFrame:
    """The first image of the first lesions of each class (distinct lesions, deterministic)."""
    firsts = meta.drop_duplicates("lesion_id")
    return pd.concat([firsts[firsts["dx"] == dx].head(n) for dx, n in per_class.items()], ignore_index=True)


# --------------------------------------------------------------------------- the hash itself


def test_copies_of_real_images_match_and_other_lesions_do_not(ham_root, ham_meta):
    chosen = _one_per_lesion(ham_meta, {"nv": 12, "mel": 6, "bkl": 6, "bcc": 6})
    images = [Image.open(ham_root / "images" / f"{i}.jpg").convert("RGB") for i in chosen["image_id"]]
    bits = dups.hash_bits([dups.perceptual_hash(im) for im in images])
    assert bits.shape == (30, 16, 256)
    for name, copy in COPIES.items():
        for k, image in enumerate(images[:10]):
            copied = dups.hash_bits([dups.perceptual_hash(copy(image))])[0]
            distance = dups.image_distance(copied, bits[k])
            assert distance <= dups.DEFAULT_THRESHOLD, (name, chosen["image_id"][k], distance)
    # PNG of the same pixels: other bytes, identical hash.
    png = io.BytesIO()
    images[0].save(png, "PNG")
    assert dups.perceptual_hash(Image.open(png)) == dups.perceptual_hash(images[0])
    # 30 different lesions: no pair within the threshold.
    distances = [dups.image_distance(bits[a], bits[b]) for a in range(30) for b in range(a + 1, 30)]
    assert min(distances) > dups.DEFAULT_THRESHOLD


def test_hash_bits_rejects_bad_hashes():
    good = "0" * dups.HASH_CHARS
    with pytest.raises(DataError, match=r"manifest\.csv: row 3: perceptual hash is not 1024 hex"):
        dups.hash_bits([good, "abc"], "manifest.csv")
    with pytest.raises(DataError, match="not hexadecimal"):
        dups.hash_bits(["z" * dups.HASH_CHARS])


def test_merged_groups_join_every_lesion_a_cluster_touches():
    groups = ["L2", "L2", None, "L1", None, "L3"]
    ids = ["a", "b", "c", "d", "e", "f"]
    # b~c and c~d: lesions L2 and L1 and the ungrouped c become one group named after L1.
    assert dups.merged_groups(groups, ids, [[1, 2, 3]]) == ["L1", "L1", "L1", "L1", None, "L3"]
    # a cluster inside one lesion keeps its name; ungrouped duplicates get a name of their own
    assert dups.merged_groups(groups, ids, [[0, 1], [2, 4]]) == ["L2", "L2", "duplicates:c", "L1", "duplicates:c", "L3"]
    assert dups.merged_groups(groups, ids, []) == groups
    # in the report: only clusters beyond one known lesion change splits
    same_lesion = dups.ClusterInfo(images=["a", "b"], classes=["nv", "nv"], lesions=["L2", "L2"], links=[])
    assert not same_lesion.joins_lesions
    assert dups.ClusterInfo(images=["b", "c"], classes=["nv", "nv"], lesions=["L2", None], links=[]).joins_lesions


# --------------------------------------------------------------------------- prepare on a HAM10000 layout


def _write(image: Image.Image, path: Path) -> None:
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


@pytest.fixture(scope="module")
def ham_dups(ham_root, ham_meta, tmp_path_factory) -> dict:
    """HAM10000 layout: 40 real images of 40 lesions, then duplicates under new ISIC and lesion ids.

    - 6 byte-identical copies (the issue's case), one with another class spelled the same way;
    - 3 re-encoded + halved, 2 cropped copies;
    - a copy of ISIC image X filed under lesion L of another image Y: X's lesion, L and Y must
      share a split.
    """
    root = tmp_path_factory.mktemp("ham_dups")
    (root / "images").mkdir()
    base = _one_per_lesion(ham_meta, {"nv": 20, "mel": 8, "bkl": 6, "bcc": 6})
    # a second image of one of these lesions, so that the merge below has a lesion of two images
    partner_lesion = ham_meta["lesion_id"].value_counts().loc[lambda c: c == 2].index
    partner_lesion = next(lesion for lesion in partner_lesion if lesion in set(base["lesion_id"]))
    second = ham_meta[(ham_meta["lesion_id"] == partner_lesion) & ~ham_meta["image_id"].isin(base["image_id"])]
    rows = pd.concat([base, second], ignore_index=True)
    for image in rows["image_id"]:
        shutil.copy(ham_root / "images" / f"{image}.jpg", root / "images" / f"{image}.jpg")
    expected = []  # (original, copy, kind)
    extra = []
    for k, original in enumerate(base["image_id"][:6]):
        copy_id = f"ISIC_99000{k:02d}"
        shutil.copy(ham_root / "images" / f"{original}.jpg", root / "images" / f"{copy_id}.jpg")
        extra.append({**base.iloc[k].to_dict(), "image_id": copy_id, "lesion_id": f"HAM_99000{k:02d}"})
        expected.append((original, copy_id, "identical"))
    transforms = [lambda im: _jpeg(_half(im))] * 3 + [COPIES["crop5-corner"], COPIES["crop5-left"]]
    for k, transform in enumerate(transforms, start=6):
        original = base["image_id"][k]
        copy_id = f"ISIC_99000{k:02d}"
        _write(transform(Image.open(ham_root / "images" / f"{original}.jpg")), root / "images" / f"{copy_id}.jpg")
        extra.append({**base.iloc[k].to_dict(), "image_id": copy_id, "lesion_id": f"HAM_99000{k:02d}"})
        expected.append((original, copy_id, "near"))
    # X (an nv) copied and filed under the two-image lesion
    x = base[(base["dx"] == "nv") & (base["lesion_id"] != partner_lesion)].iloc[-1]
    shutil.copy(ham_root / "images" / f"{x['image_id']}.jpg", root / "images" / "ISIC_9900099.jpg")
    extra.append({**x.to_dict(), "image_id": "ISIC_9900099", "lesion_id": partner_lesion})
    expected.append((x["image_id"], "ISIC_9900099", "identical"))
    pd.concat([rows, pd.DataFrame(extra)], ignore_index=True).to_csv(root / "HAM10000_metadata.csv", index=False)
    return {
        "root": root,
        "expected": expected,
        "merged": {x["image_id"], "ISIC_9900099", *ham_meta.loc[ham_meta["lesion_id"] == partner_lesion, "image_id"]},
        "num_images": len(rows) + len(extra),
        "halved": {copy for _, copy, _ in expected[6:9]},
    }


def _expected_clusters(ham_dups) -> list[tuple[set, str]]:
    return sorted(([{a, b}, kind] for a, b, kind in ham_dups["expected"]), key=lambda c: min(c[0]))


def _report(out: Path) -> dict:
    return json.loads((out / "prepare_report.json").read_text())["duplicates"]


def test_prepare_groups_every_duplicate_cluster_into_one_split(ham_dups, tmp_path, capsys):
    out = tmp_path / "grouped"
    code = cli.main(
        ["prepare", "--source", "ham10000", "--root", str(ham_dups["root"]), "--out", str(out),
         "--short-side", "32", "--workers", "0", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    manifest, info = load_manifest(out)
    report = _report(out)
    assert len(manifest) == ham_dups["num_images"]
    # exactly the clusters built, each found by the right kind of match, and nothing else
    found = [({*c["images"]}, {link["kind"] for link in c["links"]}) for c in report["clusters"]]
    assert sorted(found, key=lambda c: min(c[0])) == [(pair, {kind}) for pair, kind in _expected_clusters(ham_dups)]
    assert report["num_clusters"] == 12 and report["mode"] == "group" and report["straddling_splits"] == 0
    assert report["num_joining_lesions"] == 12 and all(len(set(c["lesions"])) == 2 for c in report["clusters"])
    assert info["duplicates"] == {"method": dups.METHOD, "threshold": 28, "mode": "group", "num_clusters": 12}
    split_of = dict(zip(manifest["image_id"], manifest["split"], strict=True))
    for number, cluster in enumerate(report["clusters"]):
        assert len({split_of[i] for i in cluster["images"]}) == 1, cluster
        assert cluster["splits"] == [split_of[i] for i in cluster["images"]]
        assert set(manifest.loc[manifest["duplicate_cluster"] == number, "image_id"]) == set(cluster["images"])
    assert manifest["duplicate_cluster"].notna().sum() == 24
    # the cluster joined X's lesion and the two-image lesion it was filed under: one split group
    assert len({split_of[i] for i in ham_dups["merged"]}) == 1
    resolved = dups.resolve_duplicates(
        image_ids=manifest["image_id"].tolist(), sources=manifest["source"].tolist(),
        classes=manifest["class_name"].tolist(), groups=manifest["group"].tolist(), sha256=manifest["sha256"].tolist(),
        hashes=manifest["phash"].tolist(), pixels=[1] * len(manifest),
    )  # fmt: skip
    group_of = dict(zip(manifest["image_id"], resolved.split_groups, strict=True))
    merged_lesions = set(manifest.loc[manifest["image_id"].isin(ham_dups["merged"]), "group"])
    assert len(merged_lesions) == 2 and len({group_of[i] for i in ham_dups["merged"]}) == 1
    assert group_of[next(iter(ham_dups["merged"]))] == min(merged_lesions)
    # printed summary lists the clusters
    assert "duplicates: 12 cluster(s) of 24 images, 12 across lesions or without lesion ids (each cluster is one split group;" in printed
    first = report["clusters"][0]
    assert f"  {first['images'][0]} ({first['classes'][0]}, {first['splits'][0]}), {first['images'][1]}" in printed
    assert "identical d=0" in printed and "near d=" in printed and "... and 2 more" in printed
    # the hashes are in the manifest: a rerun reuses them without decoding
    again = prepare_dataset(build_source("ham10000", ham_dups["root"]), out, **OPTIONS)
    assert again.num_reused == ham_dups["num_images"] and _report(out)["clusters"] == report["clusters"]


def test_keep_mode_reports_the_clusters_that_straddle(ham_dups, tmp_path):
    out = tmp_path / "kept"
    result = prepare_dataset(build_source("ham10000", ham_dups["root"]), out, duplicates="keep", **OPTIONS)
    manifest, _ = load_manifest(out)
    report = _report(out)
    assert result.num_images == ham_dups["num_images"] and report["num_clusters"] == 12
    split_of = dict(zip(manifest["image_id"], manifest["split"], strict=True))
    straddling = sum(len({split_of[i] for i in c["images"]}) > 1 for c in report["clusters"])
    # without grouping the leak is real: this is what group mode prevents
    assert straddling > 0 and report["straddling_splits"] == straddling


def test_drop_mode_keeps_one_image_per_cluster(ham_dups, tmp_path):
    out = tmp_path / "dropped"
    result = prepare_dataset(build_source("ham10000", ham_dups["root"]), out, duplicates="drop", **OPTIONS)
    manifest, _ = load_manifest(out)
    report = _report(out)
    assert result.num_images == ham_dups["num_images"] - 12 == len(manifest)
    assert report["num_dropped"] == 12
    for cluster in report["clusters"]:
        kept = [i for i, s in zip(cluster["images"], cluster["splits"], strict=True) if s != "dropped"]
        # the original: more pixels than a halved copy; same size -> the smaller id (the copies are ISIC_99...)
        assert len(kept) == 1 and not kept[0].startswith("ISIC_99"), cluster
        assert kept[0] in set(manifest["image_id"])
    assert not set(manifest["image_id"]) & ham_dups["halved"]
    # the dropped copies stay cached, so a rerun decodes nothing
    assert prepare_dataset(build_source("ham10000", ham_dups["root"]), out, duplicates="drop", **OPTIONS).num_decoded == 0


# --------------------------------------------------------------------------- label conflicts


def _conflict_dataset(ham_root, ham_meta, root: Path, near: bool) -> tuple[Path, str, str]:
    """Four real images, plus a copy of the first (byte-identical or re-encoded) labelled mel, not nv."""
    (root / "images").mkdir(parents=True)
    base = _one_per_lesion(ham_meta, {"nv": 2, "bkl": 2})
    for image in base["image_id"]:
        shutil.copy(ham_root / "images" / f"{image}.jpg", root / "images" / f"{image}.jpg")
    original = base["image_id"][0]
    source = ham_root / "images" / f"{original}.jpg"
    if near:
        _write(_jpeg(Image.open(source)), root / "images" / "ISIC_9900001.jpg")
    else:
        shutil.copy(source, root / "images" / "ISIC_9900001.jpg")
    extra = {**base.iloc[0].to_dict(), "image_id": "ISIC_9900001", "lesion_id": "HAM_9900001", "dx": "mel"}
    pd.concat([base, pd.DataFrame([extra])], ignore_index=True).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root, original, "ISIC_9900001"


@pytest.mark.parametrize("mode", dups.MODES)
def test_identical_images_with_different_labels_are_refused(ham_root, ham_meta, tmp_path, mode):
    root, original, copy = _conflict_dataset(ham_root, ham_meta, tmp_path / "src", near=False)
    with pytest.raises(DataError, match=rf"byte-identical images with different labels: .*{original}\.jpg \(nv\), .*{copy}\.jpg \(mel\)"):
        prepare_dataset(build_source("ham10000", root), tmp_path / "out", duplicates=mode, **OPTIONS)
    result = prepare_dataset(build_source("ham10000", root), tmp_path / "out", duplicates=mode, on_error="skip", **OPTIONS)
    manifest, _ = load_manifest(tmp_path / "out")
    assert result.num_images == 3 and not {original, copy} & set(manifest["image_id"])
    assert sorted(Path(p.where).stem for p in result.problems) == sorted([original, copy])
    assert _report(tmp_path / "out")["clusters"][0]["splits"] == ["skipped", "skipped"]


def test_near_duplicates_with_different_labels_are_reported_or_refused(ham_root, ham_meta, tmp_path, capsys):
    root, original, copy = _conflict_dataset(ham_root, ham_meta, tmp_path / "src", near=True)
    code = cli.main(["prepare", "--source", "ham10000", "--root", str(root), "--out", str(tmp_path / "out"),
                     "--short-side", "32", "--workers", "0", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    cluster = _report(tmp_path / "out")["clusters"][0]
    assert cluster["images"] == [original, copy] and cluster["classes"] == ["nv", "mel"] and cluster["label_conflict"]
    assert "label conflicts: 1 cluster(s)" in printed and f"{copy} (mel" in printed
    # drop would have to pick one of the two labels: refused, naming both files
    with pytest.raises(DataError, match=rf"duplicate images with different labels: .*{original}\.jpg \(nv\), .*{copy}\.jpg \(mel\)"):
        prepare_dataset(build_source("ham10000", root), tmp_path / "out2", duplicates="drop", **OPTIONS)


# --------------------------------------------------------------------------- predefined splits (DermaMNIST)


@pytest.fixture(scope="module")
def derma_leak(ham_root, ham_meta, tmp_path_factory) -> Path:
    """A DermaMNIST .npz of real images at 28 px, whose test[0] is train[0] (the known DermaMNIST leak)."""
    chosen = _one_per_lesion(ham_meta, {"nv": 9, "mel": 4, "bkl": 4})
    pixels = np.stack([
        np.asarray(Image.open(ham_root / "images" / f"{i}.jpg").convert("RGB").resize((28, 28), Image.Resampling.LANCZOS))
        for i in chosen["image_id"]
    ])  # fmt: skip
    labels = np.array([{"nv": 5, "mel": 4, "bkl": 2}[dx] for dx in chosen["dx"]], dtype=np.uint8).reshape(-1, 1)
    path = tmp_path_factory.mktemp("derma") / "dermamnist.npz"
    test = [0, 11, 12, 13]
    np.savez(path, train_images=pixels[:10], train_labels=labels[:10], val_images=pixels[14:], val_labels=labels[14:],
             test_images=pixels[test], test_labels=labels[test])  # fmt: skip
    return path


def test_predefined_splits_with_a_leak(derma_leak, tmp_path):
    source = build_source("dermamnist", derma_leak)
    with pytest.raises(DataError, match=r"1 duplicate cluster\(s\) straddle the predefined splits, e\.g\. "
                       r"dermamnist_test_00000 \(nv, test\), dermamnist_train_00000 \(nv, train\): identical d=0"):
        prepare_dataset(source, tmp_path / "group", **OPTIONS)
    prepare_dataset(source, tmp_path / "keep", duplicates="keep", **OPTIONS)
    assert _report(tmp_path / "keep")["straddling_splits"] == 1
    prepare_dataset(source, tmp_path / "drop", duplicates="drop", **OPTIONS)
    manifest, _ = load_manifest(tmp_path / "drop")
    # the official test set stays whole; the training copy goes
    assert "dermamnist_test_00000" in set(manifest["image_id"]) and "dermamnist_train_00000" not in set(manifest["image_id"])
    assert manifest["split"].value_counts().to_dict() == {"train": 9, "test": 4, "val": 3}


# --------------------------------------------------------------------------- between two prepared datasets


@pytest.fixture(scope="module")
def external_vs_train(ham_root, ham_meta, uda_root, tmp_path_factory) -> dict:
    """A training set (HAM10000 layout, 20 real images) and an 'external test set' in the ISIC 2019 layout:
    8 real UDA-1 images plus three HAM images shipped differently (renamed copy, PNG, `_downsampled`)."""
    base = tmp_path_factory.mktemp("cross")
    train_root = base / "train"
    (train_root / "images").mkdir(parents=True)
    train = _one_per_lesion(ham_meta, {"nv": 12, "mel": 8})
    for image in train["image_id"]:
        shutil.copy(ham_root / "images" / f"{image}.jpg", train_root / "images" / f"{image}.jpg")
    train.to_csv(train_root / "HAM10000_metadata.csv", index=False)

    test_root = base / "external"
    (test_root / "images").mkdir(parents=True)
    truth = pd.read_csv(uda_root / "ISIC_2019_Training_GroundTruth.csv").head(8)
    for image in truth["image"]:
        shutil.copy(uda_root / "images" / f"{image}.jpg", test_root / "images" / f"{image}.jpg")
    a, b, c = train["image_id"][:3]
    shutil.copy(ham_root / "images" / f"{a}.jpg", test_root / "images" / "ISIC_9800001.jpg")
    Image.open(ham_root / "images" / f"{b}.jpg").save(test_root / "images" / "ISIC_9800002.png")
    _write(_jpeg(_half(Image.open(ham_root / "images" / f"{c}.jpg"))), test_root / "images" / "ISIC_9800003_downsampled.jpg")
    rows = pd.DataFrame({"image": ["ISIC_9800001", "ISIC_9800002", "ISIC_9800003"], "NV": 1.0})
    truth = pd.concat([truth, rows], ignore_index=True).fillna(0.0)
    truth.to_csv(test_root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    prepare_dataset(build_source("ham10000", train_root), base / "train_data", **OPTIONS)
    prepare_dataset(build_source("isic2019", test_root), base / "external_data", **OPTIONS)
    return {"train": base / "train_data", "external": base / "external_data",
            "pairs": {("ISIC_9800001", a, "identical"), ("ISIC_9800002", b, "near"), ("ISIC_9800003", c, "near")}}  # fmt: skip


def test_duplicates_command_lists_every_image_of_one_dataset_in_the_other(external_vs_train, tmp_path, capsys):
    csv = tmp_path / "report" / "external_in_train.csv"
    code = cli.main(["duplicates", "--data", str(external_vs_train["external"]), "--against", str(external_vs_train["train"]),
                     "--out", str(csv)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    pairs = pd.read_csv(csv)
    assert list(pairs.columns) == dups.CROSS_COLUMNS
    assert set(zip(pairs["image_id"], pairs["against_image_id"], pairs["kind"], strict=True)) == external_vs_train["pairs"]
    assert (pairs["class_name"] == "NV").all() and (pairs["against_class_name"] == "nv").all()
    by_split = ", ".join(f"{k} {v}" for k, v in pairs["split"].value_counts().sort_index().items())
    summary = f"3 image(s) of {external_vs_train['external']} ({by_split}) duplicate 3 image(s) of {external_vs_train['train']}"
    assert summary in printed
    # the other way round: the same pairs, seen from the training set
    reverse = duplicates_between(external_vs_train["train"], external_vs_train["external"])
    assert set(zip(reverse["against_image_id"], reverse["image_id"], reverse["kind"], strict=True)) == external_vs_train["pairs"]


def test_duplicates_command_refuses_datasets_it_cannot_compare(external_vs_train, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(external_vs_train["train"], other)
    info = json.loads((other / "dataset.json").read_text())
    info["duplicates"]["method"] = "imagehash-phash8"
    (other / "dataset.json").write_text(json.dumps(info))
    code = cli.main(["duplicates", "--data", str(external_vs_train["external"]), "--against", str(other)])
    assert code == 1
    assert f"{other / 'dataset.json'}: perceptual hash method 'imagehash-phash8'" in capsys.readouterr().err
    shutil.copy(external_vs_train["train"] / "dataset.json", other / "dataset.json")
    manifest = pd.read_csv(other / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[4, "phash"] = manifest.loc[4, "phash"][:-1]
    manifest.to_csv(other / "manifest.csv", index=False)
    with pytest.raises(DataError, match=r"other/manifest\.csv: row 6: perceptual hash is not 1024 hex characters"):
        duplicates_between(external_vs_train["external"], other)


def test_cache_from_before_the_hashes_is_hashed_again(ham_root, ham_meta, tmp_path):
    """A journal entry without this method's perceptual hash (an older prepare) is not reused."""
    root, _, _ = _conflict_dataset(ham_root, ham_meta, tmp_path / "src", near=True)
    (root / "images" / "ISIC_9900001.jpg").unlink()
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    meta[meta["image_id"] != "ISIC_9900001"].to_csv(root / "HAM10000_metadata.csv", index=False)
    out = tmp_path / "out"
    prepare_dataset(build_source("ham10000", root), out, **OPTIONS)
    expected, _ = load_manifest(out)
    journal = out / "cache" / "journal.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k not in ("phash", "phash_method")} for line in journal.read_text().splitlines()]
    journal.write_text("".join(json.dumps(entry) + "\n" for entry in old))
    result = prepare_dataset(build_source("ham10000", root), out, **OPTIONS)
    assert (result.num_decoded, result.num_reused) == (4, 0)
    pd.testing.assert_frame_equal(load_manifest(out)[0], expected)
