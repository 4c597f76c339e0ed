"""Peak tensor memory: a dispatch-mode meter on CPU, max_memory_allocated on CUDA (book/serving_one_expert)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryMeter", "MemoryReport", "measure_peak_memory"]


class TensorMemoryMeter(TorchDispatchMode):
    """Peak bytes (``peak_bytes``) of the live tensor storages aten ops create while active, each counted once.
    Taught in: book/serving_one_expert."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def _track(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper tensors
            return
        nbytes, ptr = storage.nbytes(), storage.data_ptr()
        if nbytes == 0 or (ptr in self._live and not self._live[ptr][0].expired()):
            return  # empty, or a view of (or the same) live storage
        # a new allocation: forget the storages freed since the last one first (memory only grows at allocations)
        for k in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current_bytes -= self._live.pop(k)[1]
        self._live[ptr] = (StorageWeakRef(storage), nbytes)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch API
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out


@dataclass
class MemoryReport:
    """Peak memory of a block (``peak_bytes``) and how it was measured (``how``). Taught in: book/serving_one_expert."""

    peak_bytes: int | None = 0
    how: str = ""


@contextmanager
def measure_peak_memory(device: torch.device | str, enabled: bool = True) -> Iterator[MemoryReport]:
    """Peak memory of the block on ``device``: CUDA's ``max_memory_allocated`` above the start, else a
    :class:`TensorMemoryMeter` (``enabled=False``: not measured). Taught in: book/serving_one_expert."""
    dev = torch.device(device)
    if not enabled:
        yield MemoryReport(peak_bytes=None, how="not measured")
    elif dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        report = MemoryReport(how="CUDA max_memory_allocated above the starting allocation")
        try:
            yield report
        finally:
            torch.cuda.synchronize(dev)
            report.peak_bytes = int(torch.cuda.max_memory_allocated(dev) - start)
    else:
        report = MemoryReport(how=f"peak bytes of live torch tensors created in the block ({dev.type})")
        meter = TensorMemoryMeter()
        try:
            with meter:
                yield report
        finally:
            report.peak_bytes = int(meter.peak_bytes)
