"""Every file of an artifact gets the same permissions (0666 less the umask), so a model copied to a
server for another user can be read; the weights were once written 0600."""

from __future__ import annotations

import os
import stat

from conftest import serving_artifact


def test_artifact_files_share_the_umask_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    model_dir = serving_artifact(tmp_path)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in model_dir.iterdir() if path.is_file()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, {name: oct(mode) for name, mode in modes.items()}
