"""Atomic writes, a full disk and a read-only output folder: a failed write never truncates or replaces a
good file, and the CLI answers with one line naming the path and the reason (real tmpfs and read-only
bind mounts where the tests may mount them, a simulated failing writer everywhere)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import serving_artifact
from skindistil import files
from skindistil.cli import main
from skindistil.errors import WriteError
from skindistil.training.trainer import AtomicCheckpointIO

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


# name -> (write(path, version), read(path) -> comparable value)
WRITERS = {
    "text": (lambda p, v: files.write_text(p, f"version {v}\n"), lambda p: p.read_text()),
    "bytes": (lambda p, v: files.write_bytes(p, bytes([v]) * 100), lambda p: p.read_bytes()),
    "json": (lambda p, v: files.write_json(p, {"version": v}), lambda p: json.loads(p.read_text())),
    "csv": (lambda p, v: files.write_csv(p, pd.DataFrame({"image": ["a", "b"], "mel": [0.25 * v, 0.5]})),
            lambda p: pd.read_csv(p).to_dict("list")),
    "npy": (lambda p, v: files.save_npy(p, np.full((3, 4, 3), v, np.uint8)), lambda p: np.load(p).tolist()),
    "png": (lambda p, v: files.save_figure(_figure(), p, dpi=20 + v), lambda p: p.read_bytes()),
    "safetensors": (lambda p, v: files.save_safetensors({"w": torch.full((4,), float(v))}, p),
                    lambda p: __import__("safetensors.torch").torch.load_file(p)["w"].tolist()),
    "torch": (lambda p, v: files.save_torch({"w": torch.full((4,), float(v))}, p),
              lambda p: torch.load(p, weights_only=True)["w"].tolist()),
}


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob(f"*{files.TMP_SUFFIX}"))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_writer_round_trips_and_leaves_no_temporary_file(tmp_path, kind):
    write, read = WRITERS[kind]
    path = tmp_path / "sub" / f"out.{kind}"
    write(path, 1)
    first = read(path)
    write(path, 2)
    assert read(path) != first
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_failed_write_keeps_the_good_file(tmp_path, monkeypatch, kind):
    write, read = WRITERS[kind]
    path = tmp_path / f"out.{kind}"
    write(path, 1)
    good = read(path)

    def full_disk(_path):
        raise ENOSPC

    monkeypatch.setattr(files, "_fsync_file", full_disk)
    with pytest.raises(WriteError, match=r"No space left on device \(ENOSPC\)") as caught:
        write(path, 2)
    assert caught.value.path == str(path)
    assert read(path) == good
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ real file systems (need root to mount)


def _mount(args: list[str], target: Path) -> None:
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip() or result.returncode}); the simulated tests cover this")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs."""
    folder = tmp_path / "small"
    folder.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], folder)
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder bind-mounted read-only (root ignores chmod, not a read-only mount)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    _mount(["--bind", "-o", "ro", str(folder)], folder)
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path) -> None:
    """Fill the file system of `folder` up to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free < 4096


def test_full_tmpfs_keeps_the_old_file_and_frees_the_space(small_disk):
    path = small_disk / "report.md"
    files.write_text(path, "good\n")
    with pytest.raises(WriteError, match=rf"{path}: cannot write: No space left on device \(ENOSPC\)"):
        files.write_bytes(path, b"x" * (2 << 20))
    assert path.read_text() == "good\n"
    assert _leftovers(small_disk) == []
    files.write_text(path, "still room\n")  # the failed temporary file no longer takes space
    assert path.read_text() == "still room\n"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return serving_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="module")
def images(ham_root) -> list[str]:
    return [str(p) for p in sorted((ham_root / "images").glob("*.jpg"))[:3]]


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_predict_on_a_full_disk_keeps_the_previous_csv(artifact, images, small_disk, capsys):
    out = small_disk / "predictions.csv"
    assert main(["predict", "--no-progress", "--model", str(artifact), *images, "--out", str(out)]) == 0
    good = out.read_bytes()
    assert len(pd.read_csv(out)) == len(images)
    _fill(small_disk)
    capsys.readouterr()
    assert main(["predict", "--no-progress", "--model", str(artifact), *images, "--out", str(out)]) == 1
    _one_error_line(capsys, str(out), "No space left on device (ENOSPC)")
    assert out.read_bytes() == good


def test_predict_with_a_failing_writer_keeps_the_previous_csv(artifact, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--no-progress", "--model", str(artifact), *images, "--out", str(out)]) == 0
    good = out.read_bytes()

    def full_disk(_path):
        raise ENOSPC

    monkeypatch.setattr(files, "_fsync_file", full_disk)
    capsys.readouterr()
    assert main(["predict", "--no-progress", "--model", str(artifact), *images, "--out", str(out)]) == 1
    _one_error_line(capsys, str(out), "ENOSPC")
    assert out.read_bytes() == good
    assert _leftovers(tmp_path) == []


def test_commands_writing_into_a_read_only_folder_say_so_in_one_line(artifact, images, ham_root, readonly_dir,
                                                                     capsys, tmp_path):
    cases = {
        "prepare": ["prepare", "--source", "ham10000", "--root", str(ham_root), "--limit", "20", "--no-progress",
                    "--out", str(readonly_dir / "data")],
        "predict": ["predict", "--no-progress", "--model", str(artifact), *images,
                    "--out", str(readonly_dir / "p.csv")],
        "export": ["export", "--model", str(artifact), "--out", str(readonly_dir / "model.onnx")],
        "evaluate": ["evaluate", "--predictions", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv"),
                     "--out", str(readonly_dir / "eval")],
    }
    pd.DataFrame({"image": ["a", "b"], "MEL": [0.9, 0.1], "NV": [0.1, 0.9]}).to_csv(tmp_path / "pred.csv", index=False)
    pd.DataFrame({"image": ["a", "b"], "MEL": [1.0, 0.0], "NV": [0.0, 1.0]}).to_csv(tmp_path / "truth.csv", index=False)
    for name, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 1, name
        _one_error_line(capsys, f"skindistil {name}: error: {readonly_dir}", "Read-only file system (EROFS)")
    assert list(readonly_dir.iterdir()) == []


def test_train_into_a_read_only_folder_says_so_in_one_line(ham_small, readonly_dir, tmp_path, capsys):
    from conftest import tiny_train_config
    from skindistil.config import dump_yaml

    cfg = tiny_train_config(ham_small, readonly_dir, name="teacher", max_epochs=1)
    dump_yaml(cfg.to_dict(), tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 1
    _one_error_line(capsys, str(readonly_dir / "teacher"), "EROFS")


# ------------------------------------------------------------------ checkpoints


def _checkpoint(value: float, size: int = 1000) -> dict:
    return {"state_dict": {"w": torch.full((size,), value)}, "global_step": int(value)}


def test_checkpoint_io_keeps_the_previous_last_and_never_truncates(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last, previous = tmp_path / "last.ckpt", tmp_path / "last-prev.ckpt"
    io.save_checkpoint(_checkpoint(1.0), last)
    assert not previous.exists()
    io.save_checkpoint(_checkpoint(2.0), last)
    assert torch.load(previous, weights_only=True)["global_step"] == 1
    assert torch.load(last, weights_only=True)["global_step"] == 2

    def full_disk(_path):
        raise ENOSPC

    monkeypatch.setattr(files, "_fsync_file", full_disk)
    with pytest.raises(WriteError, match="ENOSPC"):
        io.save_checkpoint(_checkpoint(3.0), last)
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert torch.load(previous, weights_only=True)["global_step"] == 1
    assert _leftovers(tmp_path) == []
    # a damaged last.ckpt is never kept as the "previous good" one
    monkeypatch.undo()
    last.write_bytes(last.read_bytes()[:100])
    io.save_checkpoint(_checkpoint(4.0), last)
    assert torch.load(previous, weights_only=True)["global_step"] == 1
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_checkpoint_on_a_full_tmpfs_leaves_last_intact(small_disk):
    io = AtomicCheckpointIO()
    last = small_disk / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0, size=20_000), last)  # 80 kB
    with pytest.raises(WriteError, match=rf"{last}: cannot write: No space left on device"):
        io.save_checkpoint(_checkpoint(2.0, size=400_000), last)  # 1.6 MB on a 1 MiB disk
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert _leftovers(small_disk) == []


def test_file_sha256_is_the_digest_of_every_block(ham_root, tmp_path):
    """Across 1 MiB block boundaries: a 2.5 MiB file of real JPEG bytes, and an empty file."""
    import hashlib

    from skindistil.files import file_sha256

    data = b"".join(p.read_bytes() for p in sorted((ham_root / "images").glob("*.jpg"))[:1000])[: 5 << 19]
    assert len(data) == 5 << 19
    big, empty = tmp_path / "big.bin", tmp_path / "empty.bin"
    big.write_bytes(data)
    empty.write_bytes(b"")
    assert file_sha256(big) == hashlib.sha256(data).hexdigest()
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_jsonable_gives_strict_json_of_numpy_torch_and_paths():
    value = {1: (np.float32(0.5), np.int64(3)), "t": torch.tensor([1.5, float("nan")]), "p": Path("a/b"),
             "a": np.array([[np.inf, 2.0]]), "s": "text", "n": None, "b": True}
    ready = files.jsonable(value)
    assert ready == {"1": [0.5, 3], "t": [1.5, None], "p": "a/b", "a": [[None, 2.0]], "s": "text", "n": None, "b": True}
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready


def test_every_json_file_is_strict_json(tmp_path):
    """Undefined numbers (a throughput of too few batches, an AUC without both classes) are written as null:
    Python's bare NaN is not JSON, and browsers, jq and other languages refuse the whole file."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    path = files.write_json(tmp_path / "result.json", {"images_per_s": float("nan"), "auc": [0.5, float("inf")],
                                                        "scores": np.array([0.25, np.nan])})
    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "images_per_s": None, "auc": [0.5, None], "scores": [0.25, None]}


def test_jsonable_refuses_keys_json_cannot_hold_apart():
    with pytest.raises(ValueError, match="keys '1' and '1' both become '1'"):
        files.jsonable({1: "a", "1": "b"})  # json.dumps writes both; every reader keeps one
    with pytest.raises(TypeError, match=r"a tuple key \(\('a', 1\)\) has no JSON form"):
        files.write_json("never-written.json", {("a", 1): 2})
    assert files.jsonable({np.int64(2): 0.5, 3.5: 1}) == {"2": 0.5, "3.5": 1}
