"""Atomic file writes: every file skindistil writes goes through here.

A file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over the
target (`os.replace`, atomic on POSIX) and the folder entry fsync'ed. A write that fails (disk full,
read-only file system, no permission, a kill) therefore never truncates or replaces a good file: the
target is either the old complete file or the new complete one, and the temporary file is removed.
A failure raises `WriteError` naming the target and the reason (ENOSPC, EROFS, EACCES, ...).

Temporary files are named `NAME.PID.RANDOM.tmp`; a killed process can leave one behind, never a
half-written NAME.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from skindistil.errors import WriteError

TMP_SUFFIX = ".tmp"


def jsonable(value: Any) -> Any:
    """Plain JSON types, for strict JSON that browsers read: tuples -> lists, numpy and torch scalars and
    arrays -> numbers and lists, Paths -> strings, dict keys -> strings, NaN and infinities -> null.
    TypeError for a key JSON has no form for (a tuple, an object); ValueError when two keys become one
    string (1 and "1"), which json.dumps would write twice and a reader would read as one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, numbers.Real)) and key is not None:  # numbers: numpy's too
                raise TypeError(f"a {type(key).__name__} key ({key!r}) has no JSON form")
            name = str(key)
            if name in out:
                raise ValueError(f"keys {name!r} and {key!r} both become {name!r} in JSON")
            out[name] = jsonable(item)
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if callable(getattr(value, "tolist", None)) and not isinstance(value, (str, bytes)):  # numpy, torch
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def file_sha256(path: str | Path) -> str:
    """sha256 (hex digest) of a file's bytes, read in 1 MiB blocks. OSError when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_os_error(exc: OSError) -> str:
    """'No space left on device (ENOSPC)': the strerror and the symbolic errno name."""
    code = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({code})" if code else reason


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable; some file systems cannot open or fsync a folder: nothing to do there
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Every file gets the permissions a plain open() would give it: some writers (safetensors) create
# their file 0600, and an artifact copied to a server for another user must be readable there.
FILE_MODE = _file_mode()


def temporary_path(path: str | Path) -> Path:
    """A fresh temporary name next to `path` (same folder, so the final rename stays on one file system)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, verify: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that only takes a file name (safetensors,
    matplotlib, torch.onnx, onnxruntime); on success fsync it, run `verify(tmp)` if given (it checks
    the file and may raise to abort; it runs just before the rename), and rename it to `path`. On any
    failure the temporary file is removed and `path` is left as it was.

    Raises WriteError(path, reason) for an OSError (disk full, read-only, permission); exceptions of
    the writer or `verify` other than OSError propagate unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(path.parent, f"cannot create the folder: {describe_os_error(exc)}") from exc
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, FILE_MODE)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(path, f"cannot write: {describe_os_error(exc)}; nothing was replaced") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
                ) -> Iterator[IO]:
    """`open()` on a temporary file that replaces `path` when the block ends without an error.
    `mode` is "w" (text, `encoding`, `newline`) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    text = mode == "w"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding if text else None,
                                        newline=newline if text else None) as f:
        yield f
        f.flush()


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 with '\\n' line ends."""
    with atomic_open(path, "w", newline="\n") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dumps_kwargs) -> Path:
    """`data` as strict JSON (through `jsonable`: NaN and infinities are written as null, which every JSON
    reader accepts, not as the bare NaN Python's json writes by default), indented, plus a final newline."""
    dumps_kwargs.setdefault("allow_nan", False)
    return write_text(path, json.dumps(jsonable(data), indent=indent, **dumps_kwargs) + "\n")


def write_csv(path: str | Path, frame, **to_csv_kwargs) -> Path:
    """A pandas DataFrame as CSV (`DataFrame.to_csv` options; index=False unless given)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_open(path, "w", newline="") as f:
        frame.to_csv(f, **to_csv_kwargs)
    return Path(path)


def save_npy(path: str | Path, array) -> Path:
    """A NumPy array in .npy format (no pickle)."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """`fig.savefig` into `path` (format taken from the suffix unless `format` is given)."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **savefig_kwargs)
    return path


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` (contiguous CPU tensors)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def save_torch(obj: Any, path: str | Path, *, verify: Callable[[Path], Any] | None = None) -> Path:
    """`torch.save` (e.g. a Lightning checkpoint dict); `verify(tmp)` checks the file before it replaces `path`.

    Serialised in memory first (as Lightning does): torch's zip writer turns a failed file write
    into a RuntimeError without the reason, a plain write keeps the OSError (ENOSPC, ...)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path, verify=verify) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
    return Path(path)
