"""Class vocabularies: the names of a label space, in the order of the model's outputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from skindistil.errors import DataError


@dataclass(frozen=True)
class ClassVocab:
    """An ordered set of class names. Index i is output i of a classifier."""

    names: tuple[str, ...]

    def __init__(self, names: Iterable[str]):
        names = tuple(str(n) for n in names)
        if not names:
            raise DataError("classes", "a class vocabulary needs at least one class")
        if len(set(names)) != len(names):
            raise DataError("classes", f"duplicate class names in {list(names)}")
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise DataError("label", f"unknown class {name!r}; known classes: {', '.join(self.names)}") from None

    def to_list(self) -> list[str]:
        return list(self.names)

    def counts(self, labels: Sequence[int]) -> dict[str, int]:
        out = dict.fromkeys(self.names, 0)
        for label in labels:
            out[self.names[label]] += 1
        return out


# ISIC 2019 order (SPEC.md). The ground-truth CSV's UNK column is never a class.
ISIC2019 = ClassVocab(["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"])
# HAM10000 `dx` codes, alphabetical as in the dataset's documentation.
HAM10000 = ClassVocab(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
# ISIC 2018 task 3, as the challenge names and orders them. AKIEC (actinic keratosis and Bowen's disease)
# is not renamed AK: ISIC 2019 relabelled those images as AK or SCC (HAM10000's 228 AKIEC images in the
# shared data: 91 AK, 137 SCC), so no ISIC 2019 name fits the class.
ISIC2018 = ClassVocab(["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"])
# ISIC 2017 part 3 in ISIC 2019's names and order: seborrheic keratosis belongs to BKL.
ISIC2017 = ClassVocab(["MEL", "NV", "BKL"])
# Benign vs malignant (ISIC 2016, SIIM-ISIC 2020 and ISIC 2024 targets: 0 = benign, 1 = malignant).
BINARY = ClassVocab(["benign", "malignant"])
# Cancer vs non-cancer view used by the reports.
CANCER_CLASSES = frozenset({"MEL", "BCC", "SCC", "mel", "bcc", "malignant", "melanoma"})
# Melanoma vs rest view (operating points): the melanoma class under its names in the vocabularies above.
MELANOMA_CLASSES = frozenset({"MEL", "mel", "melanoma"})
