"""Atomic file writes and the store's write protocol: one lock, owned temp files, registered writers.

Taught in: book/serving_one_expert (section "Many writers, one store").

* :func:`atomic_write_bytes` writes a temp file ``.<name>.tmp-<pid>@<host>@<random>`` in the same
  folder, ``fsync``-s it and ``os.replace``-s it into place: readers see the old file or the new one.
* :func:`store_lock` is a :class:`filelock.FileLock` on ``<store>/.store.lock``; writers hold it to
  commit (write the manifest) and clean up, readers hold it while they read one version of a store.
* :func:`writing` registers a writer in ``<store>/.writers/`` for as long as it writes.
* :func:`temporary_abandoned`: a temp file is removed only if its owner is provably gone: a dead pid
  on this host, or (names without an owner) older than the lock holder's start.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

__all__ = ["TMP_MARK", "StoreError", "atomic_write_bytes", "fsync_dir", "is_temporary_file", "store_lock",
           "HOST", "writing", "other_live_writers", "temporary_abandoned", "remove_abandoned_temporaries", "pid_alive"]

TMP_MARK = ".tmp-"
LOCK_NAME = ".store.lock"
WRITERS_DIR = ".writers"
HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"\.tmp-(\d+)@([A-Za-z0-9_.-]+)@")
OTHER_HOST_STALE_S = 24 * 3600  # a temp file or writer entry of another machine: presumed gone after a day
_locks: dict[str, FileLock] = {}


class StoreError(ValueError):
    """A store file is missing, truncated, corrupted, tampered with, or the store is busy.

    Taught in: book/serving_one_expert.
    """


def is_temporary_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary file of an atomic write (in flight, or left by a crash).
    Taught in: book/serving_one_expert.
    """
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries to disk (best effort; a no-op where folders cannot be opened).
    Taught in: book/serving_one_expert.
    """
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

    The temp file's name carries this process's pid and host, so a cleaner can tell an abandoned
    temp file from one still being written. On any error the temp file is removed.
    Taught in: book/serving_one_expert.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARK}{os.getpid()}@{HOST}@")
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine. Taught in: book/serving_one_expert."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temporary_abandoned(path: Path, holder_start: float) -> bool:
    """Whether a temp file is provably abandoned (so a cleaner holding the lock may remove it).

    Owned by a dead pid of this host; or by another host and older than a day; or, for a name
    without an owner, last written before ``holder_start`` (the lock holder's start, a Unix time).
    Taught in: book/serving_one_expert.
    """
    match = _OWNER.search(path.name)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    if match is None:
        return mtime < holder_start
    pid, host = int(match.group(1)), match.group(2)
    if host == HOST:
        return pid != os.getpid() and not pid_alive(pid)
    return mtime < time.time() - OTHER_HOST_STALE_S


def remove_abandoned_temporaries(folders: list[Path], holder_start: float) -> list[str]:
    """Remove the abandoned temp files in ``folders`` (call with :func:`store_lock` held); their names.
    Taught in: book/serving_one_expert.
    """
    removed = []
    for folder in folders:
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if is_temporary_file(p) and temporary_abandoned(p, holder_start):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
    return removed


def store_lock(directory: str | os.PathLike[str], timeout: float = 120.0) -> Any:
    """The store's lock (re-entrant in one thread); a no-op for a folder this process cannot write.

    Raises :class:`StoreError` when another process holds it for more than ``timeout`` seconds.
    Taught in: book/serving_one_expert.
    """
    folder = Path(directory)
    if not os.access(folder, os.W_OK):  # a read-only copy: nobody can change it through us
        return nullcontext()
    key = str(folder.resolve())
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = FileLock(str(folder / LOCK_NAME), timeout=timeout)
    return _timed(lock, key, timeout)


@contextmanager
def _timed(lock: FileLock, key: str, timeout: float) -> Iterator[None]:
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StoreError(f"store {key!r} stayed locked by another process for {timeout:g} s; "
                         f"retry later, or remove {LOCK_NAME!r} if no writer is running") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def writing(directory: str | os.PathLike[str]) -> Iterator[float]:
    """Register as a writer of ``directory`` while the block runs. Taught in: book/serving_one_expert."""
    start = time.time()
    reg = Path(directory) / WRITERS_DIR
    reg.mkdir(parents=True, exist_ok=True)
    entry = reg / f"{os.getpid()}@{HOST}@{time.time_ns()}"
    entry.touch()
    try:
        yield start
    finally:
        entry.unlink(missing_ok=True)


def other_live_writers(directory: str | os.PathLike[str]) -> list[str]:
    """Writers of ``directory`` other than this process that may still run (dead entries are dropped).
    Taught in: book/serving_one_expert.
    """
    reg = Path(directory) / WRITERS_DIR
    live = []
    for entry in sorted(reg.iterdir()) if reg.is_dir() else []:
        pid_text, _, rest = entry.name.partition("@")
        host = rest.rpartition("@")[0]
        if not pid_text.isdigit():
            continue
        if host == HOST and int(pid_text) == os.getpid():
            continue
        gone = (not pid_alive(int(pid_text))) if host == HOST else (
            entry.stat().st_mtime < time.time() - OTHER_HOST_STALE_S)
        if gone:
            entry.unlink(missing_ok=True)
        else:
            live.append(entry.name)
    return live
