"""Checked safetensors files and the store's write protocol. Taught in: book/serving_one_expert."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open

__all__ = ["StoreError", "HOST", "CHECKSUM_KEY", "atomic_write_bytes", "is_temporary_file", "store_lock", "writing",
           "remove_abandoned_temporaries", "tensor_checksum", "save_expert_file", "read_checked", "load_expert_file",
           "expert_file_ok"]

TMP_MARK = ".tmp-"
LOCK_NAME = ".store.lock"
WRITERS_DIR = ".writers"
HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"(?:^|\.tmp-)(\d+)@([A-Za-z0-9_.-]+)@")  # a temp file's or a writer entry's pid and host
OTHER_HOST_STALE_S = 24 * 3600  # a temp file or writer entry of another machine: presumed gone after a day
CHECKSUM_KEY = "momlp_sha256"
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_locks: dict[str, FileLock] = {}


class StoreError(ValueError):
    """A store file is missing, corrupted or tampered with, or the store is busy. Taught in: book/serving_one_expert."""


# ---------------------------------------------------------------------------- the write protocol
def is_temporary_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an atomic write's temp file (in flight or crashed). Taught in: book/serving_one_expert."""
    name = Path(path).name
    return name.startswith(".") and TMP_MARK in name


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` via the temp file ``.<name>.tmp-<pid>@<host>@<random>``, ``fsync`` and ``os.replace``.
    Taught in: book/serving_one_expert."""
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
        Path(tmp).unlink(missing_ok=True)
        raise
    with suppress(OSError):  # flush the folder entry too; best effort (e.g. Windows cannot open folders)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def _abandoned(path: Path, holder_start: float | None = None) -> bool:
    """Whether a temp file's or writer entry's owner is provably gone: a dead pid here, a day old elsewhere, or, for
    a name without an owner, last written before ``holder_start``."""
    match = _OWNER.search(path.name)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile: not ours to judge
        return False
    if match is None:
        return holder_start is not None and mtime < holder_start
    if match[2] != HOST:
        return mtime < time.time() - OTHER_HOST_STALE_S
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        pass
    return False


def remove_abandoned_temporaries(folders: list[Path], holder_start: float) -> list[str]:
    """Remove (holding :func:`store_lock`) and name the temp files whose owner is gone, or, without an owner,
    written before ``holder_start``. Taught in: book/serving_one_expert."""
    removed = []
    for folder in folders:
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if is_temporary_file(p) and _abandoned(p, holder_start):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


@contextmanager
def store_lock(directory: str | os.PathLike[str], timeout: float = 120.0) -> Iterator[None]:
    """The store's re-entrant :class:`filelock.FileLock` (a no-op for a read-only folder), else StoreError
    after ``timeout`` seconds. Taught in: book/serving_one_expert."""
    folder = Path(directory)
    if not os.access(folder, os.W_OK):  # a read-only copy: nobody can change it through us
        yield
        return
    key = str(folder.resolve())
    lock = _locks.setdefault(key, FileLock(str(folder / LOCK_NAME), timeout=timeout))
    try:
        held = lock.acquire(timeout=timeout)
    except Timeout:
        raise StoreError(f"store {key!r} stayed locked by another process for {timeout:g} s; "
                         f"retry later, or remove {LOCK_NAME!r} if no writer is running") from None
    with held:
        yield


@contextmanager
def writing(directory: str | os.PathLike[str]) -> Iterator[float]:
    """Register as a writer in ``<directory>/.writers/``; yields the start time. Taught in: book/serving_one_expert."""
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
    """Writers of ``directory`` besides this process that may still run (entries of gone writers are removed)."""
    reg = Path(directory) / WRITERS_DIR
    live = []
    for entry in sorted(reg.iterdir()) if reg.is_dir() else []:
        if not _OWNER.match(entry.name) or entry.name.startswith(f"{os.getpid()}@{HOST}@"):
            continue
        if _abandoned(entry):
            entry.unlink(missing_ok=True)
        else:
            live.append(entry.name)
    return live


# ---------------------------------------------------------------------------- checked files
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes, bytes and the metadata. Taught in: book/serving_one_expert."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    h.update(json.dumps({k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    return h.hexdigest()


def _check_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    if not tensors:
        raise ValueError("nothing to save: tensors is empty; pass at least one named tensor")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensors[{name!r}] has dtype {t.dtype}; store one of {sorted(map(str, _DTYPES))}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}; convert values with str() or json.dumps")
    if CHECKSUM_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved for the checksum; rename it")


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors format, byte-reproducible: header keys sorted, tensors in name order."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        blob = bytes(_tensor_bytes(t))
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_expert_file(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Save tensors and metadata as a checked file, atomically; returns its SHA-256.
    Taught in: book/serving_one_expert."""
    meta = dict(metadata or {})
    _check_payload(tensors, meta)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta[CHECKSUM_KEY] = digest = tensor_checksum(cpu, meta)
    atomic_write_bytes(path, _safetensors_bytes(cpu, meta))
    return digest


def read_checked(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(tensors on CPU, metadata without the checksum, checksum)`` of a checked file, or StoreError.
    Taught in: book/serving_one_expert."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"store file {str(p)!r} does not exist; save it first or check the path")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise StoreError(f"{str(p)!r} is not a readable safetensors file (truncated or corrupted?): {exc}; "
                         "re-save it or restore it from a good copy") from None
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise StoreError(f"{str(p)!r} has no {CHECKSUM_KEY!r} checksum in its metadata; only files written by "
                         "momlp_lite.store.save_expert_file can be loaded")
    actual = tensor_checksum(tensors, meta)
    if actual != stored:
        raise StoreError(f"{str(p)!r} fails its checksum (stored {stored[:12]}…, contents hash {actual[:12]}…): "
                         "the file was corrupted or tampered with; re-save it")
    return tensors, meta, actual


def load_expert_file(path: str | os.PathLike[str], device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors on device, metadata)`` of a checked file. Taught in: book/serving_one_expert."""
    tensors, meta, _ = read_checked(path)
    return {k: v.to(device) for k, v in tensors.items()}, meta


def expert_file_ok(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`read_checked` would succeed. Taught in: book/serving_one_expert."""
    try:
        read_checked(path)
    except StoreError:
        return False
    return True
