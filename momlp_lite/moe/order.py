"""The data order of Algorithm 2, shared by the lockstep trainer and its serial reference.

Counter-based: which rows of a leaf are held out for validation depends only on ``(seed, leaf id,
rank of the row in its leaf)``, and expert ``e``'s shuffles depend only on ``(seed, e, epoch)``. So
an expert sees the same samples whichever experts are trained with it, in one lockstep group, in
another process, or alone in the serial reference loop.

Taught in: book/momlp_grid_regression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LeafSplit", "split_by_leaf", "LockstepSampler"]

_MASK32 = 0xFFFFFFFF
_SALT_VAL = 0x5EED0001
_SALT_EPOCH = 0x5EED0002


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash(*parts: torch.Tensor | int) -> torch.Tensor:
    """Hash broadcastable integer parts into 32-bit keys (deterministic on every device)."""
    h: torch.Tensor | int = 0x9E3779B9
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.long) if not isinstance(p, torch.Tensor) else p.long()
        h = _mix32((p & _MASK32) ^ h)
    assert isinstance(h, torch.Tensor)
    return h


@dataclass
class LeafSplit:
    """Rows of the data grouped by expert: ``train_rows`` / ``val_rows`` are sorted by expert.

    ``n_train[j]`` / ``n_val[j]`` rows belong to ``expert_ids[j]``; the shard of expert ``j``
    starts at ``train_offsets[j]`` (``val_offsets[j]``). Taught in: book/momlp_grid_regression.
    """

    expert_ids: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    n_train: torch.Tensor
    n_val: torch.Tensor

    @property
    def train_offsets(self) -> torch.Tensor:
        return torch.cumsum(self.n_train, 0) - self.n_train

    def rows_of(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and validation rows of the ``j``-th expert. Taught in: book/momlp_grid_regression."""
        t0, v0 = int(self.train_offsets[j]), int((torch.cumsum(self.n_val, 0) - self.n_val)[j])
        return self.train_rows[t0 : t0 + int(self.n_train[j])], self.val_rows[v0 : v0 + int(self.n_val[j])]

    @property
    def val_local(self) -> torch.Tensor:
        """For every validation row, the index ``j`` of its expert. Taught in: book/momlp_grid_regression."""
        return torch.repeat_interleave(torch.arange(len(self.n_val)), self.n_val)


def split_by_leaf(
    leaf: torch.Tensor, expert_ids: torch.Tensor, val_fraction: float, seed: int
) -> LeafSplit:
    """Partition rows by leaf and hold out ``floor(val_fraction * n_leaf)`` rows per leaf.

    Which rows of a leaf go to validation depends only on ``(seed, leaf id, rank of the row among
    that leaf's rows)``, so the split of one expert does not depend on which other experts are trained.
    Taught in: book/momlp_grid_regression.
    """
    leaf = leaf.cpu().long()
    ids = expert_ids.cpu().long()
    top = max(int(ids.max()), int(leaf.max()) if leaf.numel() else 0)
    table = torch.full((top + 1,), -1, dtype=torch.long)
    table[ids] = torch.arange(len(ids))
    local = table[leaf]
    rows = torch.nonzero(local >= 0).flatten()
    local = local[rows]
    by_leaf = torch.argsort(local, stable=True)
    rows, local = rows[by_leaf], local[by_leaf]
    counts = torch.bincount(local, minlength=len(ids))
    rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[local]
    key = _hash(seed, ids[local], _SALT_VAL, rank)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(local[order], stable=True)]  # by expert, shuffled within
    rows, local = rows[order], local[order]
    rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[local]
    n_val = torch.floor(counts.double() * val_fraction).long()
    is_val = rank < n_val[local]
    return LeafSplit(ids, rows[~is_val], rows[is_val], counts - n_val, n_val)


class LockstepSampler:
    """Per-step sample indices for every expert: ``indices(step) -> [L, B]`` positions in each shard.

    Expert ``j`` walks through fresh permutations of its ``n[j]`` samples, one per epoch
    (``max(1, n[j] // B)`` batches; the remainder of a permutation is dropped; a shard smaller than
    ``B`` repeats samples within the batch). Permutation ``e`` of expert ``j`` is the argsort of
    hash keys of ``(seed, expert id, e, position)``: no state is shared between experts, and all
    experts' permutations are made at once (no loop over experts). Taught in: book/momlp_grid_regression.
    """

    def __init__(self, n: torch.Tensor, expert_ids: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", block_elements: int = 1 << 22) -> None:
        self.n_cpu = n.cpu().long()
        if bool((self.n_cpu < 1).any()):
            raise ValueError("every shard needs at least one sample; drop empty experts first")
        L = len(self.n_cpu)
        self.device = torch.device(device)
        self.ids = expert_ids.long().to(self.device)
        self.n = self.n_cpu.to(self.device)
        self.batch = int(batch_size)
        self.seed = int(seed)
        self.per_epoch = torch.clamp(self.n_cpu // self.batch, min=1)
        self._per_epoch_dev = self.per_epoch.to(self.device)
        self.width = int(self.n_cpu.max())
        # permutations of several epochs are made at once: perm[j, k] is epoch base[j] + k of expert j
        self.epochs_per_block = max(1, min(256, block_elements // max(1, L * self.width)))
        self.perm = torch.zeros(L, self.epochs_per_block, self.width, dtype=torch.long, device=self.device)
        self.base = torch.full((L,), -self.epochs_per_block, dtype=torch.long)
        self._base_dev = self.base.to(self.device)
        self._rows = torch.arange(L, device=self.device)
        self._cols = torch.arange(self.width, device=self.device)
        self._block = torch.arange(self.epochs_per_block, device=self.device)
        self._arange_b = torch.arange(self.batch, device=self.device)

    def indices(self, step: int) -> torch.Tensor:
        """Positions ``[L, B]`` (into each expert's own shard) of the samples of ``step``.
        Taught in: book/momlp_grid_regression."""
        epoch = step // self.per_epoch
        stale = torch.nonzero((epoch < self.base) | (epoch >= self.base + self.epochs_per_block)).flatten()
        if len(stale):
            rows = stale.to(self.device)
            first_epoch = epoch[stale].to(self.device)
            key = _hash(self.seed, self.ids[rows, None, None], _SALT_EPOCH,
                        (first_epoch[:, None] + self._block)[:, :, None], self._cols)
            key = torch.where(self._cols < self.n[rows, None, None], key, torch.full_like(key, 1 << 40))
            self.perm[rows] = torch.argsort(key, dim=2, stable=True)
            self.base[stale] = epoch[stale]
            self._base_dev[rows] = first_epoch
        # everything below stays on the device: no host copy per step
        rel = step // self._per_epoch_dev - self._base_dev
        current = self.perm[self._rows, rel]
        first = (step % self._per_epoch_dev) * self.batch
        pos = (first[:, None] + self._arange_b) % self.n[:, None]
        return current.gather(1, pos)
