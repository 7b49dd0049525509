"""Image ids as file names: `safe_file_stem`, the one function used wherever an id becomes a file.

Image ids come from users' data: ImageFolder and CSV ids hold sub-folders (``mel/ISIC_0001``), some
hold spaces, colons or non-ASCII letters. A file named after one must stay inside its folder, be
valid on every common file system, and never collide with the file of another id.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# A plain name: ASCII letters, digits, '.', '_', '-', not starting with '.' or '-' (hidden files,
# command-line options), not too long for a file name with a prefix and an extension.
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_PLAIN_LENGTH = 120
_KEPT_LENGTH = 100
_DIGEST_LENGTH = 12


def safe_file_stem(image_id: str) -> str:
    """A file name stem (no extension) for `image_id`, unique to it and readable.

    A plain id (ASCII letters, digits, '.', '_', '-', starting with a letter or digit, at most
    `MAX_PLAIN_LENGTH` characters) is its own stem: ``ISIC_0024306`` -> ``ISIC_0024306``. Any other
    id has each other character replaced by '_', is cut to 100 characters, loses leading '.' and '-'
    (``image`` if nothing is left) and gets '-' and the first 12 hex digits of the SHA-1 of the id
    (UTF-8): ``mel/ISIC_0001`` -> ``mel_ISIC_0001-<12 hex>``, so two ids never share a stem (and a
    changed id never reuses an old file). The stem never holds a path separator, never starts with
    '.' or '-', and is at most 113 ASCII characters.

    Ids differing only in letter case are distinct stems, which a case-insensitive file system
    (macOS, Windows defaults) stores as one file.
    """
    if _PLAIN.fullmatch(image_id) and len(image_id) <= MAX_PLAIN_LENGTH:
        return image_id
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:_DIGEST_LENGTH]
    readable = _UNSAFE.sub("_", image_id)[:_KEPT_LENGTH].lstrip(".-") or "image"
    return f"{readable}-{digest}"


def unique_file_stems(paths: Sequence[str | Path]) -> list[str]:
    """One safe stem per image file, for outputs named after their inputs (explain's PNGs).

    A file whose stem (name without extension) no other input shares is named by that stem; files
    that share one (``mel/x.jpg`` and ``nv/x.jpg``) are named by their whole path without the
    extension, which `safe_file_stem` makes distinct. Returns stems in the order of `paths`.
    """
    stems = [Path(p).stem for p in paths]
    counts = Counter(stems)
    return [
        safe_file_stem(stem if counts[stem] == 1 else str(Path(p).with_suffix("")))
        for stem, p in zip(stems, paths, strict=True)
    ]
