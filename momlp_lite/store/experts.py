"""The expert store: ``manifest.json`` (the commit point), ``routing_tree.<hash>.safetensors`` and one checked file
per expert, ``experts/expert_<id>.<hash>.safetensors``. Taught in: book/serving_one_expert."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..moe.experts import StackedMLP
from ..moe.routing import RoutingTree
from ..runtime import get_device
from . import files
from .files import (StoreError, expert_file_ok, other_live_writers, read_checked, remove_abandoned_temporaries,
                    save_expert_file, store_lock, tensor_checksum, writing)
from .memory import measure_peak_memory

__all__ = ["MANIFEST_NAME", "EXPERT_DIR", "write_expert", "expert_files", "save_tree", "load_tree", "write_manifest",
           "commit_experts", "read_manifest", "Prediction", "ExpertStore"]

MANIFEST_NAME = "manifest.json"
TREE_PREFIX = "routing_tree"
EXPERT_DIR = "experts"
STORE_FORMAT, STORE_VERSION = "momlp-store", 2


def _write_named(folder: Path, stem: str, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """Write ``<stem>.<hash>.safetensors`` unless a good copy is there: content-named, never overwrites others."""
    digest = tensor_checksum(tensors, meta)
    name = f"{stem}.{digest[:16]}.safetensors"
    if not expert_file_ok(folder / name):
        save_expert_file(folder / name, tensors, meta)
    return {"file": name, "sha256": digest}


def write_expert(directory: str | os.PathLike[str], expert_id: int, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write one expert's file into a store; returns its manifest entry. Taught in: book/serving_one_expert."""
    meta = {**(metadata or {}), "expert_id": str(int(expert_id))}
    return _write_named(Path(directory), f"{EXPERT_DIR}/expert_{int(expert_id):05d}", tensors, meta)


def expert_files(directory: str | os.PathLike[str], expert_id: int) -> list[Path]:
    """Every file of expert ``expert_id`` in a store (committed or not), sorted. Taught in: book/serving_one_expert."""
    return sorted((Path(directory) / EXPERT_DIR).glob(f"expert_{int(expert_id):05d}.*.safetensors"))


def save_tree(directory: str | os.PathLike[str], tree: RoutingTree, metadata: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """Write ``tree.state_dict()`` (keys as tensors, the rest as JSON). Taught in: book/serving_one_expert."""
    state = tree.state_dict()
    keys = {f"keys.{i}": k for i, k in enumerate(state.pop("keys"))}
    tensors = keys or {"one_leaf": torch.zeros(1)}  # a one-leaf tree has no keys: a marker tensor keeps the file valid
    meta = {**(metadata or {}), "kind": "routing_tree", "state": json.dumps(state, sort_keys=True)}
    return {**_write_named(Path(directory), TREE_PREFIX, tensors, meta), "levels": len(keys),
            "num_leaves": tree.num_leaves}


def load_tree(path: str | os.PathLike[str], sha256: str | None = None) -> tuple[RoutingTree, dict[str, str]]:
    """``(tree, metadata)`` of a :func:`save_tree` file (of hash ``sha256``). Taught in: book/serving_one_expert."""
    tensors, meta, digest = read_checked(path)
    if sha256 is not None and digest != sha256:
        raise StoreError(f"routing tree file {str(path)!r} is not the one the manifest names "
                         "(left over from another save?); re-save the store")
    try:
        keys = [tensors[f"keys.{i}"] for i in range(len(tensors) - ("one_leaf" in tensors))]
        return RoutingTree.from_state_dict({**json.loads(meta["state"]), "keys": keys}), meta
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{str(path)!r} is not a routing tree file: {exc}") from None


# ---------------------------------------------------------------------------- manifest
class _Gone(StoreError):
    """A file the new manifest names vanished before the commit (the save is retried)."""


def _contained(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a relative POSIX path without ``..`` (else StoreError naming ``what``)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
        raise StoreError(f"manifest entry {what} names file {name!r} outside the store {str(folder)!r}; "
                         "file entries must be relative paths inside the store (re-save it)")
    return folder.joinpath(*parts)


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any], tree: RoutingTree,
                   holder_start: float | None = None, tree_meta: Mapping[str, str] | None = None) -> Path:
    """Commit under the store's lock: the tree file, ``manifest.json``, then remove abandoned temp files and, when
    no other writer is registered, files older than ``holder_start`` it does not name.
    Taught in: book/serving_one_expert."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"format": STORE_FORMAT, "version": STORE_VERSION, **dict(manifest)}
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest must be JSON-serializable (finite numbers, str keys): {exc}") from None
    with store_lock(folder):
        doc["routing_tree"] = save_tree(folder, tree, tree_meta)
        named = [e["file"] for e in (doc["experts"].values() if isinstance(doc.get("experts"), dict) else [])
                 if isinstance(e, dict) and isinstance(e.get("file"), str)]
        gone = [f for f in named if not _contained(folder, f, "experts").is_file()]
        if gone:
            raise _Gone(f"expert files {gone[:5]} disappeared before the commit (another writer's clean-up?); "
                        "save again")
        out = files.atomic_write_bytes(folder / MANIFEST_NAME, json.dumps(doc, indent=2, sort_keys=True).encode())
        start = time.time() if holder_start is None else holder_start
        remove_abandoned_temporaries([folder, folder / EXPERT_DIR], start)
        if not other_live_writers(folder):
            keep = {doc.get("routing_tree", {}).get("file"), *named}
            stored = [*folder.glob(f"{TREE_PREFIX}.*.safetensors"), *folder.glob(f"{EXPERT_DIR}/expert_*.safetensors")]
            for p in stored:
                if p.relative_to(folder).as_posix() not in keep and p.stat().st_mtime < start:
                    p.unlink(missing_ok=True)
    return out


def commit_experts(directory: str | os.PathLike[str], experts: StackedMLP, entries: Mapping[str, Mapping[str, str]],
                   tree: RoutingTree, info: Mapping[str, Any] | None = None, holder_start: float | None = None,
                   tree_meta: Mapping[str, str] | None = None) -> Path:
    """Commit the manifest of ``entries``, experts shaped like ``experts`` (for :meth:`ExpertStore.save` and
    distributed runs). Taught in: book/serving_one_expert."""
    manifest = {"kind": "momlp-experts", "config": experts.config, "num_experts": len(entries),
                "parameters_per_expert": experts.parameters_per_expert, "experts": dict(entries),
                "info": dict(info or {})}
    return write_manifest(directory, manifest, tree, holder_start, tree_meta)


def read_manifest(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], RoutingTree]:
    """``(manifest, tree)``, or a StoreError naming the bad entry. Taught in: book/serving_one_expert."""
    mpath = Path(directory) / MANIFEST_NAME
    if not mpath.is_file():
        raise StoreError(f"no {MANIFEST_NAME} in {str(mpath.parent)!r}: not an expert store (save one first)")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{str(mpath)!r} is not valid JSON (corrupted?): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise StoreError(f"{str(mpath)!r} is not a {STORE_FORMAT} manifest")
    if doc.get("version") != STORE_VERSION:
        raise StoreError(f"{str(mpath)!r} has store version {doc.get('version')!r}; "
                         f"this momlp_lite reads version {STORE_VERSION} (re-save the store)")
    info = doc.get("routing_tree")
    if info is None:  # every save writes one, a one-leaf tree for a single expert
        raise StoreError(f"manifest of {str(mpath.parent)!r} names no routing tree; re-save the store")
    if not isinstance(info, dict) or not all(k in info for k in ("file", "sha256", "levels", "num_leaves")):
        raise StoreError(f"manifest entry routing_tree of {str(mpath)!r} is incomplete: {info!r}")
    tree, _ = load_tree(_contained(mpath.parent, info["file"], "routing_tree"), info["sha256"])
    if tree.depth != info["levels"] or tree.num_leaves != info["num_leaves"]:
        raise StoreError(f"manifest entry routing_tree says {info['levels']} levels and {info['num_leaves']} leaves, "
                         f"but its file holds {tree.depth} levels and {tree.num_leaves} leaves; re-save the store")
    return doc, tree


# ---------------------------------------------------------------------------- the expert store
@dataclass
class Prediction:
    """Outputs, leaves, experts loaded, peak memory and time of a prediction. Taught in: book/serving_one_expert."""

    outputs: torch.Tensor
    leaves: torch.Tensor
    experts_loaded: int
    peak_bytes: int | None
    memory_measure: str
    seconds: float

    @property
    def labels(self) -> torch.Tensor:
        """Predicted classes: ``outputs.argmax(1)``."""
        return self.outputs.argmax(1)


class ExpertStore:
    """A MoMLP in a folder; every read holds the lock and sees one committed version.
    Taught in: book/serving_one_expert."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._stamp: tuple[int, int, int] | None = None
        with store_lock(self.directory):
            self._reload()

    def _reload(self) -> None:
        mpath = self.directory / MANIFEST_NAME
        stat = mpath.stat() if mpath.is_file() else None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat else None
        if stamp is not None and stamp == self._stamp:
            return
        manifest, tree = read_manifest(self.directory)
        where = f"manifest of {str(self.directory)!r}"
        try:
            config, entries = dict(manifest["config"]), {int(k): v for k, v in manifest["experts"].items()}
            per_expert = int(manifest["parameters_per_expert"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"{where} is not an expert store manifest: missing or bad {exc}") from None
        if sorted(entries) != list(range(tree.num_leaves)) or manifest.get("num_experts", len(entries)) != len(entries):
            raise StoreError(f"{where} lists experts {sorted(entries)[:10]} (num_experts "
                             f"{manifest.get('num_experts')!r}) for a tree with {tree.num_leaves} leaves; "
                             "every leaf needs exactly one expert (re-save the store)")
        for i, e in entries.items():
            if not isinstance(e, dict) or not isinstance(e.get("sha256"), str):
                raise StoreError(f"{where}: entry experts[{i}] is not {{file, sha256}}: {e!r}")
            _contained(self.directory, e.get("file"), f"experts[{i}]")
        self.manifest, self.tree, self.config, self.expert_entries = manifest, tree, config, entries
        self.num_experts, self.expert_ids, self.parameters_per_expert = len(entries), sorted(entries), per_expert
        self.info = dict(manifest.get("info", {}))
        self._stamp = stamp

    @classmethod
    def save(cls, directory: str | os.PathLike[str], experts: StackedMLP, tree: RoutingTree,
             info: Mapping[str, Any] | None = None) -> "ExpertStore":
        """Write every expert's file, then commit; a dense model is one expert under ``RoutingTree.single(n)``."""
        ids = [int(i) for i in experts.expert_ids.tolist()]
        if ids != list(range(tree.num_leaves)):
            raise ValueError(f"a store needs one expert per leaf: ids 0..{tree.num_leaves - 1} for this tree, "
                             f"got {ids[:10]}{'...' if len(ids) > 10 else ''}")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        shape = json.dumps(experts.config, sort_keys=True)
        with writing(folder) as start:
            for attempt in range(3):
                entries = {str(i): write_expert(folder, i, experts.expert_state(i), {"config": shape}) for i in ids}
                try:
                    commit_experts(folder, experts, entries, tree, info, start)
                    break
                except _Gone:
                    if attempt == 2:
                        raise
        return cls(folder)

    def expert_path(self, expert_id: int) -> Path:
        """Path of expert ``expert_id``'s file."""
        if int(expert_id) not in self.expert_entries:
            raise ValueError(f"expert {expert_id} is not in this store (ids 0..{self.num_experts - 1})")
        return _contained(self.directory, self.expert_entries[int(expert_id)]["file"], f"experts[{expert_id}]")

    def _read_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        path = self.expert_path(expert_id)
        tensors, meta, digest = read_checked(path)
        if digest != self.expert_entries[int(expert_id)]["sha256"] or meta.get("expert_id") != str(int(expert_id)):
            raise StoreError(f"{str(path)!r} (expert_id {meta.get('expert_id')!r}) is not the expert {expert_id} "
                             f"the manifest entry experts[{expert_id}] names; re-save the store")
        return tensors

    def _stack(self, ids: list[int], device: torch.device | str) -> StackedMLP:
        """Build a stack straight from file tensors: no random initialization, no copy for one expert."""
        with store_lock(self.directory):
            self._reload()
            states = [self._read_state(i) for i in ids]
        first = next(iter(states[0].values()))
        model = StackedMLP(len(ids), expert_ids=ids, device="meta",
                           dtype=first.dtype if first.is_floating_point() else None, **self.config)
        want = set(model.state_dict()) - {"expert_ids"}
        for i, st in zip(ids, states):
            if set(st) != want:
                raise StoreError(f"expert {i} in {str(self.directory)!r} has tensors {sorted(st)}, "
                                 f"expected {sorted(want)}")
        stacked = ({k: v.unsqueeze(0) for k, v in states[0].items()} if len(states) == 1
                   else {k: torch.stack([st[k] for st in states]) for k in want})
        stacked = {k: v.to(device) for k, v in stacked.items()}
        stacked["expert_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
        try:
            model.load_state_dict(stacked, strict=True, assign=True)
        except RuntimeError as exc:
            raise StoreError(f"expert tensors in {str(self.directory)!r} do not fit the manifest's config: "
                             f"{exc}") from None
        return model.eval()

    def load_expert(self, expert_id: int, device: torch.device | str = "cpu") -> StackedMLP:
        """Expert ``expert_id`` alone, as a one-expert :class:`StackedMLP` in eval mode on ``device``."""
        return self._stack([int(expert_id)], device)

    def load_all(self, device: torch.device | str = "cpu") -> StackedMLP:
        """Every expert at once, stacked (the all-experts-loaded reference)."""
        return self._stack(self.expert_ids, device)

    def _inputs(self, x: Any) -> torch.Tensor:
        n = int(self.config["n_in"])
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [N, {n}], got {type(x).__module__}.{type(x).__name__}; "
                            "convert it with torch.as_tensor(x, dtype=torch.float32)")
        if x.ndim != 2 or x.shape[1] != n or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor of shape [N, {n}], got {x.dtype} {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"x has {int((~torch.isfinite(x)).any(1).sum())} rows with NaN or inf; clean them first")
        return x.to("cpu")

    @torch.no_grad()
    def predict(self, x: torch.Tensor, device: torch.device | str | None = None, progress: bool = False,
                measure_memory: bool = True) -> Prediction:
        """Predict loading one expert at a time; ``measure_memory=False`` for timings (the CPU meter is slow)."""
        dev = torch.device(device) if device is not None else get_device()
        x = self._inputs(x)
        start = time.perf_counter()
        with store_lock(self.directory):  # one version of the store for the whole batch
            self._reload()
            leaves = self.tree.route(x)
            order = torch.argsort(leaves, stable=True)
            present, counts = torch.unique_consecutive(leaves[order], return_counts=True)
            groups = torch.split(order, counts.tolist())
            outputs = torch.empty(len(x), int(self.config["n_out"]), dtype=torch.float32)
            with measure_peak_memory(dev, measure_memory) as mem:
                # the loop over experts is the point: one expert resident at a time, one load per needed expert
                for leaf, rows in tqdm(zip(present.tolist(), groups), total=len(groups), desc="experts",
                                       disable=not progress, leave=False):
                    expert = self.load_expert(leaf, dev)
                    outputs[rows] = expert(x[rows].to(dev).unsqueeze(0))[0].to("cpu", torch.float32)
                    del expert  # free this expert before the next one is loaded
        return Prediction(outputs, leaves, len(groups), mem.peak_bytes, mem.how, time.perf_counter() - start)

    @torch.no_grad()
    def predict_all_loaded(self, x: torch.Tensor, device: torch.device | str | None = None,
                           measure_memory: bool = True) -> Prediction:
        """The reference: load every expert at once, then one routed forward for the whole batch."""
        dev = torch.device(device) if device is not None else get_device()
        x = self._inputs(x)
        start = time.perf_counter()
        with store_lock(self.directory):
            self._reload()
            leaves = self.tree.route(x)
            with measure_peak_memory(dev, measure_memory) as mem:
                model = self.load_all(dev)
                y = model.forward_routed(x.to(dev), leaves.to(dev)).to("cpu", torch.float32)
                del model
        return Prediction(y, leaves, self.num_experts, mem.peak_bytes, mem.how, time.perf_counter() - start)
