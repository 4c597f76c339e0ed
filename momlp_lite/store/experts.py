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
  is the commit point of a save) plus the routing tree's keys in a checked safetensors file named by its hash.

A crash mid-save leaves at most a stray ``*.tmp-*`` file (see :func:`is_temporary_file`) next
to the untouched previous file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from ..runtime import choose, get_device
from ..moe.experts import StackedMLP
from ..store.files import TMP_MARK as _TMP_MARK  # noqa: F401 - tests and callers name leftover temp files with it
from ..store.files import atomic_write_bytes, is_temporary_file
from ..moe.routing import RoutingTree

__all__ = [
    "StoreError",
    "CHECKSUM_KEY",
    "MANIFEST_NAME",
    "TREE_PREFIX",
    "atomic_write_bytes",
    "is_temporary_file",
    "tensor_checksum",
    "save_expert_file",
    "load_expert_file",
    "expert_file_ok",
    "write_manifest",
    "read_manifest",
    "TensorMemoryMeter",
    "MemoryReport",
    "measure_peak_memory",
    "Prediction",
    "ExpertStore",
    "memory_vs_experts",
    "serving_setup",
]

CHECKSUM_KEY = "momlp_sha256"
MANIFEST_NAME = "manifest.json"
TREE_PREFIX = "routing_tree"
STORE_FORMAT = "momlp-store"
STORE_VERSION = 1


class StoreError(ValueError):
    """A store file is missing, truncated, corrupted or tampered with."""


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


def _load_checked(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Load and verify a checked file: ``(tensors on CPU, metadata without checksum, checksum)``."""
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
    return tensors, meta, actual


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
    tensors, meta, _ = _load_checked(path)
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
def _tree_file_in(manifest_path: Path) -> str | None:
    """The tree file an existing manifest names (None if there is none or it cannot be read)."""
    try:
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
        name = doc["routing_tree"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name.startswith(TREE_PREFIX) and "/" not in name else None


def write_manifest(
    directory: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    tree: RoutingTree | None = None,
) -> Path:
    """Write ``manifest.json`` (atomically) into ``directory``, plus the routing tree if given.

    The tree's keys go to ``routing_tree.<hash>.safetensors`` (a checked safetensors file named by
    a prefix of its checksum) and its other fields and checksum into the manifest under
    ``"routing_tree"``. The manifest is written last, so it is the commit point: an interrupted
    call leaves the previous manifest and the tree file it names untouched. The previous tree
    file is removed once the new manifest is in place. ``manifest`` must be JSON-serialisable;
    ``format``/``version`` are added.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    old_tree = _tree_file_in(folder / MANIFEST_NAME)
    doc: dict[str, Any] = {"format": STORE_FORMAT, "version": STORE_VERSION, **dict(manifest)}
    if tree is not None:
        state = tree.state_dict()
        keys = {f"keys.{i}": k for i, k in enumerate(state["keys"])}
        meta = {"kind": "routing_tree"}
        digest = tensor_checksum(keys, meta)
        name = f"{TREE_PREFIX}.{digest[:16]}.safetensors"
        save_expert_file(folder / name, keys, meta)
        doc["routing_tree"] = {
            "file": name,
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
    out = atomic_write_bytes(folder / MANIFEST_NAME, text.encode())
    new_tree = doc.get("routing_tree", {}).get("file")
    if old_tree is not None and old_tree != new_tree:
        (folder / old_tree).unlink(missing_ok=True)
    return out


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
        tensors, _, digest = _load_checked(folder / info["file"])
        if digest != info["sha256"]:
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


# ---------------------------------------------------------------------------- peak memory
class TensorMemoryMeter(TorchDispatchMode):
    """Count the bytes of live torch tensor storages created while the meter is active.

    Every aten op's outputs are seen by this dispatch mode; their storages are tracked (each once)
    until they are freed (a weak reference to the storage expires). ``peak_bytes`` is the largest
    total seen right after an op, when its inputs and outputs are both alive. Tensors created
    outside the meter are not counted unless passed to :meth:`track`. This is a count of tensor
    memory, not of the process: the Python interpreter, torch's own libraries and allocator slack
    are left out, which is what makes it comparable between runs on a CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def _purge(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current_bytes -= self._live.pop(k)[1]

    def track(self, tensor: Any) -> None:
        """Count ``tensor``'s storage (once) while it lives."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper tensors
            return
        nbytes, ptr = storage.nbytes(), storage.data_ptr()
        if nbytes == 0:
            return
        if ptr in self._live:
            ref, _ = self._live[ptr]
            if not ref.expired():
                return  # a view of, or the same, live storage
        # A new allocation: first forget storages freed since the last one (memory only grows at
        # allocations, so purging here keeps the peak exact and views cost nothing).
        self._purge()
        self._live[ptr] = (StorageWeakRef(storage), nbytes)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch API
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


@dataclass
class MemoryReport:
    """Peak memory of a block of work: ``peak_bytes`` and what was measured (``how``)."""

    peak_bytes: int | None = 0
    how: str = ""


@contextmanager
def measure_peak_memory(device: torch.device | str) -> Iterator[MemoryReport]:
    """Measure the peak memory of the block on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated when the block began (the
    allocator's own count of device memory). Elsewhere: the peak bytes of live torch tensors
    created in the block (:class:`TensorMemoryMeter`).
    """
    dev = torch.device(device)
    report = MemoryReport()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        report.how = "CUDA max_memory_allocated above the starting allocation"
        try:
            yield report
        finally:
            torch.cuda.synchronize(dev)
            report.peak_bytes = int(torch.cuda.max_memory_allocated(dev) - start)
    else:
        report.how = f"peak bytes of live torch tensors created in the block ({dev.type})"
        meter = TensorMemoryMeter()
        try:
            with meter:
                yield report
        finally:
            report.peak_bytes = int(meter.peak_bytes)


@contextmanager
def _maybe_measure(device: torch.device, measure: bool) -> Iterator[MemoryReport]:
    if measure:
        with measure_peak_memory(device) as report:
            yield report
    else:
        yield MemoryReport(peak_bytes=None, how="not measured")


# ---------------------------------------------------------------------------- the expert store
@dataclass
class Prediction:
    """What :meth:`ExpertStore.predict` returns.

    ``outputs`` ``[N, n_out]`` (CPU, input order), ``leaves`` ``[N]``, how many experts were
    loaded, the peak memory (and how it was measured; None when not measured) and the wall time.
    """

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
    """A folder holding a MoMLP: one checked safetensors file per expert, the routing tree, a manifest.

    Layout: ``manifest.json`` (the commit point), ``routing_tree.<hash>.safetensors`` and
    ``expert_<id>.<hash>.safetensors``. File names carry a prefix of their content hash, so a new
    save never overwrites a file the current manifest uses: an interrupted save leaves the previous
    store intact, and files no manifest names are removed after the new manifest is in place.

    Open an existing store with ``ExpertStore(directory)``; write one with :meth:`save`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.manifest, self.tree = read_manifest(self.directory)
        try:
            self.config: dict[str, Any] = dict(self.manifest["config"])
            self.expert_entries: dict[int, dict[str, str]] = {int(k): v for k, v in self.manifest["experts"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreError(f"manifest in {str(self.directory)!r} is not an expert store manifest: {exc}") from None
        if self.tree is None and self.num_experts != 1:
            raise StoreError(f"store in {str(self.directory)!r} has {self.num_experts} experts but no routing tree")

    # ------------------------------------------------------------------ writing
    @classmethod
    def save(
        cls,
        directory: str | os.PathLike[str],
        experts: StackedMLP,
        tree: RoutingTree | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> "ExpertStore":
        """Save every expert of ``experts`` to its own file, then the tree and the manifest.

        ``tree`` routes inputs to expert ids (its leaves); it may be omitted for a single expert
        (a dense model: every input goes to expert 0). ``info`` (JSON) is kept in the manifest.
        """
        ids = [int(i) for i in experts.expert_ids.tolist()]
        if tree is None and ids != [0]:
            raise ValueError(f"a store without a routing tree holds exactly expert 0, got ids {ids[:10]}")
        if tree is not None and max(ids) >= tree.num_leaves:
            raise ValueError(f"expert id {max(ids)} has no leaf in a tree with {tree.num_leaves} leaves")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        entries = {}
        for i in ids:  # one file per expert: a loop over file writes, not a compute hot path
            state = experts.expert_state(i)
            meta = {"expert_id": str(i), "config": json.dumps(experts.config, sort_keys=True)}
            digest = tensor_checksum(state, meta)
            name = f"expert_{i:05d}.{digest[:16]}.safetensors"
            if not (folder / name).is_file() or not expert_file_ok(folder / name):
                save_expert_file(folder / name, state, meta)
            entries[str(i)] = {"file": name, "sha256": digest}
        manifest = {
            "kind": "momlp-experts",
            "config": experts.config,
            "num_experts": len(ids),
            "parameters_per_expert": experts.parameters_per_expert,
            "experts": entries,
            "info": dict(info or {}),
        }
        write_manifest(folder, manifest, tree)
        keep = {e["file"] for e in entries.values()}
        for p in folder.glob("expert_*.safetensors"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
        for p in folder.iterdir():
            if is_temporary_file(p):
                p.unlink(missing_ok=True)
        return cls(folder)

    # ------------------------------------------------------------------ reading
    @property
    def num_experts(self) -> int:
        return len(self.expert_entries)

    @property
    def expert_ids(self) -> list[int]:
        return sorted(self.expert_entries)

    @property
    def parameters_per_expert(self) -> int:
        return int(self.manifest["parameters_per_expert"])

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.manifest.get("info", {}))

    def expert_path(self, expert_id: int) -> Path:
        try:
            return self.directory / self.expert_entries[int(expert_id)]["file"]
        except KeyError:
            raise ValueError(f"expert {expert_id} is not in this store (it holds ids {self.expert_ids[:10]}...)") from None

    def expert_bytes(self, expert_id: int) -> int:
        """Size of one expert's file on disk."""
        return self.expert_path(expert_id).stat().st_size

    def _read_state(self, expert_id: int) -> dict[str, torch.Tensor]:
        path = self.expert_path(expert_id)
        tensors, _, digest = _load_checked(path)
        if digest != self.expert_entries[int(expert_id)]["sha256"]:
            raise StoreError(f"{str(path)!r} is not the expert {expert_id} the manifest names; re-save the store")
        return tensors

    def _stack(self, states: list[dict[str, torch.Tensor]], ids: list[int], device: torch.device | str) -> StackedMLP:
        """Build a stack straight from file tensors: no random initialisation, and no copy for one expert."""
        first = next(iter(states[0].values()))
        dtype = first.dtype if first.is_floating_point() else None
        model = StackedMLP(len(ids), expert_ids=ids, device="meta", dtype=dtype, **self.config)
        want = set(model.state_dict()) - {"expert_ids"}
        for i, st in zip(ids, states):
            if set(st) != want:
                raise StoreError(f"expert {i} in {str(self.directory)!r} has tensors {sorted(st)}, expected {sorted(want)}")
        if len(states) == 1:  # a view with a leading expert dimension: the file's tensors are used as they are
            stacked = {k: v.unsqueeze(0) for k, v in states[0].items()}
        else:
            stacked = {k: torch.stack([st[k] for st in states]) for k in want}
        stacked = {k: v.to(device) for k, v in stacked.items()}
        stacked["expert_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
        try:
            model.load_state_dict(stacked, strict=True, assign=True)
        except RuntimeError as exc:
            raise StoreError(f"expert tensors in {str(self.directory)!r} do not fit the manifest's config: {exc}") from None
        return model.eval()

    def load_expert(self, expert_id: int, device: torch.device | str = "cpu") -> StackedMLP:
        """Expert ``expert_id`` alone, as a one-expert :class:`StackedMLP` in eval mode on ``device``.

        On a CPU the module uses the tensors read from the file directly (one copy of the weights).
        """
        return self._stack([self._read_state(expert_id)], [int(expert_id)], device)

    def load_all(self, device: torch.device | str = "cpu") -> StackedMLP:
        """Every expert at once, stacked (the all-experts-loaded reference)."""
        ids = self.expert_ids
        return self._stack([self._read_state(i) for i in ids], ids, device)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Expert id of every row of ``x`` (all zeros for a store without a tree)."""
        if self.tree is None:
            return torch.zeros(len(x), dtype=torch.long)
        return self.tree.route(x.to("cpu"))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor,
        device: torch.device | str | None = None,
        progress: bool = False,
        measure_memory: bool = True,
    ) -> Prediction:
        """Predict by loading **one expert at a time**.

        Routes the batch, groups its rows by leaf, and for each leaf that received rows: loads that
        expert's file onto ``device``, runs its rows (one batched forward), keeps the outputs and
        frees the expert before the next is loaded. Peak memory is measured with
        :func:`measure_peak_memory` (inputs already in memory are not counted); pass
        ``measure_memory=False`` for timings (the CPU meter slows every op down).
        """
        dev = torch.device(device) if device is not None else get_device()
        x = x.to("cpu")
        start = time.perf_counter()
        leaves = self.route(x)
        order = torch.argsort(leaves, stable=True)
        present, counts = torch.unique_consecutive(leaves[order], return_counts=True)
        groups = torch.split(order, counts.tolist())
        outputs = torch.empty(len(x), int(self.config["n_out"]), dtype=torch.float32)
        with _maybe_measure(dev, measure_memory) as mem:
            pairs = zip(present.tolist(), groups)
            # The loop over experts is the point here: one expert resident at a time, one load per needed expert;
            # each expert's rows run as one batched forward pass.
            for leaf, rows in tqdm(pairs, total=len(groups), desc="experts", disable=not progress, leave=False):
                expert = self.load_expert(leaf, dev)
                y = expert(x[rows].to(dev).unsqueeze(0))[0]
                outputs[rows] = y.to("cpu", torch.float32)
                del expert, y  # free this expert before the next one is loaded
        return Prediction(outputs, leaves, len(groups), mem.peak_bytes, mem.how, time.perf_counter() - start)

    @torch.no_grad()
    def predict_all_loaded(
        self, x: torch.Tensor, device: torch.device | str | None = None, measure_memory: bool = True
    ) -> Prediction:
        """The reference: load every expert at once, then one routed forward for the whole batch."""
        dev = torch.device(device) if device is not None else get_device()
        x = x.to("cpu")
        start = time.perf_counter()
        leaves = self.route(x)
        with _maybe_measure(dev, measure_memory) as mem:
            model = self.load_all(dev)
            y = model.forward_routed(x.to(dev), leaves.to(dev)).to("cpu", torch.float32)
            del model
        return Prediction(y, leaves, self.num_experts, mem.peak_bytes, mem.how, time.perf_counter() - start)


# ---------------------------------------------------------------------------- serving sweep
def memory_vs_experts(
    x_fit: torch.Tensor,
    x: torch.Tensor,
    tree_shapes: Sequence[tuple[int, int]],
    width: int,
    hidden_layers: int,
    n_out: int,
    directory: str | os.PathLike[str],
    device: torch.device | str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Peak memory and throughput of serving MoMLPs with more and more experts, and their dense twins.

    For each ``(depth, branching)`` a k-means tree is fitted on ``x_fit`` and a MoMLP with one
    expert per leaf (``width``, ``hidden_layers``, BatchNorm, PReLU; seeded random weights — memory
    does not depend on training) is saved as an :class:`ExpertStore`, next to a dense MLP with the
    same total parameters (a one-expert store). ``x`` is then predicted three ways: one expert at a
    time, all experts loaded, and with the dense MLP. Peak memory is measured in a first run; the
    rows per second come from a second run without the memory meter.
    """
    dev = torch.device(device) if device is not None else get_device()
    root = Path(directory)
    rows = []
    for depth, branching in tree_shapes:
        tree = RoutingTree.from_data(x_fit, depth=depth, branching=branching, seed=seed)
        num = tree.num_leaves
        gen = torch.Generator().manual_seed(seed)
        experts = StackedMLP(num, x.shape[1], width, hidden_layers, n_out, batchnorm=True, generator=gen).eval()
        dense = StackedMLP.dense_with_budget(num * experts.parameters_per_expert, x.shape[1], hidden_layers, n_out,
                                             batchnorm=True, generator=gen).eval()
        moe_store = ExpertStore.save(root / f"momlp_{num}", experts, tree)
        dense_store = ExpertStore.save(root / f"dense_{num}", dense)
        del experts, dense
        one = moe_store.predict(x, dev)
        every = moe_store.predict_all_loaded(x, dev)
        solo = dense_store.predict(x, dev)
        speed = {
            name: len(x) / fn(x, dev, measure_memory=False).seconds
            for name, fn in [("one", moe_store.predict), ("all", moe_store.predict_all_loaded), ("dense", dense_store.predict)]
        }
        rows.append(dict(
            experts=num,
            experts_used=one.experts_loaded,
            params_per_expert=moe_store.parameters_per_expert,
            dense_params=dense_store.parameters_per_expert,
            dense_width=int(dense_store.config["width"]),
            peak_one_at_a_time=one.peak_bytes,
            peak_all_loaded=every.peak_bytes,
            peak_dense=solo.peak_bytes,
            rows_per_s_one_at_a_time=speed["one"],
            rows_per_s_all_loaded=speed["all"],
            rows_per_s_dense=speed["dense"],
            same_predictions=bool(torch.equal(one.labels, every.labels)),
            max_abs_logit_diff=float((one.outputs - every.outputs).abs().max()),
            memory_measure=one.memory_measure,
        ))
    return rows


def serving_setup(profile: str | None = None) -> dict[str, Any]:
    """Sizes of the serving chapter and benchmark for a profile (default: the current one).

    ``dataset``/``extractor``/``tree``/``width``/``steps`` size the trained MoMLP the chapter saves
    and serves; ``sweep`` (tree shapes), ``sweep_width`` and ``sweep_dim``/``sweep_rows`` size the
    peak-memory sweep (the benchmark feeds it Gaussian vectors of ``sweep_dim`` coordinates).
    """
    return choose(
        smoke=dict(dataset="digits", extractor=("pca", dict(n_components=8)), tree=(3, 2), width=32, steps=200,
                   batch=64, sweep=[(1, 4), (2, 4), (3, 4)], sweep_width=64, sweep_dim=8, sweep_rows=360),
        default=dict(dataset="mnist_subset", extractor=("pca", dict(n_components=48)), tree=(3, 2), width=128,
                     steps=1000, batch=64, sweep=[(1, 4), (2, 4), (3, 4)], sweep_width=256, sweep_dim=48,
                     sweep_rows=1000),
        paper=dict(dataset="cifar10", extractor=("dinov2", dict(model="dinov2_vits14")), tree=(2, 4), width=1000,
                   steps=5000, batch=256, sweep=[(1, 4), (2, 4), (3, 4), (4, 4)], sweep_width=1000, sweep_dim=384,
                   sweep_rows=10_000),
        profile=profile,
    )
