"""bench-data: a tiny smoke run on real HAM10000 images produces a table and JSON full of numbers."""

from __future__ import annotations

import json
import math

from skindistil import cli


def test_bench_data_smoke_run(ham_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main([
        "bench-data", "--data-root", str(ham_root), "--images", "24", "--workers", "1", "--batch-size", "8",
        "--seconds", "0.3", "--image-size", "32", "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "img/s" in printed and "EXTRAPOLATED" in printed and "BatchAugment" in printed
    result = json.loads(out.read_text())
    assert result["settings"]["num_images"] == 24 and result["settings"]["target_cores"] == 16
    rows = result["rows"]
    assert {row["stage"] for row in rows} >= {"prepare", "loader", "augment", "extrapolated"}
    for row in rows:
        assert math.isfinite(row["images_per_second"]) and row["images_per_second"] > 0, row
    paths = {(row["stage"], row["path"]) for row in rows}
    assert ("loader", "cpu: v2 per-sample") in paths and ("loader", "device: uint8 squares") in paths
    # Extrapolated rows are the measured per-core (CPU-time) rate times 16 cores.
    per_core = {row["path"]: row["per_core"] for row in rows if row["stage"] == "loader" and row["workers"] == 0}
    for row in rows:
        if row["stage"] == "extrapolated" and row["path"] in per_core:
            assert math.isclose(row["images_per_second"], 16 * per_core[row["path"]])


def test_bench_data_needs_a_data_root_for_file_sources(capsys):
    assert cli.main(["bench-data", "--source", "ham10000"]) == 1
    assert "--data-root is required" in capsys.readouterr().err
