"""Algorithm 2's data order, shared by both trainers (counter-based hashes). Taught in: book/momlp_grid_regression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["split_by_leaf", "LockstepSampler"]

_MASK32 = 0xFFFFFFFF
_SALT_VAL = 0x5EED0001
_SALT_EPOCH = 0x5EED0002


def _hash(*parts: torch.Tensor | int) -> torch.Tensor:
    """Hash broadcastable integer parts into 32-bit keys with lowbias32 (deterministic on every device)."""
    h: Any = 0x9E3779B9
    for p in parts:
        x = (torch.as_tensor(p).long() & _MASK32) ^ h
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & _MASK32
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & _MASK32
        h = x ^ (x >> 16)
    return h


@dataclass
class LeafSplit:
    """Rows grouped by expert (``n_train[j]``, ``n_val[j]`` rows each). Taught in: book/momlp_grid_regression."""

    expert_ids: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    n_train: torch.Tensor
    n_val: torch.Tensor

    def rows_of(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and validation rows of the ``j``-th expert."""
        t0, v0 = int(self.n_train[:j].sum()), int(self.n_val[:j].sum())
        return self.train_rows[t0 : t0 + int(self.n_train[j])], self.val_rows[v0 : v0 + int(self.n_val[j])]


def split_by_leaf(leaf: torch.Tensor, expert_ids: torch.Tensor, val_fraction: float, seed: int) -> LeafSplit:
    """Partition rows by leaf; hold out ``floor(val_fraction * n_leaf)`` rows per leaf, chosen by ``(seed, leaf id,
    rank of the row in its leaf)`` alone. Taught in: book/momlp_grid_regression."""
    leaf, ids = leaf.cpu().long(), expert_ids.cpu().long()
    table = torch.full((max(int(ids.max()), int(leaf.max()) if leaf.numel() else 0) + 1,), -1, dtype=torch.long)
    table[ids] = torch.arange(len(ids))
    rows = torch.nonzero(table[leaf] >= 0).flatten()
    rows = rows[torch.argsort(table[leaf[rows]], stable=True)]
    local = table[leaf[rows]]
    counts = torch.bincount(local, minlength=len(ids))
    starts = torch.cumsum(counts, 0) - counts
    key = _hash(seed, ids[local], _SALT_VAL, torch.arange(len(rows)) - starts[local])
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(local[order], stable=True)]  # by expert, shuffled within
    rows, local = rows[order], local[order]
    n_val = torch.floor(counts.double() * val_fraction).long()
    is_val = torch.arange(len(rows)) - starts[local] < n_val[local]
    return LeafSplit(ids, rows[~is_val], rows[is_val], counts - n_val, n_val)


class LockstepSampler:
    """Per-step positions ``[L, B]`` into each expert's shard: a fresh hashed permutation of its ``n[j]`` samples
    per epoch of ``max(1, n[j] // B)`` batches. Taught in: book/momlp_grid_regression."""

    def __init__(self, n: torch.Tensor, expert_ids: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", block_elements: int = 1 << 22) -> None:
        self.n_cpu = n.cpu().long()
        if bool((self.n_cpu < 1).any()):
            raise ValueError("every shard needs at least one sample; drop empty experts first")
        L, self.device = len(self.n_cpu), torch.device(device)
        self.ids, self.n = expert_ids.long().to(self.device), self.n_cpu.to(self.device)
        self.batch, self.seed = int(batch_size), int(seed)
        self.per_epoch = torch.clamp(self.n_cpu // self.batch, min=1)
        self._per_epoch_dev = self.per_epoch.to(self.device)
        self.width = int(self.n_cpu.max())
        # perm[j, k] is epoch base[j] + k of expert j (base kept on the host and on the device)
        self.epochs_per_block = max(1, min(256, block_elements // max(1, L * self.width)))
        self.perm = torch.zeros(L, self.epochs_per_block, self.width, dtype=torch.long, device=self.device)
        self.base = torch.full((L,), -self.epochs_per_block, dtype=torch.long)
        self._base_dev = self.base.to(self.device)
        self._rows = torch.arange(L, device=self.device)
        self._arange_b = torch.arange(self.batch, device=self.device)

    def indices(self, step: int) -> torch.Tensor:
        """Positions ``[L, B]`` (into each expert's own shard) of the samples of ``step``."""
        epoch = step // self.per_epoch
        stale = torch.nonzero((epoch < self.base) | (epoch >= self.base + self.epochs_per_block)).flatten()
        if len(stale):
            rows, first_epoch = stale.to(self.device), epoch[stale].to(self.device)
            cols = torch.arange(self.width, device=self.device)
            epochs = first_epoch[:, None, None] + torch.arange(self.epochs_per_block, device=self.device)[:, None]
            key = _hash(self.seed, self.ids[rows, None, None], _SALT_EPOCH, epochs, cols)
            key = torch.where(cols < self.n[rows, None, None], key, torch.full_like(key, 1 << 40))
            self.perm[rows] = torch.argsort(key, dim=2, stable=True)
            self.base[stale] = epoch[stale]
            self._base_dev[rows] = first_epoch
        # everything below stays on the device: no host copy per step
        current = self.perm[self._rows, step // self._per_epoch_dev - self._base_dev]
        first = (step % self._per_epoch_dev) * self.batch
        return current.gather(1, (first[:, None] + self._arange_b) % self.n[:, None])
