"""Image ids that become file names: one function, used by the cache, explain and the run report."""

from __future__ import annotations

import hashlib
import re
import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import serving_artifact
from skindistil.cli import main
from skindistil.data.names import safe_file_stem, unique_file_stems
from skindistil.data.prepare import cache_file_for


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def test_safe_file_stem_keeps_plain_ids_and_makes_every_other_id_a_distinct_plain_name():
    for plain in ("ISIC_0024306", "ISIC_0024306_downsampled", "dermamnist_train_00017", "a.b-c_d"):
        assert safe_file_stem(plain) == plain
    assert safe_file_stem("mel/ISIC_0000001") == f"mel_ISIC_0000001-{_sha('mel/ISIC_0000001')[:12]}"
    awkward = ["mel/ISIC_0000001", "mel_ISIC_0000001", "mel\\ISIC_0000001", "../../etc/passwd", "..", ".", "",
               "-rf", ".hidden", "nævus 1", "nævus_1", "a:b*c?d", "x" * 300, "x" * 301, "/abs/path/ISIC_1"]
    stems = [safe_file_stem(i) for i in awkward]
    assert len(set(stems)) == len(awkward)  # mel/x, mel\x and the plain id mel_x never share a file
    for stem in stems:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", stem), stem  # never hidden, never an option
        assert len(stem) <= 113, stem


def test_the_cache_names_of_existing_datasets_are_unchanged():
    # prepared datasets keep their cache: the names are those prepare has always written
    assert cache_file_for("ISIC_0024306") == f"cache/{_sha('ISIC_0024306')[:2]}/ISIC_0024306.npy"
    sha = _sha("nv/sub/ISIC_0024306")
    assert cache_file_for("nv/sub/ISIC_0024306") == f"cache/{sha[:2]}/nv_sub_ISIC_0024306-{sha[:12]}.npy"


def test_unique_file_stems_separates_files_that_share_a_name():
    stems = unique_file_stems(["tree/mel/ISIC_1.jpg", "tree/nv/ISIC_1.jpg", "tree/nv/ISIC_2.jpg"])
    assert stems[2] == "ISIC_2"
    assert stems[0].startswith("tree_mel_ISIC_1-") and stems[1].startswith("tree_nv_ISIC_1-")


def test_explain_on_an_image_folder_tree_writes_one_png_per_image(ham_root, tmp_path, capsys):
    artifact = serving_artifact(tmp_path)
    real = sorted((ham_root / "images").glob("*.jpg"))[:2]
    tree = tmp_path / "tree"
    for cls in ("mel", "nv"):  # the same file name under two classes, as re-exported datasets have
        (tree / cls).mkdir(parents=True)
        shutil.copy(real[0], tree / cls / "lesion.jpg")
    shutil.copy(real[1], tree / "nv" / real[1].name)
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(artifact), str(tree), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 3 and f"{real[1].stem}_rollout.png" in written
    assert all(Image.open(out / name).format == "PNG" for name in written)
    assert "wrote 3 PNG(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_run_on_an_image_folder_with_sub_folders_writes_its_report(ham_root, tmp_path):
    """`run` on an ImageFolder tree whose ids hold slashes (class/visit/image): before, every model
    trained and the report stage crashed on an attention-map file named after such an id."""
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    tree = tmp_path / "tree"
    for dx in ("nv", "mel", "bkl"):
        for i, image in enumerate(meta.loc[meta["dx"] == dx, "image_id"].head(16)):
            folder = tree / dx / f"visit{i % 2 + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(ham_root / "images" / f"{image}.jpg", folder / f"{image}.jpg")
    overrides = [
        "methods=[distilvit]", "data.short_side=40",
        "teacher.model.kwargs={embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, patch_size: 8}",
        "teacher.preprocess.image_size=32", "teacher.trainer.max_epochs=1", "teacher.data.num_workers=0",
        "distill.keep_blocks=1", "distill.min_depth=1", "distill.trainer.max_epochs=1", "distill.data.num_workers=0",
        "benchmark.batch_sizes=[1]", "benchmark.seconds=0.2", "explain_images=2",
    ]
    assert main(["run", "--config", "configs/quickstart.yaml", "--data", str(tree), "--out-dir", str(tmp_path / "runs"),
                 "--no-progress", *overrides]) == 0
    run_dir = tmp_path / "runs" / "quickstart"
    report = (run_dir / "report.md").read_text()
    maps = re.findall(r"!\[(\w+) on ([\w/]+) \(true (\w+)\)[^\]]*\]\((report_assets/attention_[^)]+)\)", report)
    assert len(maps) == 4  # 2 test images x (teacher, distilvit)
    for label, image_id, true_class, asset in maps:
        assert "/" in image_id and image_id.split("/")[0] == true_class
        assert asset == f"report_assets/attention_{label}_{safe_file_stem(image_id)}.png"
        assert Image.open(run_dir / asset).format == "PNG"
