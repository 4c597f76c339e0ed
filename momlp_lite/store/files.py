"""Atomic file writes: readers see either the old file or the whole new one, never a partial file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["TMP_MARK", "atomic_write_bytes", "fsync_dir", "is_temporary_file"]

TMP_MARK = ".tmp-"


def is_temporary_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a leftover temporary file of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries to disk (best effort; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same folder, are flushed and ``fsync``-ed, then
    ``os.replace`` puts them in place (atomic on POSIX and Windows) and the folder is synced.
    On any error (or interrupt) the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(target.parent)
    return target
