"""Train the experts of one MoMLP on many processes or machines (``torch.distributed`` + ``torchrun``).

Algorithm 2 trains every expert on its own leaf's data, independently of the others, so the
experts can be split over processes with **no gradient exchange at all**. This module is the
command-line entry point that does it::

    python -m momlp_lite.distributed CONFIG.yaml                        # one process
    torchrun --standalone --nproc-per-node=4 -m momlp_lite.distributed CONFIG.yaml
    python -m momlp_lite.distributed CONFIG.yaml --shard 3/16            # one task of a job array

How the work is split
---------------------
* Every process reads and validates the config (errors stop the run before any training).
* The routing tree is built **once** (by rank 0, or by ``--prepare`` for job arrays), written to
  the shared output directory and broadcast to the other ranks.
* Rank ``r`` of ``W`` trains the experts ``ids[r::W]`` on its own GPU (NCCL) or on CPU (gloo), in
  groups of ``run.experts_per_step`` trained in lockstep, and writes **each finished expert
  atomically** to ``OUTPUT/experts/expert_XXXXX.safetensors`` (checked with a SHA-256).
* After a barrier, rank 0 checks that every expert file is there and valid and writes the
  manifest (with the routing tree) — the commit point of the store — and ``summary.json``.

Every expert's initialisation and data order depend only on ``(seed, expert id)``, never on the
rank, the number of processes or the other experts in its group: a run on ``W`` processes writes
the same store as a run on one.

Resume: re-running the same command skips every expert whose file is present, passes its checksum
and was trained with the same settings (the config's :meth:`~momlp_lite.runconfig.RunConfig.fingerprint`);
missing, partial or corrupted files are (re)trained.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from ..runtime import get_device
from ..data import make_grid_data
from ..moe.experts import StackedMLP
from ..moe.routing import RoutingTree
from ..distributed.config import ConfigError, RunConfig, load_run_config
from ..store.experts import (
    StoreError,
    atomic_write_bytes,
    is_temporary_file,
    load_expert_file,
    save_expert_file,
    tensor_checksum,
    write_manifest,
)
from ..moe.trainer import TrainConfig, train_experts

__all__ = [
    "Workers",
    "RunData",
    "CRASH_ENV",
    "shard_ids",
    "parse_shard",
    "start_workers",
    "stop_workers",
    "expert_path",
    "prepare",
    "expert_status",
    "train_shard",
    "finalize",
    "compare_stores",
    "init_experts",
    "train_config",
    "expert_shape",
    "load_training_data",
    "build_tree",
    "run",
    "torchrun_command",
    "main",
]

#: Test hook: ``"RANK:K"`` makes that rank die abruptly (SIGKILL) right after saving its K-th expert.
CRASH_ENV = "MOMLP_CRASH_AFTER"
EXPERT_DIR = "experts"
RUN_TREE = "run_tree.safetensors"
SUMMARY_NAME = "summary.json"
_CRASH_EXIT_CODE = 17
# Object collectives pickle; where torch can, unpickle only tensors and plain containers.
_SAFE_UNPICKLE = (
    {"weights_only": True} if "weights_only" in inspect.signature(dist.broadcast_object_list).parameters else {}
)


# ---------------------------------------------------------------------------- who am I
@dataclass(frozen=True)
class Workers:
    """This process's place in the run.

    Attributes
    ----------
    rank, world_size : int
        Shard index and number of shards (``0`` and ``1`` for a single process).
    local_rank : int
        Rank on this machine (picks the GPU).
    mode : str
        ``"single"``, ``"torchrun"`` (a ``torch.distributed`` process group is up) or ``"shard"``
        (``--shard i/n``: independent processes, e.g. a SLURM job array, no process group).
    backend : str or None
        ``"nccl"`` or ``"gloo"`` in ``torchrun`` mode.
    device : torch.device
        Where this process trains.
    """

    rank: int
    world_size: int
    local_rank: int
    mode: str
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether collectives (barrier, broadcast) are available."""
        return self.mode == "torchrun"


def shard_ids(ids: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The share of ``ids`` that shard ``rank`` of ``world_size`` trains: ``ids[rank::world_size]``.

    Round-robin keeps the shards within one expert of each other in size, and neighbouring
    leaves (often of similar size) land on different shards.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(ids)[rank::world_size]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (shard ``i`` of ``n``, 0-based) as used by ``--shard``."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/16), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def start_workers(
    shard: tuple[int, int] | None = None,
    device: str | None = None,
    timeout_min: float = 24 * 60,
) -> Workers:
    """Find out who this process is; under ``torchrun`` start the process group.

    Under ``torchrun`` (``WORLD_SIZE`` set in the environment) the group uses NCCL when CUDA is
    available (each process on GPU ``LOCAL_RANK``) and gloo on CPU, or when more processes than
    GPUs run on one machine (they then share GPUs round-robin). ``shard=(i, n)`` runs shard
    ``i`` of ``n`` with no group. The group's ``timeout_min`` bounds how long the final barrier waits
    for the slowest rank, so it must exceed the longest shard's training time.
    """
    world = _env_int("WORLD_SIZE", 1)
    if shard is not None:
        if world > 1:
            raise ValueError("--shard is for independent processes (job arrays); do not combine it with torchrun")
        i, n = shard
        return Workers(i, n, 0, "shard", None, get_device(device))
    if world == 1 and not dist.is_initialized():
        return Workers(0, 1, 0, "single", None, get_device(device))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    wanted = get_device(device) if device else None
    use_cuda = torch.cuda.is_available() and (wanted is None or wanted.type == "cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(dev)
        # NCCL needs one GPU per rank; ranks sharing a GPU fall back to gloo, which is enough here:
        # the group only carries a barrier and two small object collectives, never gradients.
        backend = "nccl" if _env_int("LOCAL_WORLD_SIZE", 1) <= gpus else "gloo"
    else:
        dev = wanted or torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=_dt.timedelta(minutes=timeout_min),
            device_id=dev if backend == "nccl" else None,
        )
    return Workers(dist.get_rank(), dist.get_world_size(), local_rank, "torchrun", backend, dev)


def stop_workers(workers: Workers) -> None:
    """Tear down the process group (if this process started one)."""
    if workers.grouped and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(workers: Workers) -> None:
    if workers.grouped:
        if workers.backend == "nccl":
            dist.barrier(device_ids=[workers.device.index or 0])
        else:
            dist.barrier()


# ---------------------------------------------------------------------------- data + tree
@dataclass
class RunData:
    """What every rank needs to train: the training points and the routing tree."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    tree: RoutingTree
    leaf: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.leaf = self.tree.route(self.x_train)

    @property
    def num_experts(self) -> int:
        return self.tree.num_leaves

    def leaf_counts(self) -> torch.Tensor:
        return torch.bincount(self.leaf, minlength=self.num_experts)


def load_training_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training points of ``cfg.data`` (grid split, or ``x_train``/``y_train`` of a file).

    Raises
    ------
    ConfigError
        If the data file lacks a tensor or the shapes do not fit (checked before any training).
    """
    d = cfg.data
    if d.kind == "grid":
        grid = make_grid_data(d.target, d.n, d.s, d.a, d.b, d.test_fraction, seed=cfg.seed)  # type: ignore[arg-type]
        return grid.x_train, grid.y_train
    try:
        with safe_open(str(d.path), framework="pt") as fh:
            names = set(fh.keys())
            missing = {"x_train", "y_train"} - names
            if missing:
                raise ConfigError(f"data.path: {d.path!r} has no tensor {sorted(missing)[0]!r}; it holds {sorted(names)}")
            x, y = fh.get_tensor("x_train"), fh.get_tensor("y_train")
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise ConfigError(f"data.path: {d.path!r} is not a readable safetensors file: {exc}") from None
    if x.ndim != 2 or len(x) < 1:
        raise ConfigError(f"data.path: x_train must have shape [N, n] with N >= 1, got {tuple(x.shape)}")
    if cfg.optimiser.loss == "cross_entropy":
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.is_floating_point() or y.ndim != 1 or len(y) != len(x) or bool((y < 0).any()):
            raise ConfigError(
                f"data.path: optimiser.loss 'cross_entropy' needs y_train of non-negative class ids with shape "
                f"[{len(x)}], got {y.dtype} {tuple(y.shape)}"
            )
        return x.to(torch.float32), y.long()
    y = y.reshape(len(y), -1) if y.ndim == 1 else y
    if y.ndim != 2 or len(y) != len(x):
        raise ConfigError(f"data.path: y_train must have shape [{len(x)}, k], got {tuple(y.shape)}")
    return x.to(torch.float32), y.to(torch.float32)


def build_tree(cfg: RunConfig, x_train: torch.Tensor) -> RoutingTree:
    """The routing tree ``cfg.routing`` asks for (deterministic given the config)."""
    r = cfg.routing
    if r.kind == "regular":
        return RoutingTree.regular(cfg.data.n, r.depth, r.branching, cfg.data.a, cfg.data.b)  # type: ignore[arg-type]
    return RoutingTree.from_data(x_train, r.depth, r.branching, r.iters, seed=cfg.seed)


def _save_run_tree(path: Path, tree: RoutingTree, fingerprint: str) -> None:
    state = tree.state_dict()
    meta = {
        "fingerprint": fingerprint,
        "kind": state["kind"],
        "bounds": json.dumps(state["bounds"]),
        "axis_branching": json.dumps(state["axis_branching"]),
    }
    save_expert_file(path, {f"keys.{i}": k for i, k in enumerate(state["keys"])}, meta)


def _load_run_tree(path: Path, fingerprint: str) -> RoutingTree | None:
    """The tree saved by an earlier (or the ``--prepare``) run, or ``None`` if absent/invalid/stale."""
    try:
        tensors, meta = load_expert_file(path)
    except StoreError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    keys = [tensors[f"keys.{i}"] for i in range(len(tensors))]
    return RoutingTree.from_state_dict(
        {"kind": meta["kind"], "bounds": json.loads(meta["bounds"]),
         "axis_branching": json.loads(meta["axis_branching"]), "keys": keys}
    )


def prepare(
    cfg: RunConfig,
    out_dir: Path,
    workers: Workers,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RunData:
    """Load the data (unless ``train_data`` is given) and get the routing tree, built once for the whole run.

    ``single``/``torchrun``: rank 0 reuses the tree of an earlier run with the same fingerprint
    or builds and saves it; it is broadcast to the other ranks. ``shard`` mode (no group) needs
    the tree from ``--prepare`` (or an earlier run), so all tasks of a job array share one tree.
    """
    x, y = train_data if train_data is not None else load_training_data(cfg)
    fp = cfg.fingerprint()
    tree_path = out_dir / RUN_TREE
    tree: RoutingTree | None = None
    if workers.mode == "shard":
        tree = _load_run_tree(tree_path, fp)
        if tree is None:
            raise RuntimeError(
                f"no routing tree for this config in {str(out_dir)!r}; run "
                f"'python -m momlp_lite.distributed CONFIG --prepare' once before the job array"
            )
        return RunData(x, y, tree)
    if workers.is_main:
        tree = _load_run_tree(tree_path, fp)
        if tree is None:
            tree = build_tree(cfg, x)
            _save_run_tree(tree_path, tree, fp)
    if workers.grouped:
        box: list[Any] = [tree.state_dict() if tree is not None else None]
        dist.broadcast_object_list(box, src=0, device=workers.device if workers.backend == "nccl" else None,
                                   **_SAFE_UNPICKLE)
        tree = RoutingTree.from_state_dict(box[0])
    assert tree is not None
    return RunData(x, y, tree)


# ---------------------------------------------------------------------------- expert files
def expert_path(out_dir: str | os.PathLike[str], expert_id: int) -> Path:
    """Where expert ``expert_id`` lives in a run's output directory."""
    return Path(out_dir) / EXPERT_DIR / f"expert_{expert_id:05d}.safetensors"


def _scan(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, tuple[str, str | None]]:
    """``(status, sha256)`` of each expert's file: status ``"done"``, ``"missing"`` or ``"corrupt"``."""
    found: dict[int, tuple[str, str | None]] = {}
    for i in ids:
        path = expert_path(out_dir, i)
        if not path.exists():
            found[i] = ("missing", None)
            continue
        try:
            tensors, meta = load_expert_file(path)
        except StoreError:
            found[i] = ("corrupt", None)
            continue
        if meta.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{str(path)!r} was trained with different settings (fingerprint "
                f"{meta.get('fingerprint', '?')[:12]}…, this config {fingerprint[:12]}…); "
                "use a fresh run.output_dir or delete the old experts"
            )
        found[i] = ("done", tensor_checksum(tensors, meta))
    return found


def expert_status(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, str]:
    """``"done"``, ``"missing"`` or ``"corrupt"`` for each expert id.

    ``"done"`` means the file loads, passes its SHA-256 check and was trained with this config.

    Raises
    ------
    RuntimeError
        If a valid expert file was trained with other settings (another fingerprint): mixing
        experts of two configs would be silent nonsense, so the run stops and names the fix.
    """
    return {i: st for i, (st, _) in _scan(out_dir, ids, fingerprint).items()}


def _maybe_crash(workers: Workers, saved: int) -> None:
    """Test hook (:data:`CRASH_ENV` = ``"RANK:K"``): die like a killed process after K saves."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    rank_text, k_text = spec.split(":")
    if int(rank_text) == workers.rank and saved >= int(k_text) and _env_int("TORCHELASTIC_RESTART_COUNT", 0) == 0:
        sys.stdout.flush()
        sys.stderr.flush()
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` or the OOM killer does
        os._exit(_CRASH_EXIT_CODE)


def train_shard(
    cfg: RunConfig,
    data: RunData,
    out_dir: Path,
    workers: Workers,
    progress: bool = True,
) -> dict[str, Any]:
    """Train this process's share of experts that are not already done; save each atomically.

    Returns this rank's record: which experts it trained, skipped and found corrupt, and time.
    """
    from tqdm.auto import tqdm

    fp = cfg.fingerprint()
    mine = shard_ids(range(data.num_experts), workers.rank, workers.world_size)
    status = expert_status(out_dir, mine, fp)
    todo = [i for i in mine if status[i] != "done"]
    record: dict[str, Any] = {
        "rank": workers.rank,
        "device": str(workers.device),
        "assigned": mine,
        "skipped": [i for i in mine if status[i] == "done"],
        "corrupt": [i for i in mine if status[i] == "corrupt"],
        "trained": [],
        "seconds": 0.0,
    }
    start = time.perf_counter()
    step = cfg.run.experts_per_step
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"rank {workers.rank}/{workers.world_size} experts",
        position=workers.local_rank,
        disable=not progress,
        leave=True,
    )
    with bar:
        for lo in range(0, len(todo), step):
            group = todo[lo : lo + step]
            # a second (step) bar only for a lone process: several ranks' nested bars would garble
            inner = progress and workers.world_size == 1
            for expert_id, tensors, meta in _train_group(cfg, data, group, workers.device, inner):
                save_expert_file(expert_path(out_dir, expert_id), tensors, {**meta, "fingerprint": fp})
                record["trained"].append(expert_id)
                bar.update(1)
                _maybe_crash(workers, len(record["trained"]))
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def expert_shape(cfg: RunConfig, data: RunData) -> dict[str, Any]:
    """The shape of every expert (the :class:`~momlp_lite.experts.StackedMLP` config)."""
    if cfg.optimiser.loss == "cross_entropy":
        n_out = int(data.y_train.max()) + 1
    else:
        n_out = int(data.y_train.shape[1])
    e = cfg.experts
    return dict(n_in=int(data.x_train.shape[1]), width=e.width, hidden_layers=e.hidden_layers, n_out=n_out,
                prelu=e.prelu, batchnorm=e.batchnorm)


def init_experts(cfg: RunConfig, shape: dict[str, Any], expert_ids: Sequence[int]) -> StackedMLP:
    """A stack of freshly initialised experts; expert ``i``'s weights depend only on ``(cfg.seed, i)``.

    Uses :class:`~momlp_lite.experts.StackedMLP`'s per-expert ``seed``, so expert ``i`` starts from the
    same weights whichever group, process or machine builds it.
    """
    return StackedMLP(len(expert_ids), expert_ids=list(expert_ids), seed=cfg.seed, **shape)


def train_config(cfg: RunConfig, data: RunData, device: torch.device, progress: bool = False) -> TrainConfig:
    """The Algorithm 2 trainer's settings for ``cfg``, with the step budget fixed for the whole run.

    The number of steps and the evaluation interval come from the largest training shard over
    *all* experts (not only the ones a process trains), so every expert gets the same budget
    whichever process trains it.
    """
    o = cfg.optimiser
    counts = data.leaf_counts()
    n_train = counts - torch.floor(counts.double() * o.val_fraction).long()
    n_max = max(1, int(n_train.max()))
    per_epoch = math.ceil(n_max / o.batch_size)
    return TrainConfig(
        loss=o.loss, optimizer=o.name, lr=o.lr, weight_decay=o.weight_decay, batch_size=o.batch_size,
        max_steps=max(1, math.ceil(o.epochs * n_max / o.batch_size)), max_epochs=None,
        val_fraction=o.val_fraction, patience=o.patience, eval_every=per_epoch, seed=cfg.seed,
        progress=progress, device=str(device),
    )


def _train_group(
    cfg: RunConfig, data: RunData, expert_ids: Sequence[int], device: torch.device, progress: bool = False
) -> list[tuple[int, dict[str, torch.Tensor], dict[str, str]]]:
    """Train ``expert_ids`` together (lockstep) with the Algorithm 2 trainer.

    Returns ``(id, tensors, metadata)`` per expert. An expert whose leaf got no training data
    keeps its initialisation (its file says so), so the store always holds every expert.
    """
    shape = expert_shape(cfg, data)
    model = init_experts(cfg, shape, expert_ids)
    counts = data.leaf_counts()
    with_data = [i for i in expert_ids if int(counts[i]) > 0]
    info: dict[int, dict[str, str]] = {i: {"trained": "no data"} for i in expert_ids}
    if with_data:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*validation split.*")
            res = train_experts(model, data.x_train, data.y_train, data.leaf,
                                train_config(cfg, data, device, progress), expert_ids=with_data)
        for j, i in enumerate(res.expert_ids):
            info[i] = {
                "trained": "yes",
                "n_train": str(int(res.n_train[j])),
                "n_val": str(int(res.n_val[j])),
                "best_val_loss": json.dumps(None if not np.isfinite(res.best_val[j]) else float(res.best_val[j])),
                "best_step": str(int(res.best_step[j])),
                "stop_step": str(int(res.stop_step[j])),
            }
    shape_text = json.dumps(model.config, sort_keys=True)
    return [
        (i, model.expert_state(i), {"expert_id": str(i), "config": shape_text, **info[i]})
        for i in expert_ids
    ]


# ---------------------------------------------------------------------------- manifest
def finalize(
    cfg: RunConfig,
    data: RunData,
    out_dir: Path,
    scan: dict[int, tuple[str, str | None]] | None = None,
) -> dict[str, Any]:
    """Check every expert file and write the manifest (with the tree); return the manifest.

    The manifest has the layout of :class:`momlp_lite.store.ExpertStore`, so the finished run
    directory opens with ``ExpertStore(out_dir)`` for one-expert-at-a-time inference. ``scan`` is
    a fresh :func:`_scan` of all experts (computed when not given).

    Raises
    ------
    RuntimeError
        Naming the missing or corrupt experts, if any (re-run the command to train them).
    """
    if scan is None:
        scan = _scan(out_dir, range(data.num_experts), cfg.fingerprint())
    bad = {i: st for i, (st, _) in scan.items() if st != "done"}
    if bad:
        shown = ", ".join(f"{i} ({st})" for i, st in list(bad.items())[:10])
        raise RuntimeError(
            f"{len(bad)} of {data.num_experts} experts are not done: {shown}; re-run the same command to train them"
        )
    shape = StackedMLP(1, **expert_shape(cfg, data), device="meta")  # no memory: just the config
    manifest = {
        "kind": "momlp-experts",
        "config": shape.config,
        "num_experts": data.num_experts,
        "parameters_per_expert": shape.parameters_per_expert,
        "experts": {
            str(i): {"file": expert_path(out_dir, i).relative_to(out_dir).as_posix(), "sha256": digest}
            for i, (_, digest) in sorted(scan.items())
        },
        "info": {
            "trained_by": "momlp_lite.distributed",
            "fingerprint": cfg.fingerprint(),
            "run_config": cfg.to_dict(),
            "train_points_per_expert": data.leaf_counts().tolist(),
        },
    }
    write_manifest(out_dir, manifest, data.tree)
    return manifest


def _stray_temporaries(out_dir: Path, remove: bool = False) -> list[str]:
    """Temporary files left by writes that a crash interrupted (removed when ``remove``)."""
    found = [p for d in (out_dir, out_dir / EXPERT_DIR) if d.is_dir() for p in d.iterdir() if is_temporary_file(p)]
    if remove:
        for p in found:
            p.unlink(missing_ok=True)
    return sorted(p.name for p in found)


def compare_stores(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Differences between the experts of two run directories (empty list: identical).

    Every expert file is loaded with its checksum checked and compared tensor by tensor with
    ``torch.equal`` — bit for bit, not within a tolerance — and the fingerprints must agree. The
    routing trees are compared the same way. (Other metadata, such as validation losses, is not
    compared.)
    """
    pa, pb = Path(a), Path(b)
    diffs: list[str] = []
    files_a = sorted(p.name for p in (pa / EXPERT_DIR).glob("expert_*.safetensors"))
    files_b = sorted(p.name for p in (pb / EXPERT_DIR).glob("expert_*.safetensors"))
    if files_a != files_b:
        diffs.append(f"expert files differ: {sorted(set(files_a) ^ set(files_b))[:10]}")
    for name in sorted(set(files_a) & set(files_b)):
        ta, ma = load_expert_file(pa / EXPERT_DIR / name)
        tb, mb = load_expert_file(pb / EXPERT_DIR / name)
        if set(ta) != set(tb):
            diffs.append(f"{name}: tensor names differ")
            continue
        diffs += [f"{name}: tensor {k!r} differs" for k in sorted(ta) if not torch.equal(ta[k], tb[k])]
        if ma.get("fingerprint") != mb.get("fingerprint"):
            diffs.append(f"{name}: trained with different settings")
    for name in (RUN_TREE,):
        ta, _ = load_expert_file(pa / name)
        tb, _ = load_expert_file(pb / name)
        if set(ta) != set(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta):
            diffs.append(f"{name}: routing trees differ")
    return diffs


# ---------------------------------------------------------------------------- whole run
def run(
    cfg: RunConfig,
    shard: tuple[int, int] | None = None,
    device: str | None = None,
    progress: bool = True,
    prepare_only: bool = False,
    timeout_min: float = 24 * 60,
) -> dict[str, Any]:
    """Train (this process's share of) the MoMLP of ``cfg``; return the run summary.

    Call it in every process (``torchrun`` starts them); the summary is complete on rank 0.
    """
    if prepare_only and (shard is not None or _env_int("WORLD_SIZE", 1) > 1):
        raise ValueError("--prepare runs in one process; start it without torchrun and without --shard")
    train_data = load_training_data(cfg)  # a bad data file stops the run here, before anything is written
    workers = start_workers(shard, device, timeout_min)
    out_dir = Path(cfg.run.output_dir)
    try:
        t0 = time.perf_counter()
        removed: list[str] = []
        if workers.is_main or workers.mode == "shard":
            out_dir.mkdir(parents=True, exist_ok=True)
        if workers.is_main and workers.mode != "shard":
            # nobody writes yet: leftovers of a crashed run can go (job-array tasks may be mid-write)
            removed = _stray_temporaries(out_dir, remove=True)
        _barrier(workers)
        if prepare_only:
            data = prepare(cfg, out_dir, workers, train_data)
            return {"prepared": True, "output_dir": str(out_dir), "num_experts": data.num_experts}
        data = prepare(cfg, out_dir, workers, train_data)
        record = train_shard(cfg, data, out_dir, workers, progress)
        _barrier(workers)
        records = [record]
        if workers.grouped:
            gathered: list[Any] = [None] * workers.world_size
            dist.all_gather_object(gathered, record, **_SAFE_UNPICKLE)
            records = gathered
        summary: dict[str, Any] = {
            "output_dir": str(out_dir),
            "mode": workers.mode,
            "backend": workers.backend,
            "world_size": workers.world_size,
            "num_experts": data.num_experts,
            "fingerprint": cfg.fingerprint(),
            "ranks": records,
            "trained": sorted(i for r in records for i in r["trained"]),
            "skipped": sorted(i for r in records for i in r["skipped"]),
            "corrupt_retrained": sorted(i for r in records for i in r["corrupt"]),
        }
        complete = False
        if workers.is_main or workers.mode == "shard":  # in a job array, the last task to finish commits
            scan = _scan(out_dir, range(data.num_experts), cfg.fingerprint())
            complete = all(st == "done" for st, _ in scan.values())
            if complete:
                finalize(cfg, data, out_dir, scan)
        summary["complete"] = complete
        summary["removed_temporary_files"] = removed
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        if workers.is_main or workers.mode == "shard":
            name = SUMMARY_NAME if workers.mode != "shard" else f"summary.shard-{workers.rank}-of-{workers.world_size}.json"
            atomic_write_bytes(out_dir / name, json.dumps(summary, indent=2).encode())
        return summary
    finally:
        stop_workers(workers)


# ---------------------------------------------------------------------------- launching
def torchrun_command(
    config: str | os.PathLike[str],
    nproc_per_node: int = 2,
    *,
    nnodes: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "momlp",
    max_restarts: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``torchrun`` command line (as a list) that trains ``config`` on several processes.

    Without ``rdzv_endpoint`` it is a single-machine ``--standalone`` run; with it, every machine
    runs the same command and they meet at ``host:port`` (c10d rendezvous).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    cmd += [f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
            "-m", "momlp_lite.distributed", str(config), *extra_args]
    return cmd


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m momlp_lite.distributed",
        description="Train the experts of a MoMLP from a YAML/TOML config; under torchrun each rank "
        "trains its share. Re-running resumes: finished experts are skipped.",
    )
    p.add_argument("config", help="run config (.yaml, .yml or .toml)")
    p.add_argument("--output", help="output directory (overrides run.output_dir)")
    p.add_argument("--profile", choices=["smoke", "default", "paper"], help="profile for per-profile values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set experts.width=64 (VALUE is YAML)")
    p.add_argument("--shard", help="I/N: train shard I of N without a process group (job arrays)")
    p.add_argument("--prepare", action="store_true", help="only build and save the routing tree (before a job array)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument("--timeout-min", type=float, default=24 * 60,
                   help="how long ranks wait for the slowest one at the final barrier (minutes, default 1440)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    if args.output:
        out["run.output_dir"] = args.output
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the run summary as one JSON line at the end (rank 0)."""
    args = _parse_args(argv)
    try:
        cfg = load_run_config(args.config, profile=args.profile, overrides=_overrides(args))
        shard = parse_shard(args.shard) if args.shard else None
        if args.prepare and (shard is not None or _env_int("WORLD_SIZE", 1) > 1):
            raise ValueError("--prepare runs in one process; start it without torchrun and without --shard")
    except ValueError as err:  # ConfigError included: fail before any training
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps({"valid": True, "fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
        return 0
    try:
        summary = run(cfg, shard=shard, device=args.device, progress=not args.no_progress,
                      prepare_only=args.prepare, timeout_min=args.timeout_min)
    except ConfigError as err:  # e.g. a data file without x_train: found before any training
        print(f"error: {err}", file=sys.stderr)
        return 2
    if shard is None and _env_int("RANK", 0) != 0:
        return 0  # rank 0 reports for the whole group
    print(json.dumps(summary), flush=True)
    return 0 if summary.get("complete", True) or shard is not None else 1


if __name__ == "__main__":
    sys.exit(main())
