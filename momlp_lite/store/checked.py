"""Checked tensor files: safetensors written byte-reproducibly, with a SHA-256 of their contents, loaded safely.

Taught in: book/serving_one_expert. safetensors holds raw tensor bytes and JSON only, so loading a
tampered file can fail but can never execute code (unlike pickle-based ``torch.load``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from . import files
from .files import StoreError

__all__ = ["CHECKSUM_KEY", "tensor_checksum", "save_expert_file", "load_expert_file", "expert_file_ok", "read_checked"]

CHECKSUM_KEY = "momlp_sha256"
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes (sorted by name) and the metadata.
    Taught in: book/serving_one_expert.
    """
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
    """The safetensors format, written deterministically: header keys sorted, tensors in name order."""
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
    """Save named tensors + string metadata atomically as a checked safetensors file; returns the SHA-256.
    Taught in: book/serving_one_expert.
    """
    meta = dict(metadata or {})
    _check_payload(tensors, meta)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta[CHECKSUM_KEY] = digest = tensor_checksum(cpu, meta)
    files.atomic_write_bytes(path, _safetensors_bytes(cpu, meta))
    return digest


def read_checked(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Load and verify a checked file: ``(tensors on CPU, metadata without checksum, checksum)``.
    Taught in: book/serving_one_expert.
    """
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
    """``(tensors on device, metadata)`` of a checked file; :class:`StoreError` if it fails its check.
    Taught in: book/serving_one_expert.
    """
    tensors, meta, _ = read_checked(path)
    return {k: v.to(device) for k, v in tensors.items()}, meta


def expert_file_ok(path: str | os.PathLike[str]) -> bool:
    """``True`` when :func:`load_expert_file` would succeed. Taught in: book/serving_one_expert."""
    try:
        read_checked(path)
    except StoreError:
        return False
    return True
