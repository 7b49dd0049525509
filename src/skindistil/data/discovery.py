"""Input discovery: which files of the folders, files and path lists a user names are images to read.

One function, `discover_images`, serves prepare (ImageFolder trees), predict, explain and export:

- a folder is searched recursively (symbolic links followed, each real folder once), its files in
  path order;
- hidden files and folders and operating-system metadata (macOS ``._*`` AppleDouble files,
  ``__MACOSX/``, ``.DS_Store``; Windows ``Thumbs.db``, ``desktop.ini``) are left out silently: they
  are never images, and they come with every archive unzipped on those systems;
- every other file is taken when its extension is an image extension (`IMAGE_SUFFIXES`, any case,
  a broken symbolic link included, so that decoding names it), and otherwise listed in `skipped`
  with the reason; an unreadable folder is listed too;
- a file named directly is taken whatever its extension (decoding says if it is not an image),
  unless it is OS metadata (then it is listed in `skipped`); with
  ``read_lists=True`` a ``.csv`` named directly gives the paths in its `path` (else `image`) column,
  resolved by `resolve_listed_path`.

Nothing a user named is dropped without a word.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from skindistil.data.records import Problem
from skindistil.errors import CSVError, DataError

# What the decoder reads (HEIC/HEIF with the optional pillow-heif; a clear error without it).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif"}
)
# Names (lower case) of operating-system metadata; every name starting with "." is hidden as well.
OS_METADATA_NAMES = frozenset(
    {"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin", "system volume information"}
)
# Columns of a path list (CSV) that hold image paths, in order of preference.
PATH_COLUMNS = ("path", "image")
_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\|//)")


@dataclass
class Discovery:
    """What `discover_images` found.

    files: the image files to read, in order, each once. skipped: the files (and folders reached a
    second time through links, and empty or impossible cells of path lists) not taken, each with the
    reason. unsearched: folders that could not be read, with the reason (images may hide there).
    ignored: how many hidden or operating-system metadata entries were left out silently.
    """

    files: list[Path] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    unsearched: list[Problem] = field(default_factory=list)
    ignored: int = 0

    @property
    def not_taken(self) -> list[Problem]:
        """Everything named or found that is not in `files`, with the reason (skipped + unsearched)."""
        return [*self.skipped, *self.unsearched]


def is_hidden_or_os_metadata(name: str) -> bool:
    """True for hidden names (".x", macOS "._x" AppleDouble files) and OS metadata (`OS_METADATA_NAMES`)."""
    return name.startswith(".") or name.lower() in OS_METADATA_NAMES


def discover_images(inputs: Iterable[str | Path], *, read_lists: bool = False) -> Discovery:
    """Expand files, folders (recursively) and, with `read_lists`, CSV path lists into image files.

    See the module docstring for the rules. Order: inputs in the order given, a folder's files
    sorted by path; a file reached twice (a relative and an absolute path, a link) is kept once.
    Raises CSVError for a path list that cannot be read or has no path column.
    """
    found = Discovery()
    taken: dict[str, Path] = {}  # real path -> the path as found, first one kept
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for real, file in _walk(path, found):
                taken.setdefault(real, file)
        elif read_lists and path.suffix.lower() == ".csv" and path.is_file():
            listed, empty = read_path_list(path)
            for file in listed:
                taken.setdefault(os.path.realpath(file), file)
            found.skipped.extend(empty)
        elif path.name.startswith("._") or path.name.lower() in (*OS_METADATA_NAMES, ".ds_store"):
            found.skipped.append(Problem(str(path), _metadata_reason(path.name)))
        else:  # named directly: a missing or unreadable file is reported when decoded
            taken.setdefault(os.path.realpath(path), path)
    found.files = list(taken.values())
    return found


def read_path_list(path: Path) -> tuple[list[Path], list[Problem]]:
    """The image paths of a CSV (its `path`, else `image` column), resolved by `resolve_listed_path`.

    Returns (paths, problems): an empty cell or a path that cannot exist here (a Windows drive path)
    is a problem naming the row (the header is row 1). Raises CSVError when the CSV cannot be read or
    has no path column.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CSVError(path, f"cannot read the CSV ({exc})") from None
    column = next((c for c in PATH_COLUMNS if c in table.columns), None)
    if column is None:
        raise CSVError(
            path,
            f"no column of image paths: expected one of {', '.join(PATH_COLUMNS)} (found: {', '.join(table.columns)})",
        )
    paths, problems = [], []
    for row, value in enumerate(table[column].str.strip(), start=2):  # line 1 is the header
        where = f"{path} row {row}"
        if not value:
            problems.append(Problem(where, f"empty {column!r} cell"))
            continue
        try:
            paths.append(resolve_listed_path(value, path.parent, where))
        except DataError as exc:
            problems.append(Problem(exc.where, exc.reason))
    return paths, problems


def resolve_listed_path(value: str, base: str | Path, where: str) -> Path:
    """A path written in a CSV or path list -> the file it names on this machine.

    Relative paths are relative to `base` (the list's folder); absolute POSIX paths are kept.
    Backslashes are folder separators (lists written on Windows: ``images\\ISIC_x.jpg``) unless a
    file of that literal name exists. A Windows drive or network path (``C:\\data\\x.jpg``,
    ``\\\\server\\x.jpg``) cannot name a file here: DataError naming `where`.
    """
    if _WINDOWS_ABSOLUTE.match(value):
        raise DataError(
            where,
            f"{value!r} is a Windows drive or network path, which does not exist on this machine; "
            "list image paths relative to the CSV's folder",
        )
    literal = Path(base) / value
    if "\\" not in value or literal.exists():
        return literal
    return Path(base) / value.replace("\\", "/")


def _walk(root: Path, found: Discovery) -> list[tuple[str, Path]]:
    """(real path, path) of the image files under `root`, sorted by path; records the rest in `found`.

    Links are followed, each real folder searched once. Works on strings and `os.scandir` entries
    (whose link test costs no system call): Path objects per file took 3x as long on 7,000 files.
    """
    taken: list[tuple[str, str]] = []
    seen_folders: set[str] = set()
    pending = [str(root)]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back up the tree, or a second link to one folder
            found.skipped.append(Problem(folder, f"not taken: folder already searched (it is {real})"))
            continue
        seen_folders.add(real)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            found.unsearched.append(Problem(folder, f"folder cannot be read ({exc.strerror})"))
            continue
        subfolders = []
        for entry in entries:
            if is_hidden_or_os_metadata(entry.name):
                found.ignored += 1
            elif entry.is_dir():  # follows links
                subfolders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                link = entry.is_symlink()
                taken.append((os.path.realpath(entry.path) if link else os.path.join(real, entry.name), entry.path))
            else:
                found.skipped.append(Problem(entry.path, _not_an_image_reason(entry.name)))
        pending.extend(sorted(subfolders, reverse=True))  # depth first, in name order
    taken.sort(key=lambda pair: pair[1].split(os.sep))  # the order of sorted Paths
    return [(real, Path(path)) for real, path in taken]


def _not_an_image_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    what = f"extension {suffix!r}" if suffix else "no extension"
    return f"not taken: {what} is not an image extension ({', '.join(sorted(IMAGE_SUFFIXES))})"


def _metadata_reason(name: str) -> str:
    if name.startswith("._"):
        return "not taken: a macOS AppleDouble metadata file (._*), not an image"
    return "not taken: a hidden or operating-system metadata file, not an image"
