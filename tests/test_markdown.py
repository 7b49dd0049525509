"""The one Markdown table renderer, and the reports that go through it."""

import re

import pytest

from skindistil.errors import DataError
from skindistil.evaluation.compare import retention_markdown
from skindistil.evaluation.document import Document
from skindistil.evaluation.report import PER_CLASS_COLUMNS, render_report_md
from skindistil.markdown import markdown_table


def _cells(line: str) -> list[str]:
    """A GFM table line split on its unescaped pipes, as a Markdown renderer splits it."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def _tables(text: str) -> list[list[str]]:
    """The runs of consecutive table lines in `text`."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_layout_alignment_and_empty_cells():
    text = markdown_table(["model", "n", "BMA", "note"], [["teacher", "10", "0.5123", ""], ["student", "9", "0.4", "x"]],
                          align=[None, "right", "center", "left"])
    assert text == ("| model | n | BMA | note |\n"
                    "| --- | ---: | :---: | :--- |\n"
                    "| teacher | 10 | 0.5123 |  |\n"
                    "| student | 9 | 0.4 | x |")
    assert markdown_table(["a"], []) == "| a |\n| --- |"  # no rows: header only, no trailing newline


def test_pipes_are_escaped_in_names_and_cells():
    text = markdown_table(["class", "a|b"], [["NV|benign", "1"], ["MEL", "x || y"]])
    lines = text.splitlines()
    assert lines[0] == "| class | a\\|b |" and lines[2] == "| NV\\|benign | 1 |" and lines[3] == "| MEL | x \\|\\| y |"
    assert [len(_cells(line)) for line in lines] == [2, 2, 2, 2]
    assert _cells(lines[2]) == ["NV\\|benign", "1"]


def _shown(line: str) -> list[str]:
    """The text GitHub shows in each cell of a table line (GFM, cmark-gfm): cells split on the pipes
    without a backslash just before them, `\\|` taken as `|` in each cell, then each backslash-escaped
    ASCII punctuation character (`\\\\`, `\\*`, ...) as itself."""
    cells = [cell.replace("\\|", "|") for cell in _cells(line)]
    return [re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell) for cell in cells]


def test_names_with_backslashes_are_shown_as_written():
    """A backslash before a pipe or other punctuation would escape it: `a\\|b` written as `a\\\\|b` shows
    `a|b`. Such backslashes are doubled; one before a space or a letter is written as it is."""
    names = ["a\\|b", "a\\\\|b", "\\|", "a\\*b", "ends\\", "true \\ predicted", "C:\\data", "x|y"]
    text = markdown_table(["class", "n"], [[name, "1"] for name in names])
    rows = text.splitlines()[2:]
    assert [_shown(line) for line in rows] == [[name, "1"] for name in names]
    assert rows[0] == "| a\\\\\\|b | 1 |" and rows[5] == "| true \\ predicted | 1 |"


def test_ragged_rows_and_bad_cells_are_refused_by_row_and_column():
    with pytest.raises(DataError, match=r"Markdown table \(model, BMA\), row 2: 3 cells for 2 columns"):
        markdown_table(["model", "BMA"], [["a", "1"], ["b", "2", "3"]])
    with pytest.raises(DataError, match=r"row 1: 1 cells for 2 columns"):
        markdown_table(["model", "BMA"], [["a"]])
    with pytest.raises(DataError, match=r"row 1, column 'BMA': cell 'x\\ny' holds a line break"):
        markdown_table(["model", "BMA"], [["a", "x\ny"]])
    with pytest.raises(DataError, match=r"header, column 'a\\rb'"):
        markdown_table(["a\rb"], [])
    with pytest.raises(TypeError, match=r"row 1, column 'BMA': cell 0.5 is a float, not a str"):
        markdown_table(["model", "BMA"], [["a", 0.5]])
    with pytest.raises(DataError, match="2 alignments for 3 columns"):
        markdown_table(["a", "b", "c"], [], align=["right", "right"])
    with pytest.raises(DataError, match="alignment 'middle'"):
        markdown_table(["a"], [], align=["middle"])
    with pytest.raises(DataError, match="no columns"):
        markdown_table([], [])


def _report_metrics(classes):
    k = len(classes)
    return {
        "classes": classes,
        "num_samples": 4,
        "headline": {"balanced_accuracy": 0.5, "accuracy": 0.75},
        "per_class": {name: dict.fromkeys(PER_CLASS_COLUMNS, 0.5) for name in classes},
        "confusion_matrix": {"counts": [[1] * k for _ in range(k)], "undecided": [0] * k},
        "cancer": None,
        "notes": [],
    }


def test_reports_with_a_pipe_in_a_class_name_stay_well_formed():
    # before the shared renderer, report.md wrote "NV|benign" raw: its rows had a cell too many
    classes = ["MEL", "NV|benign"]
    text = render_report_md(_report_metrics(classes), "T")
    tables = _tables(text)
    assert len(tables) >= 3
    for table in tables:
        widths = {len(_cells(line)) for line in table}
        assert len(widths) == 1, table
    confusion = next(t for t in tables if "NV\\|benign" in t[0])
    assert _cells(confusion[0])[1:] == ["MEL", "NV\\|benign"]

    comparison = {"verdict": "v", "per_class": {name: {"teacher_recall": 0.5, "student_recall": 0.25, "retention": 0.5,
                                                       "interval": None} for name in classes}}
    result = {"split": "test", "teacher": "t", "gate": {}, "students": [{"model": "s", "comparison": comparison,
                                                                          "failures": []}]}
    (table,) = _tables(retention_markdown(result))
    assert [len(_cells(line)) for line in table] == [5] * 4
    assert _cells(table[3])[0] == "NV\\|benign"

    doc = Document("d")
    doc.section("Data").table(["split", *classes], [["train", 1, 2]])
    (table,) = _tables(doc.markdown())
    assert table == ["| split | MEL | NV\\|benign |", "| --- | --- | --- |", "| train | 1 | 2 |"]
