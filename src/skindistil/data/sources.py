"""Dataset sources: each parses one on-disk layout into Records with an explicit class vocabulary.

A source is a small picklable object (prepare calls `open` in worker processes):

- `records()` parses the layout once and returns every usable Record. With ``on_error="fail"`` the
  first bad row/file raises CSVError/DataError naming it; with ``on_error="skip"`` the item is left
  out and a Problem is appended to `problems`.
- `open(record)` decodes the record's pixels to an RGB PIL image (ImageError naming the file).
- `fingerprint()` is a stable one-line description written into dataset.json.
- `notes` (filled by `records()`) are what the user must know about how the layout was read (a class
  renamed, rows left out on purpose, no lesion grouping); prepare prints them and writes them into
  dataset.json.
- `detect(path)` (a classmethod) says whether a folder or file is this layout; `detect_source` tries
  every source in `DETECTION_ORDER`, which is how `run --data` picks one.

New layouts subclass `Source` and register with ``@register_source("name")``; `build_source`
constructs one by name.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from skindistil.data.discovery import (
    IMAGE_SUFFIXES,
    discover_images,
    is_hidden_or_os_metadata,
    resolve_listed_path,
)
from skindistil.data.imageio import DEFAULT_MAX_PIXELS, read_image, to_rgb
from skindistil.data.records import METADATA_FIELDS, Problem, Record, standard_metadata
from skindistil.data.vocab import HAM10000, ISIC2019, ClassVocab
from skindistil.errors import CSVError, DataError, ImageError

if TYPE_CHECKING:  # pandas is imported where it reads a CSV: `skindistil --help` imports this module
    import pandas as pd

ON_ERROR_CHOICES = ("fail", "skip")

_REGISTRY: dict[str, type[Source]] = {}
# Sources defined outside this module, imported on first use so this module never imports upward.
_LAZY_SOURCES = {
    "synthetic": "skindistil.data.synthetic",
    **dict.fromkeys(("isic2016", "isic2017", "isic2018", "isic2020", "isic2024"), "skindistil.data.isic_challenges"),
}
# The order `detect_source` tries layouts in: specific files first, the ImageFolder tree last. HAM10000
# comes before ISIC 2019 because a HAM10000 folder may also hold ISIC 2019's ground truth for its images.
DETECTION_ORDER = (
    "ham10000", "isic2019", "isic2018", "isic2017", "isic2016", "isic2020", "isic2024", "dermamnist", "csv", "folder",
)


def register_source(name: str):
    """Class decorator: register a Source subclass under `name` (also sets its `name`)."""

    def decorate(cls: type[Source]) -> type[Source]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"source {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_sources() -> list[str]:
    """Names accepted by `build_source` (registered now or importable on demand)."""
    return sorted(set(_REGISTRY) | set(_LAZY_SOURCES))


def source_class(kind: str) -> type[Source]:
    """The Source subclass registered as `kind` (imports lazily registered ones on first use)."""
    if kind not in _REGISTRY and kind in _LAZY_SOURCES:
        importlib.import_module(_LAZY_SOURCES[kind])
    if kind not in _REGISTRY:
        raise DataError("--source", f"unknown source {kind!r}; choose one of {', '.join(available_sources())}")
    return _REGISTRY[kind]


def source_options(kind: str) -> list[str] | None:
    """Options the constructor of source `kind` takes by keyword besides root (None: any, via **kwargs).

    A constructor that passes **kwargs on to its parent's accepts the parent's options too.
    """
    return _init_options(source_class(kind))


def _init_options(cls: type) -> list[str] | None:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # skip self, root
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in params if p.kind in keyword]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return names
    parent = next((base for base in cls.__mro__[1:] if "__init__" in vars(base)), object)
    inherited = _init_options(parent) if parent is not object else None
    return None if inherited is None else [*names, *(n for n in inherited if n not in names)]


def detect_source(path: str | Path) -> str:
    """The name of the first source in `DETECTION_ORDER` that recognises `path` (a folder or file).

    Raises DataError naming the path when none does (the message lists the layouts looked for).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found")
    for kind in DETECTION_ORDER:
        if source_class(kind).detect(path):
            return kind
    raise DataError(
        path,
        "not a recognised dataset: expected an ISIC 2016/2017/2018 (task 3), 2019, 2020 or 2024 folder with its "
        "ground-truth CSV, a HAM10000 folder (HAM10000_metadata.csv), a DermaMNIST .npz, a CSV of paths or an "
        "ImageFolder tree (<class>/<images>, or train|val|test/<class>/<images>)",
    )


def build_source(kind: str, root: str | Path | None, **options) -> Source:
    """Construct the source registered as `kind` reading from `root`; `options` go to its constructor."""
    cls = source_class(kind)
    accepted = source_options(kind)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise DataError(
            f"--source {kind}", f"option(s) {', '.join(unknown)} do not apply; it accepts {', '.join(accepted)}"
        )
    return cls(root, **options)


class Source(abc.ABC):
    """Base class of every dataset source.

    Subclasses set `vocab` in `__init__` and implement `records()`; file-backed sources inherit
    `open`, which reads ``record.source`` as a path with the `max_pixels` decompression-bomb limit.
    Report bad rows/files through `_problem`, which raises or records according to `on_error`.
    (`prepare_dataset` sets `on_error`, `max_pixels` and `problems` on its own copy of the source.)
    """

    name: ClassVar[str] = ""
    vocab: ClassVocab

    def __init__(
        self,
        root: str | Path | None,
        *,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if on_error not in ON_ERROR_CHOICES:
            raise DataError("on_error", f"must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        self.root = Path(root) if root is not None else None
        self.on_error = on_error
        self.max_pixels = int(max_pixels)
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Whether `path` is a dataset in this source's layout (False unless a source says otherwise)."""
        return False

    @abc.abstractmethod
    def records(self) -> list[Record]:
        """Every usable record, in a stable order (bad items raise or go to `problems`)."""

    def open(self, record: Record) -> Image.Image:
        return read_image(record.source, max_pixels=self.max_pixels)

    def fingerprint(self) -> str:
        return f"{self.name}:{self.root}"

    def _problem(self, where: str, reason: str, error: type[DataError] = CSVError) -> None:
        """Raise `error(where, reason)` when failing fast, else remember the skipped item."""
        if self.on_error == "fail":
            raise error(where, reason)
        self.problems.append(Problem(str(where), reason))


# --------------------------------------------------------------------------- shared helpers

def row_where(path: Path, row: int) -> str:
    """How errors name a CSV row. Rows count the header as row 1, as spreadsheets and editors do."""
    return f"{path} row {row}"


class RowIds:
    """The image ids of one CSV, one row each. `claim(image, row, where)` is True for a new id; an
    empty or repeated one is reported through `report(where, reason)` (naming the column, or the row
    that had it first) and is False."""

    def __init__(self, column: str, report: Callable[[str, str], None]):
        self.column, self.report = column, report
        self.first_row: dict[str, int] = {}

    def claim(self, image: str, row: int, where: str) -> bool:
        if not image:
            self.report(where, f"empty {self.column!r} value")
            return False
        if image in self.first_row:
            self.report(where, f"duplicate image id {image!r} (first at row {self.first_row[image]})")
            return False
        self.first_row[image] = row
        return True


def read_csv_table(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV as strings (values stripped), check `required` columns, drop blank lines.

    The index of the returned frame is the row number (header = row 1). Missing file, unreadable
    CSV and missing columns raise at once whatever `on_error` says: nothing in such a file is usable.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        with warnings.catch_warnings():
            # Rows longer than the header make pandas drop data with only a warning: make it an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # skip_blank_lines=False keeps row numbers equal to line numbers; blank rows are dropped below.
            table = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise CSVError(path, f"empty {what} (no header line)") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        raise CSVError(path, f"unreadable {what}: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise CSVError(
            path,
            f"missing column(s) {', '.join(map(repr, missing))} in {what}; "
            f"expected {', '.join(required)}, found {', '.join(table.columns)}",
        )
    table = table.apply(lambda col: col.str.strip())
    table.index = table.index + 2
    return table[(table != "").any(axis=1)]


def index_images(folders: Iterable[Path]) -> dict[str, Path]:
    """Map file stem -> path for the image files directly inside `folders` (earlier folders win).

    Raises DataError naming both files when one folder holds two images of one stem (`x.jpg` and `x.png`):
    which of them a CSV row's id means cannot be told, and taking either would be a guess.
    """
    index: dict[str, Path] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            files = sorted((e.name, e.path) for e in entries if e.is_file() and not e.name.startswith("."))
        here: dict[str, Path] = {}
        for name, path in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if stem in here:
                raise DataError(Path(path), f"two images named {stem!r} in {folder}: {here[stem].name} and {name}; "
                                            "an image id must name one file (remove or rename one)")
            here[stem] = Path(path)
        for stem, path in here.items():
            index.setdefault(stem, path)
    return index


def image_folders(root: Path, candidates: Iterable[str], extra: Sequence[Path] | None) -> list[Path]:
    """Existing folders among `extra` (given by the user) and `candidates` under `root`, deduplicated."""
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    folders: list[Path] = []
    for folder in [*(extra or []), *(root / c for c in candidates)]:
        folder = Path(folder)
        if folder.is_dir() and folder.resolve() not in {f.resolve() for f in folders}:
            folders.append(folder)
    return folders


def _image_index(root: Path, candidates: Iterable[str], extra: Sequence[Path] | None) -> dict[str, Path]:
    candidates = list(candidates)
    folders = image_folders(root, candidates, extra)
    index = index_images(folders)
    if not index:
        looked = [str(f) for f in (extra or [])] + [str(root / c) for c in candidates]
        raise DataError(root, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found; looked in {', '.join(looked)}")
    return index


# ISIC 2019 names some archive images `<archive id>_downsampled`: one image, two names.
ISIC_DOWNSAMPLED_SUFFIX = "_downsampled"


def isic_image_key(image: str) -> str:
    """The ISIC archive id of an image name: `image` without ISIC 2019's `_downsampled` suffix."""
    return image.removesuffix(ISIC_DOWNSAMPLED_SUFFIX)


def find_isic_image(index: dict, image: str):
    """The entry of `index` (name -> file, row, ...) for ISIC image `image`: its exact name, or the name
    with or without ISIC 2019's `_downsampled` suffix; None when there is none."""
    for stem in (image, f"{image}{ISIC_DOWNSAMPLED_SUFFIX}", isic_image_key(image)):
        if stem in index:
            return index[stem]
    return None


def read_onehot_ground_truth(
    path: Path,
    columns: Sequence[str],
    what: str,
    report,
    *,
    id_column: str = "image",
    unknown_column: str | None = None,
    none_label: int | None = None,
) -> list[tuple[int, str, int]]:
    """Parse a one-hot ground-truth CSV (ISIC 2017-2019 style: an id column, one 0/1 column per class).

    Returns (row, image, index into `columns`) per valid row. With `none_label`, a row whose class
    columns are all 0 gets that label (ISIC 2017: neither melanoma nor seborrheic keratosis = nevus).
    `unknown_column`, when the file has it, must be 0 (ISIC 2019's UNK is never a class). A row is
    invalid when a value is not 0/1, the unknown column is 1, not exactly one class is 1 (or more than
    one with `none_label`), the id is empty or repeats an earlier row; `report(where, reason)` is
    called for it.
    """
    import pandas as pd

    names = list(columns)
    table = read_csv_table(path, [id_column, *names], what)
    with_unknown = unknown_column is not None and unknown_column in table.columns
    onehot_columns = [*names, unknown_column] if with_unknown else names
    values = table[onehot_columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    valid_value = (values == 0) | (values == 1)
    rows: list[tuple[int, str, int]] = []
    ids = RowIds(id_column, report)
    for i, (row, image) in enumerate(zip(table.index, table[id_column], strict=True)):
        where = row_where(path, row)
        if not ids.claim(image, row, where):
            continue
        if not valid_value[i].all():
            column = onehot_columns[int(np.argmin(valid_value[i]))]
            report(where, f"image {image}: column {column!r} holds {table.at[row, column]!r}, expected 0 or 1")
            continue
        if with_unknown and values[i, -1] == 1:
            report(where, f"image {image} is labelled {unknown_column}, which is not a class")
            continue
        ones = np.flatnonzero(values[i, : len(names)] == 1)
        if len(ones) == 0 and none_label is not None:
            rows.append((row, image, none_label))
            continue
        if len(ones) != 1:
            set_to = ", ".join(names[j] for j in ones) or "none"
            rule = "at most one class" if none_label is not None else "exactly one class"
            report(where, f"image {image} must have {rule} set to 1 (set: {set_to})")
            continue
        rows.append((row, image, int(ones[0])))
    return rows


def read_isic2019_ground_truth(path: Path, report) -> list[tuple[int, str, int]]:
    """Parse an ISIC 2019 ground-truth CSV (image, MEL..SCC one-hot, optional UNK): (row, image, label
    index in the ISIC 2019 vocabulary) per valid row; see `read_onehot_ground_truth`."""
    return read_onehot_ground_truth(path, ISIC2019.names, "ISIC 2019 ground truth", report, unknown_column="UNK")


def _require_root(root: Path | None, kind: str) -> Path:
    if root is None:
        raise DataError(f"--source {kind}", "needs --root (the dataset folder or file)")
    return root


# --------------------------------------------------------------------------- ISIC 2019


@register_source("isic2019")
class ISIC2019Source(Source):
    """ISIC 2019 training data: ground-truth CSV (one-hot MEL..SCC, UNK) and the image folder.

    Images are found in `image_dirs` (if given), then root/, root/images/,
    root/ISIC_2019_Training_Input/ (and the doubly nested copy some downloads unpack to), in any
    format the decoder reads (data.discovery.IMAGE_SUFFIXES), accepting ISIC's `<id>_downsampled` names. The optional metadata CSV
    (default root/ISIC_2019_Training_Metadata.csv if present) gives lesion_id -> group.
    """

    GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
    METADATA = "ISIC_2019_Training_Metadata.csv"
    IMAGE_FOLDERS = (".", "images", "ISIC_2019_Training_Input", "ISIC_2019_Training_Input/ISIC_2019_Training_Input")

    def __init__(
        self,
        root: str | Path | None,
        *,
        ground_truth: str | Path | None = None,
        metadata: str | Path | None = None,
        image_dirs: Sequence[str | Path] | None = None,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        root = _require_root(self.root, self.name)
        self.vocab = ISIC2019
        self.ground_truth = Path(ground_truth) if ground_truth else root / self.GROUND_TRUTH
        self.metadata = Path(metadata) if metadata else None
        self.image_dirs = [Path(d) for d in image_dirs] if image_dirs else None

    def records(self) -> list[Record]:
        labelled = read_isic2019_ground_truth(self.ground_truth, self._problem)
        metadata = self._read_metadata()
        index = _image_index(self.root, self.IMAGE_FOLDERS, self.image_dirs)
        records = []
        for row, image, label in labelled:
            path = find_isic_image(index, image)
            if path is None:
                self._problem(row_where(self.ground_truth, row), f"image {image!r} not found under {self.root}", DataError)
                continue
            meta = dict(metadata.get(image, {}))
            meta.update(standard_metadata(age=meta.get("age_approx"), sex=meta.get("sex"),
                                          site=meta.get("anatom_site_general"), lesion_id=meta.get("lesion_id")))
            records.append(Record(image, str(path), label, group=meta["lesion_id"] or None, meta=meta))
        return records

    def _read_metadata(self) -> dict[str, dict[str, str]]:
        """image -> its metadata columns (lesion_id among them); empty without a metadata file."""
        path = self.metadata or self.root / self.METADATA
        if self.metadata is None and not path.is_file():
            return {}
        table = read_csv_table(path, ["image", "lesion_id"], "ISIC 2019 metadata")
        out: dict[str, dict[str, str]] = {}
        ids = RowIds("image", self._problem)
        for row, fields in zip(table.index, table.to_dict("records"), strict=True):
            image = fields.pop("image")
            if ids.claim(image, row, row_where(path, row)):
                out[image] = fields
        return out

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / cls.GROUND_TRUTH).is_file()

    def fingerprint(self) -> str:
        return f"isic2019:{self.ground_truth}"


# --------------------------------------------------------------------------- HAM10000


@register_source("ham10000")
class HAM10000Source(Source):
    """HAM10000: HAM10000_metadata.csv (image_id, dx, lesion_id -> group) and its image folders.

    Images are found in `image_dirs` (if given), then root/, root/images/ and every
    root/HAM10000_images* folder (the official release ships _part_1 and _part_2).
    ``labels="dx"`` uses the 7 HAM10000 classes; ``labels="isic2019"`` takes the 8-class label of
    each image from an ISIC 2019 ground-truth CSV (default root/ISIC_2019_Training_GroundTruth.csv).
    """

    METADATA = "HAM10000_metadata.csv"
    IMAGE_FOLDERS = (".", "images")
    LABEL_SETS = ("dx", "isic2019")

    def __init__(
        self,
        root: str | Path | None,
        *,
        labels: str = "dx",
        metadata: str | Path | None = None,
        ground_truth: str | Path | None = None,
        image_dirs: Sequence[str | Path] | None = None,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        root = _require_root(self.root, self.name)
        if labels not in self.LABEL_SETS:
            raise DataError("labels", f"must be one of {', '.join(self.LABEL_SETS)}, got {labels!r}")
        self.labels = labels
        self.vocab = HAM10000 if labels == "dx" else ISIC2019
        self.metadata = Path(metadata) if metadata else root / self.METADATA
        self.ground_truth = Path(ground_truth) if ground_truth else root / ISIC2019Source.GROUND_TRUTH
        self.image_dirs = [Path(d) for d in image_dirs] if image_dirs else None

    def records(self) -> list[Record]:
        table = read_csv_table(self.metadata, ["lesion_id", "image_id", "dx"], "HAM10000 metadata")
        isic_label = {}
        if self.labels == "isic2019":
            isic_label = {image: label for _, image, label in read_isic2019_ground_truth(self.ground_truth, self._problem)}
        index = _image_index(self.root, self._image_folder_names(), self.image_dirs)
        records = []
        ids = RowIds("image_id", self._problem)
        for row, fields in zip(table.index, table.to_dict("records"), strict=True):
            where = row_where(self.metadata, row)
            image, dx, lesion = fields.pop("image_id"), fields["dx"], fields.pop("lesion_id")
            if not ids.claim(image, row, where):
                continue
            if dx not in HAM10000:
                self._problem(where, f"image {image}: unknown dx {dx!r}; known: {', '.join(HAM10000.names)}")
                continue
            if self.labels == "isic2019":
                if image not in isic_label:
                    self._problem(where, f"image {image} has no valid row in {self.ground_truth}")
                    continue
                label = isic_label[image]
            else:
                label = HAM10000.index(dx)
            path = find_isic_image(index, image)
            if path is None:
                self._problem(where, f"image {image!r} not found under {self.root}", DataError)
                continue
            meta = {**fields, **standard_metadata(age=fields.get("age"), sex=fields.get("sex"),
                                                  site=fields.get("localization"), lesion_id=lesion)}
            records.append(Record(image, str(path), label, group=lesion or None, meta=meta))
        return records

    def _image_folder_names(self) -> list[str]:
        parts = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and p.name.lower().startswith("ham10000_images")
        ) if self.root.is_dir() else []
        return [*self.IMAGE_FOLDERS, *parts]

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / cls.METADATA).is_file()

    def fingerprint(self) -> str:
        return f"ham10000:{self.metadata}:labels={self.labels}"


# --------------------------------------------------------------------------- DermaMNIST


@register_source("dermamnist")
class DermaMNISTSource(Source):
    """DermaMNIST (MedMNIST) .npz: {train,val,test}_{images,labels}; the official split is kept.

    `root` is the .npz file or a folder holding exactly one dermamnist*.npz. Labels 0..6 are the
    HAM10000 classes in MedMNIST's documented order (actinic keratoses, basal cell carcinoma,
    benign keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevi, vascular lesions),
    which is the HAM10000 vocabulary akiec, bcc, bkl, df, mel, nv, vasc. Records point at
    ``<file>.npz#<split>/<index>``.
    """

    SPLITS = ("train", "val", "test")
    DOWNLOAD_HINT = (
        "download dermamnist.npz (28 px) or dermamnist_64/_128/_224.npz by hand from "
        "https://zenodo.org/records/10519652 (MedMNIST v3) and pass the file as --root"
    )

    def __init__(self, root: str | Path | None, *, on_error: str = "fail", max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        _require_root(self.root, self.name)
        self.vocab = HAM10000
        self._images: dict[str, np.ndarray] = {}  # per-process cache of decompressed image arrays

    def __getstate__(self) -> dict[str, Any]:
        # Workers reload arrays from the file rather than receive them through a pipe.
        state = self.__dict__.copy()
        state["_images"] = {}
        return state

    @property
    def npz_path(self) -> Path:
        root = self.root
        if root.is_dir():
            found = sorted(root.glob("dermamnist*.npz"))
            if len(found) != 1:
                which = f"found {', '.join(p.name for p in found)}" if found else "found none"
                raise DataError(root, f"expected exactly one dermamnist*.npz in this folder ({which}); {self.DOWNLOAD_HINT}")
            return found[0]
        if not root.is_file():
            raise DataError(root, f"DermaMNIST file not found; {self.DOWNLOAD_HINT}")
        return root

    def records(self) -> list[Record]:
        path = self.npz_path
        shapes = _npz_array_headers(path)
        missing = [f"{split}_{kind}" for split in self.SPLITS for kind in ("images", "labels") if f"{split}_{kind}" not in shapes]
        if missing:
            found = ", ".join(sorted(shapes)) or "none"
            raise DataError(path, f"missing array(s) {', '.join(map(repr, missing))} (found {found})")
        records = []
        for split in self.SPLITS:
            shape, dtype = shapes[f"{split}_images"]
            if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
                raise DataError(path, f"{split}_images must be uint8 (N, H, W[, 1|3]), got {dtype} {shape}")
            labels = _load_npz_array(path, f"{split}_labels").reshape(-1)
            if labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)):
                labels = labels.astype(np.int64)  # integral labels stored as floats
            if labels.dtype.kind not in "iu":
                raise DataError(path, f"{split}_labels must hold integer class indices, got {labels.dtype}")
            if len(labels) != shape[0]:
                raise DataError(path, f"{split}_labels has {len(labels)} entries for {shape[0]} images")
            for i, label in enumerate(labels.tolist()):
                if not (isinstance(label, int) and 0 <= label < len(self.vocab)):
                    self._problem(f"{path}#{split}_labels[{i}]", f"label {label!r} outside 0..{len(self.vocab) - 1}")
                    continue
                records.append(
                    Record(f"dermamnist_{split}_{i:05d}", f"{path}#{split}/{i}", label, split=split, meta={"index": i})
                )
        return records

    def open(self, record: Record) -> Image.Image:
        path, _, ref = record.source.rpartition("#")
        split, _, index = ref.partition("/")
        if split not in self.SPLITS or not index.isdigit():
            raise ImageError(record.source, "not a DermaMNIST reference (<file>.npz#<split>/<index>)")
        if split not in self._images:
            self._images[split] = _load_npz_array(Path(path), f"{split}_images")
        images = self._images[split]
        if int(index) >= len(images):
            raise ImageError(record.source, f"index {index} outside the {len(images)} {split} images")
        pixels = images[int(index)]
        height, width = pixels.shape[:2]
        if width * height > self.max_pixels:
            raise ImageError(record.source, f"image is {width}x{height}, over the limit of {self.max_pixels:,} pixels")
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        return to_rgb(Image.fromarray(pixels), record.source)

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz")))

    def fingerprint(self) -> str:
        return f"dermamnist:{self.npz_path}"


def _npz_array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array in an .npz, read from the .npy headers only."""
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                headers[member.removesuffix(".npy")] = (shape, dtype)
            return headers
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(path, f"not a readable .npz file ({exc})") from None


def _load_npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive[key]
    except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise DataError(path, f"cannot read array {key!r}: {exc}") from None


# --------------------------------------------------------------------------- generic CSV / ImageFolder


def _relative_image_id(path_value: str) -> str:
    """Image id of a listed path: the path without its extension, '/'-separated, no leading '/' or './'."""
    parts = [p for p in path_value.replace("\\", "/").split("/") if p not in ("", ".")]
    parts[-1] = os.path.splitext(parts[-1])[0]
    return "/".join(parts)


@register_source("csv")
class CSVSource(Source):
    """A CSV with columns path,label[,group][,image_id]; `root` is the CSV file.

    Paths are relative to the CSV's folder (absolute paths are kept; backslashes of lists written on
    Windows are folder separators, see `resolve_listed_path`). The vocabulary is the sorted
    set of label names unless `class_names` fixes it (then other labels are errors). The image id
    is the `image_id` column if present, else the path without its extension. Columns named as the
    METADATA_FIELDS (age, sex, site, patient_id, lesion_id, fitzpatrick, ita) go to the manifest.
    """

    def __init__(
        self,
        root: str | Path | None,
        *,
        class_names: Sequence[str] | None = None,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        _require_root(self.root, self.name)
        self._vocab = ClassVocab(class_names) if class_names else None

    @property
    def vocab(self) -> ClassVocab:
        if self._vocab is None:
            labels = self._table()["label"]
            self._vocab = ClassVocab(sorted(set(labels) - {""}))
        return self._vocab

    def _table(self) -> pd.DataFrame:
        if self.root.is_dir():
            raise DataError(self.root, "--source csv needs the CSV file as --root, not a folder")
        return read_csv_table(self.root, ["path", "label"], "image list")

    def records(self) -> list[Record]:
        table = self._table()
        vocab = self.vocab
        folder = self.root.parent
        records = []
        ids = RowIds("path", self._problem)
        for row, fields in zip(table.index, table.to_dict("records"), strict=True):
            where = row_where(self.root, row)
            path_value, label = fields["path"], fields["label"]
            if not path_value or not label:
                self._problem(where, f"empty {'path' if not path_value else 'label'!r} value")
                continue
            if label not in vocab:
                self._problem(where, f"unknown label {label!r}; known classes: {', '.join(vocab.names)}")
                continue
            image_id = fields.get("image_id") or _relative_image_id(path_value)
            if not ids.claim(image_id, row, where):
                continue
            try:
                path = resolve_listed_path(path_value, folder, where)
            except DataError as exc:
                self._problem(exc.where, exc.reason, DataError)
                continue
            if not path.is_file():
                self._problem(where, f"image file {str(path)!r} not found", DataError)
                continue
            group = fields.get("group") or None
            meta = {"row": row, **standard_metadata(**{k: fields[k] for k in METADATA_FIELDS if k in fields})}
            records.append(Record(image_id, str(path), vocab.index(label), group=group, meta=meta))
        return records

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.suffix.lower() == ".csv" and path.is_file()

    def fingerprint(self) -> str:
        return f"csv:{self.root}"


# Top-level folder names that mean a predefined split, never a class (compared case-insensitively).
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


@register_source("folder")
class ImageFolderSource(Source):
    """An ImageFolder tree: root/<class name>/<images> (sub-folders of a class are searched too), or
    one with predefined splits: root/<split>/<class name>/<images>.

    A top-level folder named train/training, val/valid/validation or test/testing (any case) is a
    split, never a class: when there is one, every top-level folder holding images must be one, the
    classes are the folders one level below, and each record carries its split (prepare keeps them;
    a split the tree lacks is drawn from train). The vocabulary is the sorted names of class folders
    holding images (in any split), unless `class_names` fixes it. Images are found by
    `discover_images`: hidden and OS metadata files and folders (``._*``, ``__MACOSX``, ``.DS_Store``,
    ...) are left out; other files without an image extension, and non-image files outside the class
    folders, are listed in `problems` (not taken, whatever `on_error` says); images lying directly
    where class folders are expected, and an unreadable folder, are errors. An image id is the file's
    path relative to root, without extension.
    """

    def __init__(
        self,
        root: str | Path | None,
        *,
        class_names: Sequence[str] | None = None,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        _require_root(self.root, self.name)
        self._vocab = ClassVocab(class_names) if class_names else None

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and any(child.is_dir() and not is_hidden_or_os_metadata(child.name) for child in path.iterdir())

    @property
    def vocab(self) -> ClassVocab:
        if self._vocab is None:
            found = sorted({d.name for _, base in self.layout() for d in _subfolders(base) if self._images_in(d)})
            if not found:
                for _, base in self.layout():
                    if _loose_images(base):
                        raise DataError(base, self._loose_reason(base, _loose_images(base)))
                expected = "<split>/<class>/<images>" if self.layout()[0][0] else "<class>/<images>"
                raise DataError(self.root, f"no class folder with images (expected root/{expected})")
            self._vocab = ClassVocab(found)
        return self._vocab

    def layout(self) -> list[tuple[str | None, Path]]:
        """(split, folder holding the class folders): [(None, root)] for a plain tree, else one per split."""
        if not self.root.is_dir():
            raise DataError(self.root, "image folder not found")
        top = _subfolders(self.root)
        splits = [d for d in top if d.name.lower() in SPLIT_FOLDERS]
        if not splits:
            return [(None, self.root)]
        others = [d.name for d in top if d not in splits and self._images_in(d)]
        if others:
            raise DataError(
                self.root,
                f"mixes split folders ({', '.join(d.name for d in splits)}) with other folders holding images "
                f"({', '.join(others)}); use root/<split>/<class>/<images> or root/<class>/<images>, not both",
            )
        by_split: dict[str, list[str]] = {}
        for d in splits:
            by_split.setdefault(SPLIT_FOLDERS[d.name.lower()], []).append(d.name)
        clashes = [names for names in by_split.values() if len(names) > 1]
        if clashes:
            raise DataError(self.root, f"folders {' and '.join(clashes[0])} name the same split")
        return [(SPLIT_FOLDERS[d.name.lower()], d) for d in splits]

    @staticmethod
    def _images_in(folder: Path) -> list[Path]:
        return discover_images([folder]).files

    def records(self) -> list[Record]:
        vocab = self.vocab
        layout = self.layout()
        records = []
        seen_classes: set[str] = set()
        for path in sorted(self.root.iterdir()) if layout[0][0] is not None else ():
            if path.is_file() and not is_hidden_or_os_metadata(path.name):
                self.problems.append(Problem(str(path), "not taken: outside the split folders (root/<split>/<class>/<images>)"))
        for split, base in layout:
            loose = _loose_images(base)
            if loose:
                self._problem(str(base), self._loose_reason(base, loose), DataError)
            for path in sorted(base.iterdir()):
                if path.is_file() and not is_hidden_or_os_metadata(path.name) and path.name not in loose:
                    self.problems.append(Problem(str(path), "not taken: outside the class folders (<class>/<images>)"))
            folders = {d.name: d for d in _subfolders(base)}
            for name in sorted(set(folders) - set(vocab.names)):
                if self._images_in(folders[name]):
                    reason = f"folder is not one of the given classes {', '.join(vocab.names)}"
                else:
                    reason = "class folder has no images"
                self._problem(str(folders[name]), reason, DataError)
            for label, name in enumerate(vocab.names):
                if name not in folders:
                    if split is None:
                        self._problem(str(base / name), "class folder not found", DataError)
                        seen_classes.add(name)  # reported
                    continue
                found = discover_images([folders[name]])
                self.problems.extend(found.skipped)
                for problem in found.unsearched:
                    self._problem(problem.where, problem.reason, DataError)
                images = found.files
                seen_classes.add(name)
                if not images:
                    self._problem(str(folders[name]), "class folder has no images", DataError)
                for path in images:
                    image_id = path.relative_to(self.root).with_suffix("").as_posix()
                    records.append(Record(image_id, str(path), label, split=split))
        for name in vocab.names:
            if name not in seen_classes:
                # a split-folder tree may lack a class in val or test (prepare reports it), never in every split
                self._problem(f"{self.root}/<split>/{name}", "class folder not found in any split", DataError)
        return self._unique(records)

    @staticmethod
    def _loose_reason(base: Path, loose: list[str]) -> str:
        return (f"{len(loose)} image(s) lie directly here, outside any class folder (e.g. {loose[0]}); expected "
                f"{base}/<class>/<images> (a challenge download such as SIIM-ISIC 2020 or ISIC 2024 needs its "
                "ground-truth CSV next to this folder)")

    def _unique(self, records: list[Record]) -> list[Record]:
        """Records with distinct image ids (`a.jpg` and `a.png` in one folder share the id `a`)."""
        kept: dict[str, Record] = {}
        for record in records:
            if record.image_id in kept:
                first = Path(kept[record.image_id].source).name
                self._problem(record.source, f"duplicate image id {record.image_id!r} (also {first})", DataError)
                continue
            kept[record.image_id] = record
        return list(kept.values())

    def fingerprint(self) -> str:
        return f"folder:{self.root}"


def _loose_images(folder: Path) -> list[str]:
    """Names of the image files directly inside `folder` (not in a sub-folder), sorted."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden_or_os_metadata(p.name))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden_or_os_metadata(d.name))
