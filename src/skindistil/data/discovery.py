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

    files: the image files to read, in order, each once. skipped: the files (and empty or impossible
    cells of path lists) not taken, each with the reason. unsearched: folders that could not be
    searched (unreadable) or were reached twice through links, with the reason. ignored: how many
    hidden or operating-system metadata entries were left out silently.
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


def is_image_name(name: str) -> bool:
    """True when `name` has an image extension (`IMAGE_SUFFIXES`, any case) and is not OS metadata."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not is_hidden_or_os_metadata(name)


def discover_images(inputs: Iterable[str | Path], *, read_lists: bool = False) -> Discovery:
    """Expand files, folders (recursively) and, with `read_lists`, CSV path lists into image files.

    See the module docstring for the rules. Order: inputs in the order given, a folder's files
    sorted by path; a file reached twice (a relative and an absolute path, a link) is kept once.
    Raises CSVError for a path list that cannot be read or has no path column.
    """
    found = Discovery()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            _walk(path, found)
        elif read_lists and path.suffix.lower() == ".csv" and path.is_file():
            listed, empty = read_path_list(path)
            found.files.extend(listed)
            found.skipped.extend(empty)
        elif path.name.startswith("._") or path.name.lower() in (*OS_METADATA_NAMES, ".ds_store"):
            found.skipped.append(Problem(str(path), _metadata_reason(path.name)))
        else:
            found.files.append(path)  # named directly: a missing or unreadable file is reported when decoded
    unique: dict[Path, Path] = {}
    for p in found.files:
        unique.setdefault(Path(os.path.realpath(p)), p)
    found.files = list(unique.values())
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


def _walk(root: Path, found: Discovery) -> None:
    taken: list[Path] = []
    seen_folders: set[str] = set()

    def unreadable(error: OSError) -> None:
        found.unsearched.append(Problem(str(error.filename), f"folder cannot be read ({error.strerror})"))

    for folder, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back up the tree, or a second link to one folder
            found.unsearched.append(Problem(folder, f"folder already searched (it is {real})"))
            dirnames.clear()
            continue
        seen_folders.add(real)
        kept_dirs = [d for d in dirnames if not is_hidden_or_os_metadata(d)]
        found.ignored += len(dirnames) - len(kept_dirs)
        dirnames[:] = sorted(kept_dirs)
        for name in filenames:
            path = Path(folder) / name
            if is_hidden_or_os_metadata(name):
                found.ignored += 1
            elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                taken.append(path)
            else:
                found.skipped.append(Problem(str(path), _not_an_image_reason(name)))
    found.files.extend(sorted(taken))


def _not_an_image_reason(name: str) -> str:
    suffix = os.path.splitext(name)[1]
    what = f"extension {suffix!r}" if suffix else "no extension"
    return f"not taken: {what} is not an image extension ({', '.join(sorted(IMAGE_SUFFIXES))})"


def _metadata_reason(name: str) -> str:
    if name.startswith("._"):
        return "not taken: a macOS AppleDouble metadata file (._*), not an image"
    return "not taken: a hidden or operating-system metadata file, not an image"
