"""Atomic file writes: the one writer of every file the project produces.

A file is first written to a temporary file in the destination folder, flushed to disk with
``fsync``, then moved onto the destination with :func:`os.replace`, so a reader (or a process killed
mid-write) sees either the old file or the complete new one, never a partial file. The temporary
file is created like a normal ``open(path, "w")`` would create the destination (mode
``0o666 & ~umask``, not :func:`tempfile.mkstemp`'s ``0o600``) and is removed when the write fails.
"""
import contextlib
import json
import math
import os
import secrets
from typing import IO, Any, Iterator, Optional, Union

import numpy as np

__all__ = ["atomic_path", "atomic_write", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def _create_temporary(path: str) -> str:
    """Create an empty, new file next to ``path`` (same extension) with the umask's permissions."""
    directory, name = os.path.split(path)
    stem, extension = os.path.splitext(name)
    while True:
        tmp_path = os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.tmp{extension}")
        try:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp_path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path for a writer that takes a file name (OpenCV, cityscapesScripts...).

    The block writes the temporary file (same folder and extension as ``path``; it exists, empty);
    on success it is fsynced and replaces ``path``, on any exception it is removed and ``path`` is
    left as it was. Missing parent folders are created.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = _create_temporary(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", newline: Optional[str] = None) -> Iterator[IO[Any]]:
    """Yield a file object (``mode`` ``"wb"`` or ``"w"``) whose contents replace ``path`` atomically
    when the block ends without an exception (see :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp_path:
        with open(tmp_path, mode, newline=newline) as f:
            yield f


def _json_ready(value: Any) -> Any:
    """``value`` with NumPy scalars turned into Python numbers and NaN / infinities into None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> None:
    """Write ``obj`` as JSON, atomically; NaN and infinities become null, NumPy scalars numbers.

    ``indent=None`` writes compact JSON (large dataset files).
    """
    with atomic_write(path, "w") as f:
        json.dump(_json_ready(obj), f, indent=indent)
