"""Who this process is in a run: a lone process, a torchrun rank (gloo or NCCL), or one task of a job array."""

from __future__ import annotations

import datetime
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..runtime import get_device

__all__ = ["Workers", "shard_ids", "parse_shard", "start_workers", "torchrun_command"]

# Object collectives pickle; where torch can, unpickle only tensors and plain containers.
SAFE_UNPICKLE = {"weights_only": True} if "weights_only" in inspect.signature(dist.all_gather_object).parameters else {}


@dataclass(frozen=True)
class Workers:
    """This process's place: ``mode`` ``"single"``, ``"torchrun"`` (a nccl or gloo group) or ``"shard"`` (``--shard``).
    Taught in: book/distributed_training."""

    rank: int
    world_size: int
    local_rank: int
    mode: str
    backend: str | None
    device: torch.device

    @property
    def writes(self) -> bool:
        """Rank 0 and every job-array task write the tree, the summary and the manifest."""
        return self.rank == 0 or self.mode == "shard"

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group, whose ``backend`` is then None)."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        elif self.backend:
            dist.barrier()

    def stop(self) -> None:
        """Tear down the process group, if this process has one."""
        if self.backend and dist.is_initialized():
            dist.destroy_process_group()


def shard_ids(ids: Sequence[int], rank: int, world_size: int) -> list[int]:
    """``ids[rank::world_size]``: the shares differ by at most one expert. Taught in: book/distributed_training."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(ids)[rank::world_size]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``--shard I/N`` (shard ``I`` of ``N``, 0-based). Taught in: book/distributed_training."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/16), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def env_int(name: str, default: int) -> int:
    """An integer environment variable (``RANK``, ``WORLD_SIZE``, ...); unset or empty gives ``default``."""
    return int(os.environ.get(name) or default)


def start_workers(shard: tuple[int, int] | None = None, device: str | None = None,
                  timeout_min: float = 24 * 60) -> Workers:
    """Who this process is; under torchrun start the group: NCCL when every local rank has its own GPU, else gloo.
    Taught in: book/distributed_training."""
    world = env_int("WORLD_SIZE", 1)
    if shard is not None:
        if world > 1:
            raise ValueError("--shard is for independent processes (job arrays); do not combine it with torchrun")
        return Workers(shard[0], shard[1], 0, "shard", None, get_device(device))
    if world == 1 and not dist.is_initialized():
        return Workers(0, 1, 0, "single", None, get_device(device))
    local_rank = env_int("LOCAL_RANK", 0)
    wanted = get_device(device) if device else None
    if torch.cuda.is_available() and (wanted is None or wanted.type == "cuda"):
        gpus = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(dev)
        # ranks sharing a GPU fall back to gloo: the group carries a barrier and two small objects, never gradients
        backend = "nccl" if env_int("LOCAL_WORLD_SIZE", 1) <= gpus else "gloo"
    else:
        dev, backend = wanted or torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if backend == "nccl" else None)
    return Workers(dist.get_rank(), dist.get_world_size(), local_rank, "torchrun", backend, dev)


def torchrun_command(config: str | os.PathLike[str], nproc_per_node: int = 2, *, nnodes: int | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "momlp", max_restarts: int = 0,
                     extra_args: Sequence[str] = ()) -> list[str]:
    """The ``torchrun`` command that trains ``config``: ``--standalone``, or the same command on every machine with
    ``rdzv_endpoint`` (``host:port``). Taught in: book/distributed_training."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        cmd += ["--standalone"]
    else:
        cmd += [f"--nnodes={nnodes or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id}"]
    return [*cmd, f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
            "-m", "momlp_lite.distributed", str(config), *extra_args]
