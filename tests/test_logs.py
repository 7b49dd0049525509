"""metrics.csv across kills and resumes: rows appended as logged, new columns rewrite the file atomically,
a resume keeps the rows before the checkpoint's step, a line cut short by a kill is dropped."""

from __future__ import annotations

import pandas as pd
import pytest

from skindistil.errors import DataError
from skindistil.training.logs import HistoryCSVLogger, read_history


def _log(logger, rows):
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)


def test_rows_are_on_disk_as_soon_as_they_are_logged(tmp_path):
    logger = HistoryCSVLogger(tmp_path)
    _log(logger, [(0, {"train/loss_step": 2.0, "epoch": 0})])
    assert pd.read_csv(logger.path).to_dict("records") == [{"epoch": 0, "step": 0, "train/loss_step": 2.0}]
    _log(logger, [(1, {"train/loss_step": 1.5, "epoch": 0}), (1, {"val/balanced_accuracy": 0.25, "epoch": 0})])
    frame = pd.read_csv(logger.path)
    assert list(frame.columns) == ["epoch", "step", "train/loss_step", "val/balanced_accuracy"]  # header widened
    assert frame["step"].tolist() == [0, 1, 1] and frame["val/balanced_accuracy"].iloc[2] == 0.25


def test_resume_keeps_rows_before_the_checkpoint_step_and_drops_a_torn_line(tmp_path):
    first = HistoryCSVLogger(tmp_path)
    _log(first, [(s, {"train/loss_step": float(s), "epoch": s // 3}) for s in range(6)])
    with open(first.path, "a") as f:
        f.write("2,6,0.12")  # a kill in the middle of a row: no newline
    resumed = HistoryCSVLogger(tmp_path, resume_step=4)
    _log(resumed, [(s, {"train/loss_step": 10.0 + s, "epoch": s // 3}) for s in range(4, 6)])
    frame = pd.read_csv(resumed.path)
    assert frame["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert frame["train/loss_step"].tolist() == [0.0, 1.0, 2.0, 3.0, 14.0, 15.0]


def test_fresh_run_replaces_an_old_log(tmp_path):
    old = HistoryCSVLogger(tmp_path)
    _log(old, [(0, {"a": 1.0})])
    fresh = HistoryCSVLogger(tmp_path)
    _log(fresh, [(0, {"b": 2.0})])
    assert list(pd.read_csv(fresh.path).columns) == ["b", "step"]


def test_a_row_without_a_step_is_named(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,x\n0,0,1.0\n0,,2.0\n")
    with pytest.raises(DataError, match=r"metrics.csv:3: row without a valid step"):
        read_history(path, before_step=5)


def test_resume_continues_an_old_val_bma_column_under_its_new_name(tmp_path):
    # metrics.csv as an earlier version wrote it: the validation BMA logged as val/bma
    path = tmp_path / "logs" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("epoch,step,train/loss_step,val/bma\n0,0,2.0,\n0,1,,0.25\n1,2,1.5,\n1,3,,0.5\n")
    resumed = HistoryCSVLogger(tmp_path, resume_step=2)
    _log(resumed, [(2, {"train/loss_step": 1.25, "epoch": 1}), (3, {"val/balanced_accuracy": 0.375, "epoch": 1})])
    frame = pd.read_csv(resumed.path)
    assert list(frame.columns) == ["epoch", "step", "train/loss_step", "val/balanced_accuracy"]
    assert frame["val/balanced_accuracy"].tolist()[1::2] == [0.25, 0.375]
