"""Train the experts of one MoMLP on many processes: every rank writes its experts into one expert store.

Taught in: book/distributed_training. Algorithm 2 trains every expert on its own leaf's data, so
the experts split over processes with no gradient exchange. Rank ``r`` of ``W`` trains ``ids[r::W]``
in lockstep groups of ``run.experts_per_step`` and writes each finished expert through the store
(:func:`momlp_lite.store.experts.write_expert`); rank 0 checks every expert and commits the manifest
(:func:`~momlp_lite.store.experts.write_manifest`). Expert ``i``'s initialization and data order
depend only on ``(seed, i)``: any number of processes writes the same store. Re-running resumes:
experts whose file is valid and has this config's fingerprint are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from ..data import make_grid_data
from ..moe.experts import StackedMLP
from ..moe.routing import RoutingTree
from ..moe.trainer import TrainConfig, train_experts
from ..store.checked import read_checked as _load_checked
from ..store.experts import (EXPERT_DIR, StoreError, atomic_write_bytes, expert_files,
                             load_tree, save_tree, write_expert, write_manifest)
from ..store.files import remove_abandoned_temporaries, store_lock, writing
from .config import ConfigError, RunConfig
from .workers import SAFE_UNPICKLE, Workers, barrier, env_int, shard_ids, start_workers, stop_workers

from ..moe.trainer import NonFiniteLossError

__all__ = ["CRASH_ENV", "load_training_data", "check_training_data", "build_tree", "init_experts", "train_config",
           "expert_status", "train_shard", "finalize", "compare_stores", "run"]

#: Test hook: ``"RANK:K"`` makes that rank die abruptly (SIGKILL) right after saving its K-th expert.
CRASH_ENV = "MOMLP_CRASH_AFTER"
SUMMARY_NAME = "summary.json"


# ---------------------------------------------------------------------------- data + tree
def load_training_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training points of ``cfg.data``; :class:`ConfigError` (naming ``data.path``) for bad files.
    Taught in: book/distributed_training.
    """
    d = cfg.data
    if d.kind == "grid":
        grid = make_grid_data(d.target, d.n, d.s, d.a, d.b, d.test_fraction, seed=cfg.seed)  # type: ignore[arg-type]
        return grid.x_train, grid.y_train
    where = f"data.path: {d.path!r}"
    try:
        with safe_open(str(d.path), framework="pt") as fh:
            names = set(fh.keys())
            if {"x_train", "y_train"} - names:
                raise ConfigError(f"{where} has no tensor {sorted({'x_train', 'y_train'} - names)[0]!r}; "
                                  f"it holds {sorted(names)}")
            x, y = fh.get_tensor("x_train"), fh.get_tensor("y_train")
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise ConfigError(f"{where} is not a readable safetensors file: {exc}") from None
    if x.ndim != 2 or len(x) < 1 or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ConfigError(f"{where}: x_train must be numbers of shape [N, n] with N >= 1, got {x.dtype} {tuple(x.shape)}")
    x = x.to(torch.float32)
    if cfg.train.loss == "cross_entropy":
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1 or len(y) != len(x) or bool((y < 0).any()):
            raise ConfigError(f"{where}: train.loss 'cross_entropy' needs y_train of non-negative integer class ids "
                              f"of shape [{len(x)}], got {y.dtype} {tuple(y.shape)}")
        y = y.long()
    else:
        y = y.reshape(len(y), -1) if y.ndim == 1 else y
        if y.ndim != 2 or len(y) != len(x) or y.dtype == torch.bool:
            raise ConfigError(f"{where}: y_train must be numbers of shape [{len(x)}, k], got {y.dtype} {tuple(y.shape)}")
        y = y.to(torch.float32)
    for name, t in (("x_train", x), ("y_train", y)):
        bad = ~torch.isfinite(t.float())
        if bool(bad.any()):
            rows = torch.nonzero(bad.reshape(len(t), -1).any(1)).flatten()
            raise ConfigError(f"{where}: {name} has NaN or inf (or values beyond float32) in {len(rows)} rows, "
                              f"first row {int(rows[0])}; clean the data file")
    return x, y


def check_training_data(cfg: RunConfig, x: torch.Tensor) -> None:
    """Checks that need the data (``--check`` runs them too): a k-means tree needs a point per leaf.
    Taught in: book/distributed_training.
    """
    r = cfg.routing
    if r.kind == "kmeans" and len(x) < r.branching**r.depth:
        raise ConfigError(f"routing: a k-means tree with branching={r.branching}, depth={r.depth} has "
                          f"{r.branching**r.depth} leaves but the data has only {len(x)} training points; "
                          "lower routing.depth or routing.branching")


def build_tree(cfg: RunConfig, x_train: torch.Tensor) -> RoutingTree:
    """The routing tree ``cfg.routing`` asks for (deterministic given the config).
    Taught in: book/distributed_training.
    """
    r = cfg.routing
    if r.kind == "regular":
        return RoutingTree.regular(cfg.data.n, r.depth, r.branching, cfg.data.a, cfg.data.b)  # type: ignore[arg-type]
    return RoutingTree.from_data(x_train, r.depth, r.branching, r.iters, seed=cfg.seed)


def _find_tree(out_dir: Path, fingerprint: str) -> RoutingTree | None:
    """The tree an earlier run (or ``--prepare``) saved for this fingerprint, if any."""
    for p in sorted(out_dir.glob("routing_tree.*.safetensors")):
        try:
            tree, meta = load_tree(p)
        except StoreError:
            continue
        if meta.get("fingerprint") == fingerprint:
            return tree
    return None


def _get_tree(cfg: RunConfig, out_dir: Path, workers: Workers, x: torch.Tensor) -> RoutingTree:
    """Built once for the whole run (rank 0, or ``--prepare`` for job arrays) and broadcast."""
    fp = cfg.fingerprint()
    tree = _find_tree(out_dir, fp) if workers.is_main or workers.mode == "shard" else None
    if workers.mode == "shard" and tree is None:
        raise RuntimeError(f"no routing tree for this config in {str(out_dir)!r}; run "
                           "'python -m momlp_lite.distributed CONFIG --prepare' once before the job array")
    if workers.is_main and tree is None:
        tree = build_tree(cfg, x)
        save_tree(out_dir, tree, {"fingerprint": fp})
    if workers.grouped:
        box: list[Any] = [tree.state_dict() if tree is not None else None]
        dist.broadcast_object_list(box, src=0, device=workers.device if workers.backend == "nccl" else None,
                                   **SAFE_UNPICKLE)
        tree = RoutingTree.from_state_dict(box[0])
    assert tree is not None
    return tree


# ---------------------------------------------------------------------------- training
def expert_shape(cfg: RunConfig, y: torch.Tensor, n_in: int) -> dict[str, Any]:
    """The :class:`~momlp_lite.moe.experts.StackedMLP` config of every expert."""
    n_out = int(y.max()) + 1 if cfg.train.loss == "cross_entropy" else int(y.shape[1])
    e = cfg.experts
    return dict(n_in=n_in, width=e.width, hidden_layers=e.hidden_layers, n_out=n_out, prelu=e.prelu,
                batchnorm=e.batchnorm)


def init_experts(cfg: RunConfig, shape: dict[str, Any], expert_ids: Sequence[int]) -> StackedMLP:
    """Freshly initialized experts; expert ``i``'s weights depend only on ``(cfg.seed, i)``.
    Taught in: book/distributed_training.
    """
    return StackedMLP(len(expert_ids), expert_ids=list(expert_ids), seed=cfg.seed, **shape)


def train_config(cfg: RunConfig, counts: torch.Tensor, device: torch.device, progress: bool = False) -> TrainConfig:
    """``cfg.train`` with the step budget and evaluation interval fixed from the largest shard of *all* experts,
    so every expert gets the same budget whichever process (or group) trains it.
    Taught in: book/distributed_training.
    """
    t = cfg.train
    n_max = max(1, int((counts - torch.floor(counts.double() * t.val_fraction).long()).max()))
    steps = t.max_steps if t.max_epochs is None else max(1, math.ceil(t.max_epochs * n_max / t.batch_size))
    return dataclasses.replace(t, max_steps=steps, max_epochs=None, seed=cfg.seed, progress=progress,
                               device=str(device), eval_every=t.eval_every or math.ceil(n_max / t.batch_size))


def _train_group(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor, ids: list[int],
                 tcfg: TrainConfig) -> tuple[StackedMLP, dict[int, dict[str, str]], dict[int, str]]:
    """Train ``ids`` in lockstep: ``(model, metadata per trained expert, reason per failed expert)``.

    An expert whose loss became non-finite, or whose weights or validation loss are not finite, is
    failed (never recorded as trained); the others of its group are trained again without it.
    """
    counts = torch.bincount(leaf, minlength=max(ids) + 1)
    shape = expert_shape(cfg, y, int(x.shape[1]))
    failed: dict[int, str] = {}
    while True:
        todo = [i for i in ids if i not in failed]
        model = init_experts(cfg, shape, todo) if todo else None
        info = {i: {"trained": "no data"} for i in todo if int(counts[i]) == 0}
        with_data = [i for i in todo if int(counts[i]) > 0]
        if not with_data:
            return model, info, failed  # type: ignore[return-value]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*validation split.*")
                res = train_experts(model, x, y, leaf, tcfg, expert_ids=with_data)
        except NonFiniteLossError as err:
            new = [i for i in getattr(err, "experts", []) if i in with_data] or with_data
            failed.update({i: f"non-finite loss: {err}" for i in new})
            continue
        bad = {}
        for j, i in enumerate(res.expert_ids):
            last = int(res.stop_step[j]) if int(res.stop_step[j]) >= 0 else res.eval_steps[-1]
            seen = [e for e, step in enumerate(res.eval_steps) if 0 < step <= last]  # evaluations while it trained
            losses = [res.train_loss[seen, j], res.val_loss[seen, j] if int(res.n_val[j]) else []]
            state = model.expert_state(i)
            if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()) \
                    or not all(np.isfinite(v).all() for v in losses):
                bad[i] = "its loss became non-finite (NaN or inf in the data, or train.lr too large)"
            else:
                info[i] = {"trained": "yes", "n_train": str(int(res.n_train[j])), "n_val": str(int(res.n_val[j])),
                           "best_val_loss": json.dumps(float(res.best_val[j]) if int(res.n_val[j]) else None),
                           "best_step": str(int(res.best_step[j])), "stop_step": str(int(res.stop_step[j]))}
        if not bad:
            return model, info, failed
        failed.update(bad)


def _failed_marker(out_dir: Path, expert_id: int) -> Path:
    return out_dir / EXPERT_DIR / f"expert_{expert_id:05d}.failed.json"


def _scan(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, tuple[str, dict[str, str] | None]]:
    """``(status, manifest entry)`` per expert: ``done``, ``missing``, ``corrupt`` or ``failed``."""
    found: dict[int, tuple[str, dict[str, str] | None]] = {}
    for i in ids:
        status: tuple[str, dict[str, str] | None] = ("missing", None)
        for p in expert_files(out_dir, i):
            try:
                _, meta, digest = _load_checked(p)
            except StoreError:
                status = ("corrupt", None)
                continue
            if meta.get("fingerprint") != fingerprint:
                raise RuntimeError(f"{str(p)!r} was trained with different settings (fingerprint "
                                   f"{meta.get('fingerprint', '?')[:12]}…, this config {fingerprint[:12]}…); "
                                   "use a fresh run.output_dir or delete the old experts")
            status = ("done", {"file": p.relative_to(out_dir).as_posix(), "sha256": digest})
            break
        if status[0] != "done" and _failed_marker(out_dir, i).is_file():
            status = ("failed", None)
        found[i] = status
    return found


def expert_status(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, str]:
    """``"done"``, ``"missing"``, ``"corrupt"`` or ``"failed"`` per expert id (RuntimeError for other settings).
    Taught in: book/distributed_training.
    """
    return {i: st for i, (st, _) in _scan(Path(out_dir), ids, fingerprint).items()}


def _maybe_crash(workers: Workers, saved: int) -> None:
    """Test hook (:data:`CRASH_ENV` = ``"RANK:K"``): die like a killed process after K saves."""
    spec = os.environ.get(CRASH_ENV)
    if spec and int(spec.split(":")[0]) == workers.rank and saved >= int(spec.split(":")[1]) \
            and env_int("TORCHELASTIC_RESTART_COUNT", 0) == 0:
        sys.stdout.flush(), sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # what `kill -9` or the OOM killer does


def train_shard(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, tree: RoutingTree, out_dir: Path,
                workers: Workers, progress: bool = True) -> dict[str, Any]:
    """Train this process's experts that are not done; write each through the store. Returns the rank's record.
    Taught in: book/distributed_training.
    """
    from tqdm.auto import tqdm

    fp, leaf = cfg.fingerprint(), tree.route(x)
    mine = shard_ids(range(tree.num_leaves), workers.rank, workers.world_size)
    status = expert_status(out_dir, mine, fp)
    todo = [i for i in mine if status[i] != "done"]
    record: dict[str, Any] = {"rank": workers.rank, "device": str(workers.device), "assigned": mine,
                              "skipped": [i for i in mine if status[i] == "done"],
                              "corrupt": [i for i in mine if status[i] == "corrupt"], "trained": [], "failed": {}}
    start, step = time.perf_counter(), cfg.run.experts_per_step
    tcfg = train_config(cfg, torch.bincount(leaf, minlength=tree.num_leaves), workers.device,
                        progress and workers.world_size == 1)
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"rank {workers.rank}/{workers.world_size} experts",
              position=workers.local_rank, disable=not progress, leave=True) as bar:
        for lo in range(0, len(todo), step):
            model, info, failed = _train_group(cfg, x, y, leaf, todo[lo:lo + step], tcfg)
            for i, reason in failed.items():
                atomic_write_bytes(_failed_marker(out_dir, i), json.dumps(
                    {"expert_id": i, "fingerprint": fp, "reason": reason}, sort_keys=True).encode())
                record["failed"][str(i)] = reason
            shape = json.dumps(model.config, sort_keys=True) if model is not None else ""
            for i in sorted(info):
                write_expert(out_dir, i, model.expert_state(i), {"config": shape, "fingerprint": fp, **info[i]})
                _failed_marker(out_dir, i).unlink(missing_ok=True)
                record["trained"].append(i)
                bar.update(1)
                _maybe_crash(workers, len(record["trained"]))
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


# ---------------------------------------------------------------------------- commit
def finalize(cfg: RunConfig, tree: RoutingTree, n_in: int, y: torch.Tensor, out_dir: Path, start: float,
             scan: dict[int, tuple[str, dict[str, str] | None]]) -> dict[str, Any]:
    """Commit the store: the manifest of :class:`~momlp_lite.store.ExpertStore`, written by the store's writer.
    Taught in: book/distributed_training.
    """
    bad = {i: st for i, (st, _) in scan.items() if st != "done"}
    if bad:
        shown = ", ".join(f"{i} ({st})" for i, st in list(bad.items())[:10])
        raise RuntimeError(f"{len(bad)} of {tree.num_leaves} experts are not done: {shown}; re-run to train them")
    shape = StackedMLP(1, **expert_shape(cfg, y, n_in), device="meta")  # no memory: just the config
    manifest = {"kind": "momlp-experts", "config": shape.config, "num_experts": tree.num_leaves,
                "parameters_per_expert": shape.parameters_per_expert,
                "experts": {str(i): e for i, (_, e) in sorted(scan.items())},
                "info": {"trained_by": "momlp_lite.distributed", "fingerprint": cfg.fingerprint(),
                         "run_config": cfg.to_dict()}}
    write_manifest(out_dir, manifest, tree, holder_start=start, tree_meta={"fingerprint": cfg.fingerprint()})
    return manifest


def compare_stores(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Differences between two committed stores (empty: identical): every expert tensor and the tree's keys,
    bit for bit (``torch.equal``), and the fingerprints.
    Taught in: book/distributed_training.
    """
    from ..store.experts import ExpertStore

    sa, sb = ExpertStore(a), ExpertStore(b)
    if sa.expert_ids != sb.expert_ids:
        return [f"expert ids differ: {sorted(set(sa.expert_ids) ^ set(sb.expert_ids))[:10]}"]
    diffs = []
    for i in sa.expert_ids:
        (ta, ma, _), (tb, mb, _) = _load_checked(sa.expert_path(i)), _load_checked(sb.expert_path(i))
        if set(ta) != set(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta):
            diffs.append(f"expert {i}: tensors differ")
        if ma.get("fingerprint") != mb.get("fingerprint"):
            diffs.append(f"expert {i}: trained with different settings")
    if len(sa.tree.keys) != len(sb.tree.keys) or any(not torch.equal(p, q) for p, q in zip(sa.tree.keys, sb.tree.keys)):
        diffs.append("routing trees differ")
    return diffs


def run(cfg: RunConfig, shard: tuple[int, int] | None = None, device: str | None = None, progress: bool = True,
        prepare_only: bool = False, timeout_min: float = 24 * 60) -> dict[str, Any]:
    """Train (this process's share of) the MoMLP of ``cfg``; the summary is complete on rank 0.
    Taught in: book/distributed_training.
    """
    if prepare_only and (shard is not None or env_int("WORLD_SIZE", 1) > 1):
        raise ValueError("--prepare runs in one process; start it without torchrun and without --shard")
    x, y = load_training_data(cfg)  # a bad data file stops the run here, before anything is written
    check_training_data(cfg, x)
    workers = start_workers(shard, device, timeout_min)
    out_dir = Path(cfg.run.output_dir)
    if workers.is_main or workers.mode == "shard":
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier(workers)
    try:
        with writing(out_dir) as start:
            removed: list[str] = []
            if workers.is_main:  # only temp files whose writer is provably gone (a dead pid, or older than us)
                with store_lock(out_dir):
                    removed = remove_abandoned_temporaries([out_dir, out_dir / EXPERT_DIR], start)
            tree = _get_tree(cfg, out_dir, workers, x)
            if prepare_only:
                return {"prepared": True, "output_dir": str(out_dir), "num_experts": tree.num_leaves}
            record = train_shard(cfg, x, y, tree, out_dir, workers, progress)
            barrier(workers)
            records = [record]
            if workers.grouped:
                records = [None] * workers.world_size
                dist.all_gather_object(records, record, **SAFE_UNPICKLE)
            summary: dict[str, Any] = {
                "output_dir": str(out_dir), "mode": workers.mode, "backend": workers.backend,
                "world_size": workers.world_size, "num_experts": tree.num_leaves, "fingerprint": cfg.fingerprint(),
                "ranks": records, "trained": sorted(i for r in records for i in r["trained"]),
                "skipped": sorted(i for r in records for i in r["skipped"]),
                "corrupt_retrained": sorted(i for r in records for i in r["corrupt"]),
                "failed": {k: v for r in records for k, v in r["failed"].items()}}
            complete = False
            if workers.is_main or workers.mode == "shard":  # in a job array, the last task to finish commits
                scan = _scan(out_dir, range(tree.num_leaves), cfg.fingerprint())
                complete = all(st == "done" for st, _ in scan.values())
                summary["failed"] = {str(i): summary["failed"].get(str(i), "failed in an earlier run")
                                     for i, (st, _) in scan.items() if st == "failed"}
                if complete:
                    finalize(cfg, tree, int(x.shape[1]), y, out_dir, start, scan)
            summary.update(complete=complete, removed_temporary_files=removed,
                           seconds=round(time.time() - start, 3))
            if workers.is_main or workers.mode == "shard":
                name = SUMMARY_NAME if workers.mode != "shard" else f"summary.shard-{workers.rank}-of-{workers.world_size}.json"
                atomic_write_bytes(out_dir / name, json.dumps(summary, indent=2).encode())
            return summary
    finally:
        stop_workers(workers)

