"""Peak memory of torch tensors (CPU: a dispatch-mode meter; CUDA: max_memory_allocated).

Taught in: book/serving_one_expert.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryMeter", "MemoryReport", "measure_peak_memory", "maybe_measure"]


class TensorMemoryMeter(TorchDispatchMode):
    """Count the bytes of live torch tensor storages created while the meter is active.

    Every aten op's outputs are seen by this dispatch mode; their storages are tracked (each once)
    until they are freed (a weak reference to the storage expires). ``peak_bytes`` is the largest
    total seen right after an op, when its inputs and outputs are both alive. Tensors created
    outside the meter are not counted unless passed to :meth:`track`. This is a count of tensor
    memory, not of the process: the Python interpreter, torch's own libraries and allocator slack
    are left out, which is what makes it comparable between runs on a CPU.
    Taught in: book/serving_one_expert.
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
    """Peak memory of a block of work: ``peak_bytes`` and what was measured (``how``).
    Taught in: book/serving_one_expert.
    """

    peak_bytes: int | None = 0
    how: str = ""


@contextmanager
def measure_peak_memory(device: torch.device | str) -> Iterator[MemoryReport]:
    """Measure the peak memory of the block on ``device``. Taught in: book/serving_one_expert.

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
def maybe_measure(device: torch.device, measure: bool) -> Iterator[MemoryReport]:
    """:func:`measure_peak_memory` when ``measure``, else an empty report. Taught in: book/serving_one_expert."""
    if measure:
        with measure_peak_memory(device) as report:
            yield report
    else:
        yield MemoryReport(peak_bytes=None, how="not measured")

