"""Sources for the ISIC challenge layouts besides 2019: 2016-2018 (task 3 / part 3), SIIM-ISIC 2020, ISIC 2024.

Each reads the files as the challenge ships them, under their official names, from the dataset folder
(`root`) or the folder a zip unpacks to (``root/<name without .csv>/<name>.csv``):

- ``isic2016``: ISBI2016_ISIC_Part3_Training_GroundTruth.csv, no header, ``image,benign|malignant``
  (the test file writes 0/1); images in ISBI2016_ISIC_Part3_Training_Data/. Classes benign, malignant.
- ``isic2017``: ISIC-2017_Training_Part3_GroundTruth.csv, ``image_id,melanoma,seborrheic_keratosis``;
  images in ISIC-2017_Training_Data/ (its superpixel PNGs are not images of a lesion and never match
  an id); optional ISIC-2017_Training_Data_metadata.csv (age_approximate, sex). Classes MEL, NV, BKL:
  seborrheic keratosis is labelled BKL, the ISIC 2018/2019 class that contains it, and an image with
  neither flag set is NV, as the challenge defines it.
- ``isic2018``: ISIC2018_Task3_Training_GroundTruth.csv, ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``;
  images in ISIC2018_Task3_Training_Input/; lesion groups from
  ISIC2018_Task3_Training_LesionGroupings.csv when present. The classes keep the challenge's names:
  AKIEC is not ISIC 2019's AK, because ISIC 2019 relabelled these images as AK *or* SCC (see
  `vocab.ISIC2018`); the 8 ISIC 2019 labels of the same images come with
  ``--source ham10000 --labels isic2019``.
- ``isic2020``: train.csv (Kaggle) or ISIC_2020_Training_GroundTruth[_v2].csv (ISIC archive):
  image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis,
  benign_malignant, target; JPEGs in train/, jpeg/train/ or ISIC_2020_Training_JPEG/train/. Grouped by
  patient. ``labels="target"`` (default): benign, malignant; ``labels="diagnosis"``: the diagnosis
  values, where "unknown" is not a class (those images are left out, and a note says how many).
- ``isic2024``: train-metadata.csv (isic_id, patient_id, target, age_approx, sex,
  anatom_site_general, lesion_id, ...) with train-image.hdf5 (JPEG bytes keyed by isic_id; needs
  h5py, the ``hdf5`` extra) or a JPEG folder (train-image/image/). Grouped by patient; benign, malignant.

Every source keeps age, sex, anatomical site, patient and lesion ids as `standard_metadata`. The
challenges' validation and test sets are prepared the same way with ``ground_truth`` (and
``image_dirs``) pointing at their files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from PIL import Image

from skindistil.data.imageio import DEFAULT_MAX_PIXELS, read_image
from skindistil.data.records import Record, standard_metadata
from skindistil.data.sources import (
    RowIds,
    Source,
    _image_index,
    _require_root,
    find_isic_image,
    read_csv_table,
    read_onehot_ground_truth,
    register_source,
    row_where,
)
from skindistil.data.vocab import BINARY, ISIC2017, ISIC2018, ClassVocab
from skindistil.errors import CSVError, DataError, ImageError

# One labelled row of a ground truth: (row number, image id, label index, metadata, group or None).
Labelled = tuple[int, str, int, dict[str, str], str | None]


class ChallengeSource(Source):
    """Base of the challenge layouts: a ground-truth CSV found under root by its official name(s),
    images in the official folders (or `image_dirs`). Subclasses parse the table in `labelled()`."""

    GROUND_TRUTH: ClassVar[tuple[str, ...]] = ()
    IMAGE_FOLDERS: ClassVar[tuple[str, ...]] = (".", "images")
    WHAT: ClassVar[str] = "ground truth"

    def __init__(
        self,
        root: str | Path | None,
        *,
        ground_truth: str | Path | None = None,
        image_dirs: Sequence[str | Path] | None = None,
        on_error: str = "fail",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__(root, on_error=on_error, max_pixels=max_pixels)
        _require_root(self.root, self.name)
        self._ground_truth = Path(ground_truth) if ground_truth else None
        self.image_dirs = [Path(d) for d in image_dirs] if image_dirs else None

    @classmethod
    def find_official(cls, root: Path, names: Sequence[str]) -> Path | None:
        """The first of `names` found in root/ or in the folder its zip unpacks to (root/<stem>/)."""
        for name in names:
            for candidate in (root / name, root / Path(name).stem / name):
                if candidate.is_file():
                    return candidate
        return None

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and cls.find_official(path, cls.GROUND_TRUTH) is not None

    @property
    def ground_truth(self) -> Path:
        if self._ground_truth is not None:
            return self._ground_truth
        found = self.find_official(self.root, self.GROUND_TRUTH)
        if found is None:
            raise DataError(self.root, f"no {self.WHAT} found (looked for {', '.join(self.GROUND_TRUTH)})")
        return found

    def labelled(self) -> list[Labelled]:
        raise NotImplementedError

    def _binary_target(self, ids: RowIds, image: str, row: int, where: str, value: str) -> int | None:
        """The 0/1 `target` of a row whose image id is new (see RowIds); None (reported) otherwise."""
        if not ids.claim(image, row, where):
            return None
        if value not in ("0", "1", "0.0", "1.0"):
            self._problem(where, f"image {image}: target {value!r} is not 0 or 1")
            return None
        return int(float(value))

    def records(self) -> list[Record]:
        labelled = self.labelled()
        index = _image_index(self.root, self.IMAGE_FOLDERS, self.image_dirs)
        records = []
        for row, image, label, meta, group in labelled:
            path = find_isic_image(index, image)
            if path is None:
                self._problem(row_where(self.ground_truth, row), f"image {image!r} not found under {self.root}",
                              DataError)
                continue
            records.append(Record(image, str(path), label, group=group, meta=meta))
        return records

    def fingerprint(self) -> str:
        return f"{self.name}:{self.ground_truth}"


# --------------------------------------------------------------------------- ISIC 2016-2018


@register_source("isic2016")
class ISIC2016Source(ChallengeSource):
    """ISIC 2016 part 3 (ISBI 2016): a header-less CSV of image id and benign/malignant (or 0/1)."""

    GROUND_TRUTH = ("ISBI2016_ISIC_Part3_Training_GroundTruth.csv",)
    IMAGE_FOLDERS = (".", "images", "ISBI2016_ISIC_Part3_Training_Data")
    WHAT = "ISIC 2016 part 3 ground truth"
    _VALUES: ClassVar[dict[str, int]] = {"benign": 0, "malignant": 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1}

    def __init__(self, root, **options):
        super().__init__(root, **options)
        self.vocab = BINARY

    def labelled(self) -> list[Labelled]:
        path = self.ground_truth
        if not path.is_file():
            raise DataError(path, f"{self.WHAT} not found")
        try:
            table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=False)
        except pd.errors.EmptyDataError:
            raise CSVError(path, f"empty {self.WHAT}") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise CSVError(path, f"unreadable {self.WHAT}: {exc}") from None
        if table.shape[1] != 2:
            raise CSVError(path, f"expected 2 columns (image, benign/malignant) and no header, found {table.shape[1]}")
        table = table.apply(lambda col: col.str.strip())
        table.index = table.index + 1  # no header: row n is line n
        if table.iat[0, 1].lower() not in self._VALUES:  # a header line some copies add
            table = table.iloc[1:]
        out: list[Labelled] = []
        ids = RowIds("image", self._problem)
        for row, image, value in zip(table.index, table[0], table[1], strict=True):
            where = row_where(path, row)
            if (not image and not value) or not ids.claim(image, row, where):
                continue
            if value.lower() not in self._VALUES:
                self._problem(where, f"image {image}: label {value!r} is not benign/malignant or 0/1")
                continue
            out.append((row, image, self._VALUES[value.lower()], {}, None))
        return out


@register_source("isic2017")
class ISIC2017Source(ChallengeSource):
    """ISIC 2017 part 3: melanoma and seborrheic_keratosis flags; classes MEL, NV, BKL (see module doc)."""

    GROUND_TRUTH = ("ISIC-2017_Training_Part3_GroundTruth.csv",)
    IMAGE_FOLDERS = (".", "images", "ISIC-2017_Training_Data")
    METADATA = ("ISIC-2017_Training_Data_metadata.csv", "ISIC-2017_Training_Data/ISIC-2017_Training_Data_metadata.csv")
    WHAT = "ISIC 2017 part 3 ground truth"

    def __init__(self, root, *, metadata: str | Path | None = None, **options):
        super().__init__(root, **options)
        self.vocab = ISIC2017
        self.metadata = Path(metadata) if metadata else None

    def labelled(self) -> list[Labelled]:
        self.notes.append("ISIC 2017: seborrheic_keratosis is labelled BKL (the ISIC 2018/2019 benign keratosis "
                          "class that contains it); an image with neither flag set is NV")
        # flag columns (melanoma, seborrheic_keratosis) -> indices 0, 1; neither set -> 2
        rows = read_onehot_ground_truth(self.ground_truth, ["melanoma", "seborrheic_keratosis"], self.WHAT,
                                        self._problem, id_column="image_id", none_label=2)
        label_of = [ISIC2017.index(name) for name in ("MEL", "BKL", "NV")]
        meta = self._metadata()
        out = []
        for row, image, index in rows:
            fields = meta.get(image, {})
            info = standard_metadata(age=fields.get("age_approximate"), sex=fields.get("sex"))
            out.append((row, image, label_of[index], info, None))
        return out

    def _metadata(self) -> dict[str, dict[str, str]]:
        """image_id -> its metadata row; empty without a metadata file."""
        path = self.metadata or next((self.root / m for m in self.METADATA if (self.root / m).is_file()), None)
        if path is None:
            return {}
        table = read_csv_table(path, ["image_id"], "ISIC 2017 metadata")
        return {fields["image_id"]: fields for fields in table.to_dict("records")}


@register_source("isic2018")
class ISIC2018Source(ChallengeSource):
    """ISIC 2018 task 3 (HAM10000 as the challenge shipped it): one-hot MEL..VASC with AKIEC -> AK."""

    GROUND_TRUTH = ("ISIC2018_Task3_Training_GroundTruth.csv",)
    IMAGE_FOLDERS = (".", "images", "ISIC2018_Task3_Training_Input")
    GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
    COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    WHAT = "ISIC 2018 task 3 ground truth"

    def __init__(self, root, *, metadata: str | Path | None = None, **options):
        super().__init__(root, **options)
        self.vocab = ISIC2018
        self.metadata = Path(metadata) if metadata else None

    def labelled(self) -> list[Labelled]:
        self.notes.append(
            "ISIC 2018: class AKIEC (actinic keratosis and Bowen's disease) keeps its name: ISIC 2019 relabelled these "
            "images as AK or SCC, so it is neither ISIC 2019 class (for the 8 ISIC 2019 labels of these images use "
            "--source ham10000 --labels isic2019)"
        )
        rows = read_onehot_ground_truth(self.ground_truth, self.COLUMNS, self.WHAT, self._problem)
        lesions = self._lesions()
        if not lesions:
            self.notes.append(
                f"ISIC 2018: no {self.GROUPINGS} (pass it with --metadata): images are split one by one, and "
                "HAM10000 holds several images of many lesions, so one lesion can fall on both sides of a split"
            )
        out = []
        for row, image, index in rows:  # COLUMNS and the vocabulary share one order
            lesion = lesions.get(image, "")
            out.append((row, image, index, standard_metadata(lesion_id=lesion), lesion or None))
        return out

    def _lesions(self) -> dict[str, str]:
        path = self.metadata or self.find_official(self.root, (self.GROUPINGS,))
        if path is None:
            return {}
        table = read_csv_table(path, ["image", "lesion_id"], "ISIC 2018 lesion groupings")
        return dict(zip(table["image"], table["lesion_id"], strict=True))


# --------------------------------------------------------------------------- SIIM-ISIC 2020


@register_source("isic2020")
class ISIC2020Source(ChallengeSource):
    """SIIM-ISIC 2020: train.csv / ISIC_2020_Training_GroundTruth*.csv, grouped by patient_id."""

    GROUND_TRUTH = ("train.csv", "ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv")
    IMAGE_FOLDERS = (".", "images", "train", "jpeg/train", "ISIC_2020_Training_JPEG", "ISIC_2020_Training_JPEG/train")
    REQUIRED = ("image_name", "patient_id", "target")
    LABEL_SETS = ("target", "diagnosis")
    WHAT = "SIIM-ISIC 2020 ground truth"

    def __init__(self, root, *, labels: str = "target", **options):
        super().__init__(root, **options)
        if labels not in self.LABEL_SETS:
            raise DataError("labels", f"isic2020 takes {' or '.join(self.LABEL_SETS)}, got {labels!r}")
        self.labels = labels
        self._vocab = BINARY if labels == "target" else None

    @classmethod
    def detect(cls, path: Path) -> bool:
        found = path.is_dir() and cls.find_official(path, cls.GROUND_TRUTH)
        return bool(found) and set(cls.REQUIRED) <= set(_header(found))

    @property
    def vocab(self) -> ClassVocab:
        if self._vocab is None:
            diagnoses = {d for d in self._table()["diagnosis"] if not _unknown(d)}
            if not diagnoses:
                raise DataError(self.ground_truth, "no diagnosis other than 'unknown': nothing to use as classes")
            self._vocab = ClassVocab(sorted(diagnoses))
        return self._vocab

    def _table(self) -> pd.DataFrame:
        required = [*self.REQUIRED, *(["diagnosis"] if self.labels == "diagnosis" else [])]
        return read_csv_table(self.ground_truth, required, self.WHAT)

    def labelled(self) -> list[Labelled]:
        table, vocab, path = self._table(), self.vocab, self.ground_truth
        site = "anatom_site_general_challenge" if "anatom_site_general_challenge" in table.columns else "anatom_site_general"
        out: list[Labelled] = []
        ids = RowIds("image_name", self._problem)
        unknown = 0
        for row, fields in zip(table.index, table.to_dict("records"), strict=True):
            where, image = row_where(path, row), fields["image_name"]
            target = self._binary_target(ids, image, row, where, fields["target"])
            if target is None:
                continue
            verdict = fields.get("benign_malignant", "")
            if verdict and verdict != BINARY.names[target]:
                self._problem(where, f"image {image}: target {fields['target']} contradicts benign_malignant {verdict!r}")
                continue
            if self.labels == "diagnosis":
                if _unknown(fields["diagnosis"]):
                    unknown += 1
                    continue
                label = vocab.index(fields["diagnosis"])
            else:
                label = target
            patient = fields["patient_id"]
            info = standard_metadata(age=fields.get("age_approx"), sex=fields.get("sex"), site=fields.get(site),
                                     patient_id=patient, lesion_id=fields.get("lesion_id"))
            out.append((row, image, label, info, patient or None))
        if unknown:
            self.notes.append(f"SIIM-ISIC 2020: {unknown} image(s) with diagnosis 'unknown' left out (not a class)")
        return out

    def fingerprint(self) -> str:
        return f"isic2020:{self.ground_truth}:labels={self.labels}"


# --------------------------------------------------------------------------- ISIC 2024 (SLICE-3D)


@register_source("isic2024")
class ISIC2024Source(ChallengeSource):
    """ISIC 2024 SLICE-3D: train-metadata.csv with train-image.hdf5 or a JPEG folder; patient groups.

    The HDF5 file is used when present (unless `image_dirs` is given); records then point at
    ``<file>.hdf5#<isic_id>`` and are decoded from the stored JPEG bytes.
    """

    GROUND_TRUTH = ("train-metadata.csv",)
    HDF5 = "train-image.hdf5"
    IMAGE_FOLDERS = ("train-image/image", "train-image", "image", "images", ".")
    REQUIRED = ("isic_id", "patient_id", "target")
    WHAT = "ISIC 2024 metadata"

    def __init__(self, root, *, hdf5: str | Path | None = None, **options):
        super().__init__(root, **options)
        self.vocab = BINARY
        self._hdf5 = Path(hdf5) if hdf5 else None
        self._handle: Any = None  # the open HDF5 file, per process

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # an h5py file does not cross processes; each worker opens its own
        return state

    @property
    def hdf5(self) -> Path | None:
        if self._hdf5 is not None:
            return self._hdf5
        if self.image_dirs is None and (self.root / self.HDF5).is_file():
            return self.root / self.HDF5
        return None

    def labelled(self) -> list[Labelled]:
        path = self.ground_truth
        table = read_csv_table(path, self.REQUIRED, self.WHAT)
        out: list[Labelled] = []
        ids = RowIds("isic_id", self._problem)
        for row, fields in zip(table.index, table.to_dict("records"), strict=True):
            where, image = row_where(path, row), fields["isic_id"]
            target = self._binary_target(ids, image, row, where, fields["target"])
            if target is None:
                continue
            info = standard_metadata(age=fields.get("age_approx"), sex=fields.get("sex"),
                                     site=fields.get("anatom_site_general"), patient_id=fields["patient_id"],
                                     lesion_id=fields.get("lesion_id"))
            out.append((row, image, target, info, fields["patient_id"] or None))
        return out

    def records(self) -> list[Record]:
        hdf5 = self.hdf5
        if hdf5 is None:
            return super().records()
        keys = set(self._file(hdf5).keys())
        records = []
        for row, image, label, meta, group in self.labelled():
            if image not in keys:
                self._problem(row_where(self.ground_truth, row), f"image {image!r} not in {hdf5}", DataError)
                continue
            records.append(Record(image, f"{hdf5}#{image}", label, group=group, meta=meta))
        return records

    def open(self, record: Record) -> Image.Image:
        hdf5 = self.hdf5
        if hdf5 is None:
            return super().open(record)
        key = record.source.rpartition("#")[2]
        try:
            value = self._file(hdf5)[key][()]
        except KeyError:
            raise ImageError(record.source, f"no entry {key!r} in {hdf5}") from None
        data = value.tobytes() if isinstance(value, np.ndarray | np.void) else bytes(value)
        return read_image(data, max_pixels=self.max_pixels, name=record.source)

    def _file(self, path: Path):
        if self._handle is None:
            try:
                import h5py
            except ImportError:
                raise DataError(path, "reading HDF5 images needs h5py: pip install 'skindistil[hdf5]', or pass the "
                                      "JPEG folder with --image-dir") from None
            try:
                self._handle = h5py.File(path, "r")
            except OSError as exc:
                raise DataError(path, f"not a readable HDF5 file ({exc})") from None
        return self._handle

    def fingerprint(self) -> str:
        return f"isic2024:{self.ground_truth}:{self.hdf5 or 'jpeg'}"


# --------------------------------------------------------------------------- helpers


def _header(path: Path) -> list[str]:
    """Column names of a CSV (first line only); [] when it cannot be read."""
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0, dtype=str).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return []


def _unknown(value: str) -> bool:
    return value.strip().lower() in ("", "unknown")
