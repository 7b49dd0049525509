"""Markdown tables: the one renderer every report of skindistil writes its tables with.

GitHub-flavoured Markdown (GFM) pipe tables: a header row, a delimiter row (`---`, or `:---`,
`---:`, `:---:` for left, right and centred columns), one line per row. A `|` inside a cell would end
the cell early, so it is escaped as `\\|` (GFM renders it as `|`); a backslash before a pipe or other
ASCII punctuation would escape that character and vanish from the page (`a\\|b` would show `a|b`), so it
is doubled. Cells are text: callers format their numbers (digits, intervals, "n/a") themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from skindistil.errors import DataError

ALIGNMENTS = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}
# backslashes that Markdown would read as escaping the next character: those before ASCII punctuation
_ESCAPING_BACKSLASHES = re.compile(r"\\+(?=[!-/:-@\[-`{-~])")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]],
                   align: Sequence[str | None] | None = None) -> str:
    """A GFM pipe table, its lines joined by "\\n" with no trailing newline:

        | model | BMA |
        | --- | ---: |
        | teacher | 0.5123 |

    header: the column names (str); rows: one sequence of str cells per row, as many as the header;
    align: per column None (GFM's default, `---`), "left", "right" or "center"; None for all default.
    `|` in a name or cell is written `\\|`, and a backslash before punctuation `\\\\`, so the page shows the
    text as given. Empty cells stay empty (`|  |`).

    Raises DataError naming the table (by its header), the row (1-based) and the column for a row
    with more or fewer cells than the header, a cell holding a line break (it would end the table),
    an empty header, or an `align` of the wrong length or with an unknown value; TypeError for a
    cell that is not a str (format numbers before rendering).
    """
    header = list(header)
    table = f"Markdown table ({', '.join(map(str, header))})"
    if not header:
        raise DataError("Markdown table", "no columns")
    if align is None:
        align = [None] * len(header)
    elif len(align) != len(header):
        raise DataError(table, f"{len(align)} alignments for {len(header)} columns")
    unknown = [a for a in align if a not in ALIGNMENTS]
    if unknown:
        raise DataError(table, f"alignment {unknown[0]!r} is not one of left, right, center or None")
    lines = [_line([_cell(name, f"{table}, header", name) for name in header]),
             _line([ALIGNMENTS[a] for a in align])]
    for number, row in enumerate(rows, start=1):
        row = list(row)
        where = f"{table}, row {number}"
        if len(row) != len(header):
            raise DataError(where, f"{len(row)} cells for {len(header)} columns: {row!r}")
        lines.append(_line([_cell(value, where, name) for value, name in zip(row, header, strict=True)]))
    return "\n".join(lines)


def _cell(value: str, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}, column {column!r}: cell {value!r} is a {type(value).__name__}, not a str "
                        "(format numbers before rendering)")
    if "\n" in value or "\r" in value:
        raise DataError(f"{where}, column {column!r}", f"cell {value!r} holds a line break")
    return _ESCAPING_BACKSLASHES.sub(lambda run: run.group() * 2, value).replace("|", "\\|")


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
