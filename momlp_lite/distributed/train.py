"""Train a MoMLP's experts on many processes: rank ``r`` of ``W`` trains ``ids[r::W]`` through the store, rank 0
commits; expert ``i`` depends only on ``(seed, i)``, and a re-run skips experts already done."""

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

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from ..data import make_grid_data
from ..moe.experts import StackedMLP
from ..moe.routing import RoutingTree
from ..moe.trainer import NonFiniteLossError, TrainConfig, train_experts
from ..store.experts import EXPERT_DIR, ExpertStore, commit_experts, expert_files, load_tree, save_tree, write_expert
from ..store.files import (StoreError, atomic_write_bytes, read_checked, remove_abandoned_temporaries, store_lock,
                           writing)
from .config import ConfigError, RunConfig
from .workers import SAFE_UNPICKLE, Workers, env_int, shard_ids, start_workers

__all__ = ["CRASH_ENV", "load_training_data", "init_experts", "expert_status", "compare_stores", "run"]

#: Test hook: ``"RANK:K"`` makes that rank die abruptly (SIGKILL) right after saving its K-th expert.
CRASH_ENV = "MOMLP_CRASH_AFTER"


def load_training_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked training points of ``cfg.data``, else ConfigError. Taught in: book/distributed_training."""
    d, r = cfg.data, cfg.routing
    if d.kind == "grid":
        grid = make_grid_data(d.target, d.n, d.s, d.a, d.b, d.test_fraction, seed=cfg.seed)
        x, y = grid.x_train, grid.y_train
    else:
        x, y = _read_data_file(cfg)
    if r.kind == "kmeans" and len(x) < r.branching**r.depth:
        raise ConfigError(f"routing: a k-means tree with branching={r.branching}, depth={r.depth} has "
                          f"{r.branching**r.depth} leaves but the data has only {len(x)} training points; "
                          "lower routing.depth or routing.branching")
    return x, y


def _read_data_file(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"data.path: {cfg.data.path!r}"
    try:
        with safe_open(str(cfg.data.path), framework="pt") as fh:
            names = sorted(fh.keys())
            x, y = (fh.get_tensor(k) if k in names else None for k in ("x_train", "y_train"))
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise ConfigError(f"{where} is not a readable safetensors file: {exc}") from None
    for name, t in (("x_train", x), ("y_train", y)):
        if t is None:
            raise ConfigError(f"{where} has no tensor {name!r}; it holds {names}")
    if x.ndim != 2 or len(x) < 1 or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ConfigError(f"{where}: x_train must be numbers of shape [N, n] with N >= 1, "
                          f"got {x.dtype} {tuple(x.shape)}")
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
            raise ConfigError(f"{where}: y_train must be numbers of shape [{len(x)}, k], "
                              f"got {y.dtype} {tuple(y.shape)}")
        y = y.to(torch.float32)
    for name, t in (("x_train", x), ("y_train", y)):
        bad = ~torch.isfinite(t.float())
        if bool(bad.any()):
            rows = torch.nonzero(bad.reshape(len(t), -1).any(1)).flatten()
            raise ConfigError(f"{where}: {name} has NaN or inf (or values beyond float32) in {len(rows)} rows, "
                              f"first row {int(rows[0])}; clean the data file")
    return x, y


def _get_tree(cfg: RunConfig, out_dir: Path, workers: Workers, x: torch.Tensor) -> RoutingTree:
    """Built once for the whole run (rank 0, or ``--prepare`` for job arrays), saved, and broadcast."""
    fp, tree = cfg.fingerprint(), None
    for p in sorted(out_dir.glob("routing_tree.*.safetensors")) if workers.writes else ():
        try:
            found, meta = load_tree(p)
        except StoreError:
            continue
        if meta.get("fingerprint") == fp:
            tree = found
            break
    if workers.mode == "shard" and tree is None:
        raise RuntimeError(f"no routing tree for this config in {str(out_dir)!r}; run "
                           "'python -m momlp_lite.distributed CONFIG --prepare' once before the job array")
    if workers.rank == 0 and tree is None:
        r = cfg.routing
        if r.kind == "regular":
            tree = RoutingTree.regular(cfg.data.n, r.depth, r.branching, cfg.data.a, cfg.data.b)
        else:
            tree = RoutingTree.from_data(x, r.depth, r.branching, r.iters, seed=cfg.seed)
        save_tree(out_dir, tree, {"fingerprint": fp})
    if workers.backend:
        box: list[Any] = [tree.state_dict() if tree is not None else None]
        dist.broadcast_object_list(box, src=0, device=workers.device if workers.backend == "nccl" else None,
                                   **SAFE_UNPICKLE)
        tree = RoutingTree.from_state_dict(box[0])
    return tree


def _expert_shape(cfg: RunConfig, y: torch.Tensor, n_in: int) -> dict[str, Any]:
    n_out = int(y.max()) + 1 if cfg.train.loss == "cross_entropy" else int(y.shape[1])
    e = cfg.experts
    return dict(n_in=n_in, width=e.width, hidden_layers=e.hidden_layers, n_out=n_out, prelu=e.prelu,
                batchnorm=e.batchnorm)


def init_experts(cfg: RunConfig, shape: dict[str, Any], expert_ids: Sequence[int]) -> StackedMLP:
    """New experts; expert ``i``'s weights depend only on ``(cfg.seed, i)``. Taught in: book/distributed_training."""
    return StackedMLP(len(expert_ids), expert_ids=list(expert_ids), seed=cfg.seed, **shape)


def _train_config(cfg: RunConfig, counts: torch.Tensor, device: torch.device, progress: bool) -> TrainConfig:
    """``cfg.train`` with the step budget and evaluation interval fixed by the largest leaf of *all* experts."""
    t = cfg.train
    n_max = max(1, int((counts - torch.floor(counts.double() * t.val_fraction).long()).max()))
    steps = t.max_steps if t.max_epochs is None else max(1, math.ceil(t.max_epochs * n_max / t.batch_size))
    return dataclasses.replace(t, max_steps=steps, max_epochs=None, seed=cfg.seed, progress=progress,
                               device=str(device), eval_every=t.eval_every or math.ceil(n_max / t.batch_size))


def _train_group(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor, ids: list[int],
                 tcfg: TrainConfig) -> tuple[StackedMLP | None, dict[int, dict[str, str]], dict[int, str]]:
    """Train ``ids`` in lockstep: ``(model, metadata per trained expert, reason per failed expert)``; a failed expert
    (non-finite loss or weights) is never recorded as trained, and the rest of its group trains again without it."""
    counts = torch.bincount(leaf, minlength=max(ids) + 1)
    shape = _expert_shape(cfg, y, int(x.shape[1]))
    failed: dict[int, str] = {}
    while True:
        todo = [i for i in ids if i not in failed]
        model = init_experts(cfg, shape, todo) if todo else None
        info = {i: {"trained": "no data"} for i in todo if int(counts[i]) == 0}
        with_data = [i for i in todo if int(counts[i]) > 0]
        if not with_data:
            return model, info, failed
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*validation split.*")
                res = train_experts(model, x, y, leaf, tcfg, expert_ids=with_data)
        except NonFiniteLossError as err:
            new = [i for i in err.experts if i in with_data] or with_data
            failed.update({i: f"non-finite loss: {err}" for i in new})
            continue
        for j, i in enumerate(res.expert_ids):
            if not all(bool(torch.isfinite(v).all()) for v in model.expert_state(i).values() if v.is_floating_point()):
                failed[i] = "its loss became non-finite (NaN or inf in the data, or train.lr too large)"
            else:
                info[i] = {"trained": "yes", "n_train": str(int(res.n_train[j])), "n_val": str(int(res.n_val[j])),
                           "best_val_loss": json.dumps(float(res.best_val[j]) if int(res.n_val[j]) else None),
                           "best_step": str(int(res.best_step[j])), "stop_step": str(int(res.stop_step[j]))}
        if not set(res.expert_ids) & set(failed):
            return model, info, failed


def _failed_marker(out_dir: Path, expert_id: int) -> Path:
    return out_dir / EXPERT_DIR / f"expert_{expert_id:05d}.failed.json"


def _scan(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, tuple[str, dict[str, str] | None]]:
    """``(status, manifest entry)`` per expert: ``done``, ``missing``, ``corrupt`` or ``failed``."""
    found: dict[int, tuple[str, dict[str, str] | None]] = {}
    for i in ids:
        found[i] = ("missing", None)
        for p in expert_files(out_dir, i):
            try:
                _, meta, digest = read_checked(p)
            except StoreError:
                found[i] = ("corrupt", None)
                continue
            if meta.get("fingerprint") != fingerprint:
                raise RuntimeError(f"{str(p)!r} was trained with different settings (fingerprint "
                                   f"{meta.get('fingerprint', '?')[:12]}…, this config {fingerprint[:12]}…); "
                                   "use a fresh run.output_dir or delete the old experts")
            found[i] = ("done", {"file": p.relative_to(out_dir).as_posix(), "sha256": digest})
            break
        if found[i][0] != "done" and _failed_marker(out_dir, i).is_file():
            found[i] = ("failed", None)
    return found


def expert_status(out_dir: Path, ids: Sequence[int], fingerprint: str) -> dict[int, str]:
    """``"done"``, ``"missing"``, ``"corrupt"`` or ``"failed"`` per expert id. Taught in: book/distributed_training."""
    return {i: st for i, (st, _) in _scan(Path(out_dir), ids, fingerprint).items()}


def _maybe_crash(workers: Workers, saved: int) -> None:
    """Test hook (:data:`CRASH_ENV` = ``"RANK:K"``): die like a killed process after K saves."""
    spec = os.environ.get(CRASH_ENV)
    if spec and int(spec.split(":")[0]) == workers.rank and saved >= int(spec.split(":")[1]) \
            and env_int("TORCHELASTIC_RESTART_COUNT", 0) == 0:
        sys.stdout.flush(), sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # what `kill -9` or the OOM killer does


def _train_shard(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, tree: RoutingTree, out_dir: Path,
                 workers: Workers, progress: bool) -> dict[str, Any]:
    """Train this process's experts that are not done, writing each through the store; returns the rank's record."""
    fp, leaf = cfg.fingerprint(), tree.route(x)
    mine = shard_ids(range(tree.num_leaves), workers.rank, workers.world_size)
    status = expert_status(out_dir, mine, fp)
    todo = [i for i in mine if status[i] != "done"]
    record: dict[str, Any] = {"rank": workers.rank, "device": str(workers.device), "assigned": mine,
                              "skipped": [i for i in mine if status[i] == "done"],
                              "corrupt": [i for i in mine if status[i] == "corrupt"], "trained": [], "failed": {}}
    start, step = time.perf_counter(), cfg.run.experts_per_step
    tcfg = _train_config(cfg, torch.bincount(leaf, minlength=tree.num_leaves), workers.device,
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


def compare_stores(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Differences (``torch.equal``) of two stores' expert tensors, fingerprints and tree keys.
    Taught in: book/distributed_training."""
    sa, sb = ExpertStore(a), ExpertStore(b)
    if sa.expert_ids != sb.expert_ids:
        return [f"expert ids differ: {sorted(set(sa.expert_ids) ^ set(sb.expert_ids))[:10]}"]
    diffs = []
    for i in sa.expert_ids:
        (ta, ma, _), (tb, mb, _) = read_checked(sa.expert_path(i)), read_checked(sb.expert_path(i))
        if set(ta) != set(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta):
            diffs.append(f"expert {i}: tensors differ")
        if ma.get("fingerprint") != mb.get("fingerprint"):
            diffs.append(f"expert {i}: trained with different settings")
    if len(sa.tree.keys) != len(sb.tree.keys) or any(not torch.equal(p, q) for p, q in zip(sa.tree.keys, sb.tree.keys)):
        diffs.append("routing trees differ")
    return diffs


def run(cfg: RunConfig, shard: tuple[int, int] | None = None, device: str | None = None, progress: bool = True,
        prepare_only: bool = False, timeout_min: float = 24 * 60) -> dict[str, Any]:
    """Train this process's share of ``cfg``'s MoMLP; rank 0's summary is complete.
    Taught in: book/distributed_training."""
    if prepare_only and (shard is not None or env_int("WORLD_SIZE", 1) > 1):
        raise ValueError("--prepare runs in one process; start it without torchrun and without --shard")
    x, y = load_training_data(cfg)  # a bad data file stops the run here, before anything is written
    workers = start_workers(shard, device, timeout_min)
    out_dir, fp = Path(cfg.run.output_dir), cfg.fingerprint()
    workers.barrier()
    try:
        with writing(out_dir) as start:  # registering creates the folder
            removed: list[str] = []
            if workers.rank == 0:  # only temp files whose writer is provably gone (a dead pid, or older than us)
                with store_lock(out_dir):
                    removed = remove_abandoned_temporaries([out_dir, out_dir / EXPERT_DIR], start)
            tree = _get_tree(cfg, out_dir, workers, x)
            if prepare_only:
                return {"prepared": True, "output_dir": str(out_dir), "num_experts": tree.num_leaves}
            record = _train_shard(cfg, x, y, tree, out_dir, workers, progress)
            workers.barrier()
            records = [record]
            if workers.backend:
                records = [None] * workers.world_size
                dist.all_gather_object(records, record, **SAFE_UNPICKLE)
            summary: dict[str, Any] = {
                "output_dir": str(out_dir), "mode": workers.mode, "backend": workers.backend,
                "world_size": workers.world_size, "num_experts": tree.num_leaves, "fingerprint": fp, "ranks": records,
                "trained": sorted(i for r in records for i in r["trained"]),
                "skipped": sorted(i for r in records for i in r["skipped"]),
                "corrupt_retrained": sorted(i for r in records for i in r["corrupt"]),
                "failed": {k: v for r in records for k, v in r["failed"].items()}, "complete": False,
                "removed_temporary_files": removed}
            if workers.writes:  # in a job array, the last task to finish commits
                scan = _scan(out_dir, range(tree.num_leaves), fp)
                summary["complete"] = all(st == "done" for st, _ in scan.values())
                summary["failed"] = {str(i): summary["failed"].get(str(i), "failed in an earlier run")
                                     for i, (st, _) in scan.items() if st == "failed"}
                if summary["complete"]:
                    shape = StackedMLP(1, **_expert_shape(cfg, y, int(x.shape[1])), device="meta")  # just the config
                    info = {"trained_by": "momlp_lite.distributed", "fingerprint": fp,
                            "run_config": dataclasses.asdict(cfg)}
                    entries = {str(i): e for i, (_, e) in sorted(scan.items())}
                    commit_experts(out_dir, shape, entries, tree, info, start, {"fingerprint": fp})
                summary["seconds"] = round(time.time() - start, 3)
                name = f"summary.shard-{workers.rank}-of-{workers.world_size}" if workers.mode == "shard" else "summary"
                atomic_write_bytes(out_dir / f"{name}.json", json.dumps(summary, indent=2).encode())
            return summary
    finally:
        workers.stop()
