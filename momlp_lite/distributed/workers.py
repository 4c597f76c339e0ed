"""Who is this process in a run: a lone process, a torchrun rank (gloo or NCCL), or one task of a job array.

Taught in: book/distributed_training.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..runtime import get_device

__all__ = ["Workers", "shard_ids", "parse_shard", "start_workers", "stop_workers", "barrier", "torchrun_command",
           "env_int", "SAFE_UNPICKLE"]

# Object collectives pickle; where torch can, unpickle only tensors and plain containers.
SAFE_UNPICKLE = {"weights_only": True} if "weights_only" in inspect.signature(dist.broadcast_object_list).parameters else {}


@dataclass(frozen=True)
class Workers:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` (picks the GPU), ``mode``
    (``"single"``, ``"torchrun"`` with a process group, or ``"shard"``: ``--shard i/n``, no group), the group's
    ``backend`` (``"nccl"``/``"gloo"``, torchrun only) and the ``device`` it trains on.
    Taught in: book/distributed_training.
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

    Round-robin keeps the shards within one expert of each other in size, and neighboring
    leaves (often of similar size) land on different shards.
    Taught in: book/distributed_training.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(ids)[rank::world_size]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (shard ``i`` of ``n``, 0-based) as used by ``--shard``. Taught in: book/distributed_training."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/16), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def env_int(name: str, default: int) -> int:
    """An integer environment variable (``RANK``, ``WORLD_SIZE``...). Taught in: book/distributed_training."""
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def start_workers(shard: tuple[int, int] | None = None, device: str | None = None,
                  timeout_min: float = 24 * 60) -> Workers:
    """Find out who this process is; under ``torchrun`` start the process group.

    Under ``torchrun`` (``WORLD_SIZE`` set in the environment) the group uses NCCL when CUDA is
    available (each process on GPU ``LOCAL_RANK``) and gloo on CPU, or when more processes than
    GPUs run on one machine (they then share GPUs round-robin). ``shard=(i, n)`` runs shard
    ``i`` of ``n`` with no group. The group's ``timeout_min`` bounds how long the final barrier waits
    for the slowest rank, so it must exceed the longest shard's training time.
    Taught in: book/distributed_training.
    """
    world = env_int("WORLD_SIZE", 1)
    if shard is not None:
        if world > 1:
            raise ValueError("--shard is for independent processes (job arrays); do not combine it with torchrun")
        i, n = shard
        return Workers(i, n, 0, "shard", None, get_device(device))
    if world == 1 and not dist.is_initialized():
        return Workers(0, 1, 0, "single", None, get_device(device))
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    wanted = get_device(device) if device else None
    use_cuda = torch.cuda.is_available() and (wanted is None or wanted.type == "cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        dev = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(dev)
        # NCCL needs one GPU per rank; ranks sharing a GPU fall back to gloo, which is enough here:
        # the group only carries a barrier and two small object collectives, never gradients.
        backend = "nccl" if env_int("LOCAL_WORLD_SIZE", 1) <= gpus else "gloo"
    else:
        dev = wanted or torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=timeout_min),
                                device_id=dev if backend == "nccl" else None)
    return Workers(dist.get_rank(), dist.get_world_size(), local_rank, "torchrun", backend, dev)


def stop_workers(workers: Workers) -> None:
    """Tear down the process group (if this process started one). Taught in: book/distributed_training."""
    if workers.grouped and dist.is_initialized():
        dist.destroy_process_group()


def barrier(workers: Workers) -> None:
    """Wait for every rank (no-op for a lone process). Taught in: book/distributed_training."""
    if workers.grouped:
        if workers.backend == "nccl":
            dist.barrier(device_ids=[workers.device.index or 0])
        else:
            dist.barrier()


def torchrun_command(config: str | os.PathLike[str], nproc_per_node: int = 2, *, nnodes: int | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "momlp", max_restarts: int = 0,
                     extra_args: Sequence[str] = ()) -> list[str]:
    """The ``torchrun`` command line (as a list) that trains ``config`` on several processes.

    Without ``rdzv_endpoint`` it is a single-machine ``--standalone`` run; with it, every machine
    runs the same command and they meet at ``host:port`` (c10d rendezvous).
    Taught in: book/distributed_training.
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
