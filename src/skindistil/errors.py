"""Exceptions that name the file, row or field at fault."""

from __future__ import annotations


class SkinDistilError(Exception):
    """Base class: every error skindistil raises on purpose."""


class DataError(SkinDistilError):
    """Bad input data. `where` names the file, row or field; `reason` says what is wrong."""

    def __init__(self, where: str, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")

    def __reduce__(self):
        # picklable across processes (prepare workers, DataLoader workers)
        return (type(self), (self.where, self.reason))


class ImageError(DataError):
    """An image that cannot be used: missing, empty, corrupt, truncated, not an image, too large."""


class CSVError(DataError):
    """A CSV with missing columns, bad rows, unknown labels or duplicate ids."""


class ModelError(SkinDistilError):
    """A model, artifact or weight file that cannot be built or loaded."""


class BackendUnavailable(ModelError):
    """An inference backend that cannot run on this machine (missing provider, package or device)."""


class ConfigError(SkinDistilError):
    """An invalid configuration value or override."""


class WriteError(SkinDistilError):
    """A file or folder that could not be written (disk full, read-only file system, no permission).
    `path` names it, `reason` says why; the previous version of the file, if any, is left intact."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))
