"""One file per expert: checked safetensors files, atomic saves, and a manifest with the routing tree.

Low-level layer (shared with distributed training):

* :func:`save_expert_file` writes tensors + string metadata as one safetensors file, **atomically**
  (temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder), with a
  SHA-256 of the tensors (names, dtypes, shapes, bytes) and of the other metadata stored in the
  metadata under :data:`CHECKSUM_KEY`.
* :func:`load_expert_file` reads one back and raises :class:`StoreError` (a ``ValueError``) when
  the file is missing, truncated, not safetensors, or its contents do not match the checksum.
  safetensors holds raw tensor bytes and JSON only, so loading a tampered file can fail but can
  never execute code (unlike pickle-based ``torch.load``).
* :func:`write_manifest` / :func:`read_manifest`: a JSON manifest (written atomically, last, so it
  is the commit point of a save) plus the routing tree's keys in a checked safetensors file.

A crash mid-save leaves at most a stray ``*.tmp-*`` file (see :func:`is_temporary_file`) next
to the untouched previous file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save

from .routing import RoutingTree

__all__ = [
    "StoreError",
    "CHECKSUM_KEY",
    "MANIFEST_NAME",
    "TREE_NAME",
    "atomic_write_bytes",
    "is_temporary_file",
    "tensor_checksum",
    "save_expert_file",
    "load_expert_file",
    "expert_file_ok",
    "write_manifest",
    "read_manifest",
]

CHECKSUM_KEY = "momlp_sha256"
MANIFEST_NAME = "manifest.json"
TREE_NAME = "routing_tree.safetensors"
STORE_FORMAT = "momlp-store"
STORE_VERSION = 1
_TMP_MARK = ".tmp-"


class StoreError(ValueError):
    """A store file is missing, truncated, corrupted or tampered with."""


# ---------------------------------------------------------------------------- atomic writes
def is_temporary_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a leftover temporary file of an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and _TMP_MARK in name


def _fsync_dir(directory: Path) -> None:
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
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{_TMP_MARK}")
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
    _fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------------------- checked tensor files
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes (sorted by name) and the metadata.

    ``metadata`` must not contain :data:`CHECKSUM_KEY` itself (it is ignored if present).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _check_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    if not tensors:
        raise ValueError("nothing to save: tensors is empty; pass at least one named tensor")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}; convert values with str() or json.dumps")
    if CHECKSUM_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved for the checksum; rename it")


def save_expert_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Save named tensors + string metadata atomically as a checked safetensors file.

    Any tensor file works (one expert's weights, a routing tree's keys, cached features).
    Returns the SHA-256 stored under :data:`CHECKSUM_KEY` in the file's metadata.
    """
    meta = dict(metadata or {})
    _check_payload(tensors, meta)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    digest = tensor_checksum(cpu, meta)
    meta[CHECKSUM_KEY] = digest
    atomic_write_bytes(path, _st_save(cpu, metadata=meta))
    return digest


def load_expert_file(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`save_expert_file`: ``(tensors, metadata)``.

    The checksum is verified (``metadata`` is returned without it). Tensors are placed on ``device``.

    Raises
    ------
    StoreError
        If the file is missing, truncated or not safetensors, has no checksum, or its contents
        do not match the checksum (corrupted or tampered).
    """
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"store file {str(p)!r} does not exist; save it first or check the path")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise StoreError(
            f"{str(p)!r} is not a readable safetensors file (truncated or corrupted?): {exc}; "
            "re-save it or restore it from a good copy"
        ) from None
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is None:
        raise StoreError(
            f"{str(p)!r} has no {CHECKSUM_KEY!r} checksum in its metadata; only files written by "
            "momlp_lite.store.save_expert_file can be loaded"
        )
    actual = tensor_checksum(tensors, meta)
    if actual != stored:
        raise StoreError(
            f"{str(p)!r} fails its checksum (stored {stored[:12]}…, contents hash {actual[:12]}…): "
            "the file was corrupted or tampered with; re-save it"
        )
    dev = torch.device(device)
    if dev.type != "cpu":
        tensors = {k: v.to(dev) for k, v in tensors.items()}
    return tensors, meta


def expert_file_ok(path: str | os.PathLike[str]) -> bool:
    """``True`` when :func:`load_expert_file` would succeed (used to resume after a crash)."""
    try:
        load_expert_file(path)
    except StoreError:
        return False
    return True


# ---------------------------------------------------------------------------- manifest
def write_manifest(
    directory: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    tree: RoutingTree | None = None,
) -> Path:
    """Write ``manifest.json`` (atomically) into ``directory``, plus the routing tree if given.

    The tree's keys go to :data:`TREE_NAME` (a checked safetensors file) and its other fields and
    checksum into the manifest under ``"routing_tree"``. The manifest is written last, so it is the
    commit point: readers never see a manifest that points at a half-written tree.
    ``manifest`` must be JSON-serialisable; ``format``/``version`` are added.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format": STORE_FORMAT, "version": STORE_VERSION, **dict(manifest)}
    if tree is not None:
        state = tree.state_dict()
        keys = {f"keys.{i}": k for i, k in enumerate(state["keys"])}
        digest = save_expert_file(folder / TREE_NAME, keys, {"kind": "routing_tree"})
        doc["routing_tree"] = {
            "file": TREE_NAME,
            "sha256": digest,
            "kind": state["kind"],
            "bounds": state["bounds"],
            "axis_branching": state["axis_branching"],
            "levels": len(keys),
        }
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest must be JSON-serialisable (finite numbers, str keys): {exc}") from None
    return atomic_write_bytes(folder / MANIFEST_NAME, text.encode())


def read_manifest(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], RoutingTree | None]:
    """Read ``manifest.json`` from ``directory``: ``(manifest, routing tree or None)``.

    Raises
    ------
    StoreError
        If the manifest is missing or not valid JSON of this format, or the tree file is missing,
        corrupted or is not the one the manifest names.
    """
    folder = Path(directory)
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        raise StoreError(f"no {MANIFEST_NAME} in {str(folder)!r}: not an expert store (save one first)")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{str(mpath)!r} is not valid JSON (corrupted?): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise StoreError(f"{str(mpath)!r} is not a {STORE_FORMAT} manifest")
    if doc.get("version") != STORE_VERSION:
        raise StoreError(
            f"{str(mpath)!r} has store version {doc.get('version')!r}; this momlp_lite reads version {STORE_VERSION}"
        )
    info = doc.get("routing_tree")
    if info is None:
        return doc, None
    try:
        tensors, meta = load_expert_file(folder / info["file"])
        if tensor_checksum(tensors, meta) != info["sha256"]:
            raise StoreError(
                f"routing tree file in {str(folder)!r} is not the one the manifest names "
                "(left over from another save?); re-save the store"
            )
        keys = [tensors[f"keys.{i}"] for i in range(int(info["levels"]))]
    except (KeyError, TypeError) as exc:
        raise StoreError(f"routing tree entry of {str(mpath)!r} is incomplete: missing {exc}") from None
    tree = RoutingTree.from_state_dict(
        {"kind": info["kind"], "bounds": info["bounds"], "axis_branching": info["axis_branching"], "keys": keys}
    )
    return doc, tree
