"""Algorithm 2: train every expert only on its own leaf's data.

The book's reading of Kratsios et al.'s "Algorithm 2: MoMLPs Training" (its text is not
available): partition the training set by leaf, hold out a validation split *per expert*, and
train each expert independently on its own shard with early stopping on its own validation loss.

:func:`train_experts` does this for all experts at once, in **lockstep**: every step draws ``B``
samples from each expert's shard, runs the stacked experts with batched matmuls and sums the
per-expert mean losses. Because the loss is a sum of per-expert terms and Adam/AdamW act
element-wise, every expert's update is exactly what it would get if trained alone — there is no
global gradient clipping and no loss averaged across experts. :func:`train_experts_serial` is the
plain reference: one ``nn.Sequential`` and one optimizer per expert, one expert after the other.
From the same initialisation and data order both give the same parameters (to float tolerance;
``tests/test_train.py`` checks it).

The data order is *counter-based*: expert ``e``'s shuffles depend only on ``(seed, e, epoch)``, so
training a subset of expert ids (one process per subset, say) reproduces exactly what the full
run does for those experts, provided ``max_steps`` and ``eval_every`` are given explicitly.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..runtime import get_device
from ..moe.experts import StackedMLP

__all__ = [
    "TrainConfig",
    "TrainResult",
    "LeafSplit",
    "split_by_leaf",
    "LockstepSampler",
    "train_experts",
    "train_experts_serial",
    "train_dense",
    "per_expert_loss",
    "TrainStep",
]

LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("adam", "adamw")
_MASK32 = 0xFFFFFFFF
_SALT_VAL = 0x5EED0001
_SALT_EPOCH = 0x5EED0002


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    """How to train experts (every field has the paper's regression setting as default).

    Attributes
    ----------
    loss : ``"mse"`` or ``"cross_entropy"`` (targets ``[N, n_out]`` floats, or ``[N]`` class ids).
    optimizer : ``"adam"`` or ``"adamw"``.
    lr : learning rate (Kratsios et al.: Adam 1e-4 for regression, AdamW 1e-3 for images).
    weight_decay : ``None`` keeps the optimizer's default (Adam 0, AdamW 0.01).
    batch_size : samples drawn from *each* expert's shard per step.
    max_steps : steps of the lockstep loop; ignored when ``max_epochs`` is set.
    max_epochs : budget in passes over the *largest* trained shard (steps = ceil(epochs * n_max / B)).
    val_fraction : share of each leaf held out for that expert's validation.
    patience : evaluations without improvement before an expert stops; ``None`` never stops early.
    eval_every : steps between evaluations; ``None`` = one epoch of the largest trained shard.
    min_delta : an improvement must beat the best validation loss by more than this.
    seed : seeds the validation split and the per-expert data order.
    bf16 : run forward/backward under bfloat16 autocast (a GPU lever; fp32 master weights).
    fused : fused optimizer kernel; ``None`` = on for CUDA, off elsewhere.
    compile : ``torch.compile`` the forward+loss (``True`` or a mode string); CUDA only, ignored elsewhere.
    cuda_graph : capture forward+backward+optimizer step in one CUDA graph (CUDA only, ignored elsewhere).
    progress : show a tqdm progress bar.
    device : where to train (``"cpu"``, ``"cuda"``...); ``None`` = :func:`momlp_lite.config.get_device`.
    """

    loss: str = "mse"
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float | None = None
    batch_size: int = 128
    max_steps: int = 1000
    max_epochs: float | None = None
    val_fraction: float = 0.1
    patience: int | None = 10
    eval_every: int | None = None
    min_delta: float = 0.0
    seed: int = 0
    bf16: bool = False
    fused: bool | None = None
    compile: bool | str = False
    cuda_graph: bool = False
    progress: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ValueError(f"max_epochs must be > 0 (or None), got {self.max_epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None to never stop early), got {self.patience}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 (or None for one epoch), got {self.eval_every}")


@dataclass
class TrainResult:
    """What a training run did; the model itself is updated in place.

    Arrays indexed ``[..., j]`` follow ``expert_ids[j]``; histories have one row per evaluation
    (``eval_steps``) and hold NaN where an expert had no validation data or had already stopped.
    ``stop_step`` is -1 for experts that never stopped early; ``best_step`` is -1 for experts without
    validation data (they keep their final parameters).
    """

    expert_ids: list[int]
    skipped_ids: list[int]
    n_train: np.ndarray
    n_val: np.ndarray
    eval_steps: list[int]
    train_loss: np.ndarray
    val_loss: np.ndarray
    best_val: np.ndarray
    best_step: np.ndarray
    stop_step: np.ndarray
    steps_run: int
    batch_size: int
    seconds: float
    device: str
    config: TrainConfig = field(repr=False)

    @property
    def samples_per_second(self) -> float:
        """Training samples processed per second (all experts together)."""
        return self.steps_run * self.batch_size * len(self.expert_ids) / max(self.seconds, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON-ready; NaN stays NaN), without the config object."""
        out: dict[str, Any] = {}
        for name in ("expert_ids", "skipped_ids", "n_train", "n_val", "eval_steps", "train_loss", "val_loss",
                     "best_val", "best_step", "stop_step", "steps_run", "batch_size", "seconds", "device"):
            value = getattr(self, name)
            out[name] = value.tolist() if isinstance(value, np.ndarray) else value
        out["samples_per_second"] = self.samples_per_second
        return out

    def history(self, expert_id: int) -> dict[str, np.ndarray]:
        """Evaluation steps with train/validation loss of one expert (global id)."""
        j = self.expert_ids.index(int(expert_id))
        return {
            "step": np.asarray(self.eval_steps),
            "train_loss": self.train_loss[:, j],
            "val_loss": self.val_loss[:, j],
        }


# ---------------------------------------------------------------------------- counter-based shuffles
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
    starts at ``train_offsets[j]`` (``val_offsets[j]``).
    """

    expert_ids: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    n_train: torch.Tensor
    n_val: torch.Tensor

    @property
    def train_offsets(self) -> torch.Tensor:
        return torch.cumsum(self.n_train, 0) - self.n_train

    @property
    def val_local(self) -> torch.Tensor:
        """For every validation row, the index ``j`` of its expert."""
        return torch.repeat_interleave(torch.arange(len(self.n_val)), self.n_val)


def split_by_leaf(
    leaf: torch.Tensor, expert_ids: torch.Tensor, val_fraction: float, seed: int
) -> LeafSplit:
    """Partition rows by leaf and hold out ``floor(val_fraction * n_leaf)`` rows per leaf.

    Which rows of a leaf go to validation depends only on ``(seed, leaf id, rank of the row among
    that leaf's rows)``, so the split of one expert does not depend on which other experts are trained.
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
    experts' permutations are made at once (no loop over experts).
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
        """Positions ``[L, B]`` (into each expert's own shard) of the samples of ``step``."""
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


# ---------------------------------------------------------------------------- shared pieces
def per_expert_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of each expert: ``pred [L, B, out]``, target ``[L, B, out]`` (or ``[L, B]`` ids) -> ``[L]``."""
    if loss == "mse":
        return (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
    L, B, C = pred.shape
    ce = F.cross_entropy(pred.float().reshape(L * B, C), target.reshape(L * B), reduction="none")
    return ce.view(L, B).mean(1)


def _make_optimizer(params: Any, cfg: TrainConfig, device: torch.device,
                    capturable: bool = False) -> torch.optim.Optimizer:
    fused = (device.type == "cuda") if cfg.fused is None else bool(cfg.fused)
    kw: dict[str, Any] = dict(lr=cfg.lr)
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True  # one kernel per op over all tensors: less per-step overhead
    if capturable:
        kw["capturable"] = True
    if cfg.weight_decay is not None:
        kw["weight_decay"] = cfg.weight_decay
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, **kw)


class TrainStep:
    """One optimizer step of ``L`` experts: ``step(xb [L, B, in], yb) -> per-expert losses [L]``.

    Forward, the per-expert losses (summed for backward, so experts stay independent) and the
    optimizer update. The GPU levers of :class:`TrainConfig` live here: fused Adam/AdamW, bf16
    autocast, ``torch.compile`` of forward+loss, and a CUDA graph of the whole step (captured on
    the first call, after warm-up steps whose effect on parameters, buffers and optimizer state is
    undone). On a CPU the CUDA-only levers are ignored.
    """

    def __init__(self, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 cfg: TrainConfig, device: torch.device) -> None:
        self.module, self.cfg, self.device = module, cfg, device
        self.use_graph = bool(cfg.cuda_graph) and device.type == "cuda"
        self.opt = _make_optimizer(module.parameters(), cfg, device, capturable=self.use_graph)
        self._forward = forward
        self._loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._eager_loss
        if cfg.compile and device.type == "cuda":
            mode = None if cfg.compile is True else str(cfg.compile)
            self._loss = torch.compile(self._eager_loss, mode=mode)  # type: ignore[assignment]
        self._graph: Any = None

    def autocast(self) -> Any:
        """bf16 autocast when asked for, else a no-op context."""
        if not self.cfg.bf16:
            return nullcontext()
        # CUDA graphs need autocast's weight-cast cache off (casts must be recorded inside the graph)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.use_graph)

    def _eager_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            pred = self._forward(xb)
        return per_expert_loss(pred, yb, self.cfg.loss)

    def _eager_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        losses = self._loss(xb, yb)
        self.opt.zero_grad(set_to_none=not self.use_graph)
        losses.sum().backward()
        self.opt.step()
        return losses.detach()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self._eager_step(xb, yb)
        if self._graph is None:
            self._capture(xb, yb)
        self._x.copy_(xb)
        self._y.copy_(yb)
        self._graph.replay()
        return self._losses.clone()

    def _capture(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Warm up on a side stream, undo the warm-up, then record one whole step."""
        saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self._x, self._y = xb.clone(), yb.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager_step(self._x, self._y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # back to the state before warm-up: parameters, buffers, fresh optimizer
            for k, v in self.module.state_dict().items():
                v.copy_(saved[k])
            for state in self.opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        t.zero_()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._losses = self._eager_step(self._x, self._y)


def _check_data(x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor, n_in: int, loss: str) -> None:
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must have shape [N, {n_in}], got {tuple(x.shape)}")
    if len(y) != len(x) or len(leaf) != len(x):
        raise ValueError(f"x, y and leaf need the same number of rows, got {len(x)}, {len(y)}, {len(leaf)}")
    if leaf.ndim != 1 or (leaf.numel() and int(leaf.min()) < 0):
        raise ValueError(f"leaf must be a 1-D tensor of expert ids >= 0, got shape {tuple(leaf.shape)}"
                         f"{'' if not leaf.numel() else f' with min {int(leaf.min())}'}")
    if loss == "cross_entropy" and (y.ndim != 1 or y.is_floating_point()):
        raise ValueError(f"cross_entropy needs integer class ids y of shape [N], got {y.dtype} {tuple(y.shape)}")
    if loss == "mse" and y.ndim != 2:
        raise ValueError(f"mse needs targets y of shape [N, n_out], got {tuple(y.shape)}; use y[:, None]")


def _ids_to_train(model: StackedMLP, leaf: torch.Tensor, expert_ids: Sequence[int] | torch.Tensor | None,
                  cfg: TrainConfig) -> tuple[torch.Tensor, list[int]]:
    """Requested ids that have data (warn about empty and tiny leaves)."""
    ids = model.expert_ids.cpu() if expert_ids is None else torch.as_tensor(expert_ids, dtype=torch.long).flatten()
    model.local_index(ids)  # raises for ids the model does not hold
    counts = torch.bincount(leaf.cpu().long(), minlength=int(ids.max()) + 1)[ids]
    empty = ids[counts == 0].tolist()
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(ids)} experts have no training data and stay at their initialisation "
            f"(ids {empty[:10]}{'...' if len(empty) > 10 else ''}); use fewer leaves or a data-driven tree",
            UserWarning,
            stacklevel=3,
        )
    keep = ids[counts > 0]
    n_val = torch.floor(counts[counts > 0].double() * cfg.val_fraction).long()
    tiny = keep[(n_val == 0)].tolist() if cfg.val_fraction > 0 else []
    if tiny:
        warnings.warn(
            f"{len(tiny)} experts have too few samples for a validation split (ids {tiny[:10]}"
            f"{'...' if len(tiny) > 10 else ''}): they train for the full budget without early stopping",
            UserWarning,
            stacklevel=3,
        )
    if len(keep) == 0:
        raise ValueError("no requested expert has training data: check the leaf ids against the model's expert_ids")
    return keep, empty


@dataclass
class _Plan:
    split: LeafSplit
    steps: int
    eval_every: int
    device: torch.device


def _plan(ids: torch.Tensor, leaf: torch.Tensor, cfg: TrainConfig) -> _Plan:
    split = split_by_leaf(leaf, ids, cfg.val_fraction, cfg.seed)
    n_max = int(split.n_train.max())
    steps = cfg.max_steps if cfg.max_epochs is None else math.ceil(cfg.max_epochs * n_max / cfg.batch_size)
    eval_every = cfg.eval_every or max(1, math.ceil(n_max / cfg.batch_size))
    return _Plan(split, max(1, steps), eval_every, get_device(cfg.device))


class _Adapter:
    """What the shared loop needs from a model: lockstep forward, evaluation, snapshots."""

    module: nn.Module

    def forward(self, xb: torch.Tensor) -> torch.Tensor:  # [L, B, in] -> [L, B, out]
        raise NotImplementedError

    def predict(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        raise NotImplementedError

    def snapshot(self) -> dict[str, torch.Tensor]:  # tensors with a leading expert dim
        raise NotImplementedError

    def restore(self, best: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class _StackAdapter(_Adapter):
    def __init__(self, stack: StackedMLP) -> None:
        self.module = stack
        self.keys = list(stack._stacked_state())

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.module(xb)

    def predict(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self.module.forward_routed(x, self.module.expert_ids[local])

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: self.module._stacked_tensor(k).detach() for k in self.keys}

    def restore(self, best: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in best.items():
                self.module._stacked_tensor(k).copy_(v)


class _ModuleAdapter(_Adapter):
    """One plain expert module seen as a stack of one."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.module(xb[0]).unsqueeze(0)

    def predict(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().unsqueeze(0) for k, v in self.module.state_dict().items()}

    def restore(self, best: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict({k: v[0] for k, v in best.items()})


@dataclass
class _LoopOut:
    eval_steps: list[int]
    train_loss: list[torch.Tensor]
    val_loss: list[torch.Tensor]
    best_val: torch.Tensor
    best_step: torch.Tensor
    stop_step: torch.Tensor
    steps_run: int


def _fit(
    adapter: _Adapter,
    x: torch.Tensor,
    y: torch.Tensor,
    split: LeafSplit,
    cfg: TrainConfig,
    plan: _Plan,
    bar: Any,
) -> _LoopOut:
    """The training loop shared by the lockstep and the serial trainer (``L`` experts, one optimizer)."""
    dev = plan.device
    L = len(split.expert_ids)
    x_tr, y_tr = x[split.train_rows].to(dev), y[split.train_rows].to(dev)
    x_va, y_va = x[split.val_rows].to(dev), y[split.val_rows].to(dev)
    val_local = split.val_local.to(dev)
    offsets = split.train_offsets.to(dev)
    has_val = split.n_val > 0
    sampler = LockstepSampler(split.n_train, split.expert_ids, cfg.batch_size, cfg.seed, dev)
    train_step = TrainStep(adapter.module, adapter.forward, cfg, dev)
    autocast = train_step.autocast()

    def evaluate() -> torch.Tensor:
        if len(x_va) == 0:
            return torch.full((L,), float("nan"))
        adapter.module.eval()
        with torch.no_grad(), autocast:
            pred = adapter.predict(x_va, val_local)
            rows = per_expert_loss(pred[:, None], y_va[:, None], cfg.loss)
        adapter.module.train()
        total = torch.zeros(L, device=dev).index_add_(0, val_local, rows)
        return (total / split.n_val.clamp(min=1).to(dev)).cpu().where(has_val, torch.tensor(float("nan")))

    active = torch.ones(L, dtype=torch.bool)
    bad = torch.zeros(L, dtype=torch.long)
    best_val = torch.full((L,), float("inf"))
    best_step = torch.zeros(L, dtype=torch.long)
    stop_step = torch.full((L,), -1, dtype=torch.long)
    best = {k: v.clone() for k, v in adapter.snapshot().items()}
    out = _LoopOut([], [], [], best_val, best_step, stop_step, 0)
    running = torch.zeros(L, device=dev)
    since = 0

    def record(step: int) -> None:
        nonlocal running, since
        val = evaluate()
        train = (running / since).cpu() if since else torch.full((L,), float("nan"))
        out.eval_steps.append(step)
        out.train_loss.append(torch.where(active, train, torch.tensor(float("nan"))))
        out.val_loss.append(torch.where(active, val, torch.tensor(float("nan"))))
        running, since = torch.zeros(L, device=dev), 0
        better = active & has_val & (val < best_val - cfg.min_delta)
        rows = torch.nonzero(better).flatten()
        if len(rows):
            live = adapter.snapshot()
            for k in best:
                best[k].index_copy_(0, rows.to(best[k].device), live[k].index_select(0, rows.to(live[k].device)))
            best_val[rows] = val[rows]
            best_step[rows] = step
        watched = active & has_val
        bad[watched & ~better] += 1
        bad[better] = 0
        if cfg.patience is not None:
            stopping = watched & (bad >= cfg.patience)
            stop_step[stopping] = step
            active[stopping] = False
        bar.set_postfix(active=int(active.sum()), val=float(np.nanmean(val.numpy())) if bool(has_val.any()) else float("nan"))

    adapter.module.train()
    record(0)
    step = 0
    while step < plan.steps and bool(active.any()):
        pos = sampler.indices(step)
        idx = offsets[:, None] + pos
        losses = train_step(x_tr[idx], y_tr[idx])
        running += losses
        since += 1
        step += 1
        bar.update(1)
        if step % plan.eval_every == 0 or step == plan.steps:
            record(step)
    out.steps_run = step
    best_step[~has_val] = -1
    # experts with validation data end at their best evaluation; the others keep their last state
    final = adapter.snapshot()
    adapter.restore({k: torch.where(_rows_mask(has_val, v), best[k].to(v.dtype), v) for k, v in final.items()})
    return out


def _rows_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def _result(ids: torch.Tensor, skipped: list[int], plan: _Plan, loops: list[_LoopOut], cfg: TrainConfig,
            seconds: float) -> TrainResult:
    """Join loop outputs (one for lockstep; one per expert for serial) into a TrainResult."""
    steps = max((lo.eval_steps for lo in loops), key=len)
    E, nan = len(steps), float("nan")

    def column(lo: _LoopOut, name: str) -> torch.Tensor:
        rows = getattr(lo, name)
        pad = [torch.full_like(rows[0], nan)] * (E - len(rows))
        return torch.stack(rows + pad)

    return TrainResult(
        expert_ids=ids.tolist(),
        skipped_ids=skipped,
        n_train=plan.split.n_train.numpy(),
        n_val=plan.split.n_val.numpy(),
        eval_steps=list(steps),
        train_loss=torch.cat([column(lo, "train_loss") for lo in loops], 1).numpy(),
        val_loss=torch.cat([column(lo, "val_loss") for lo in loops], 1).numpy(),
        best_val=torch.cat([lo.best_val for lo in loops]).numpy(),
        best_step=torch.cat([lo.best_step for lo in loops]).numpy(),
        stop_step=torch.cat([lo.stop_step for lo in loops]).numpy(),
        steps_run=max(lo.steps_run for lo in loops),
        batch_size=cfg.batch_size,
        seconds=seconds,
        device=str(plan.device),
        config=cfg,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(model: StackedMLP, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor,
             cfg: TrainConfig, expert_ids: Any) -> tuple[torch.Tensor, list[int], _Plan]:
    leaf = torch.as_tensor(leaf).long()
    _check_data(x, y, leaf, model.n_in, cfg.loss)
    ids, skipped = _ids_to_train(model, leaf, expert_ids, cfg)
    return ids, skipped, _plan(ids, leaf, cfg)


# ---------------------------------------------------------------------------- public trainers
def train_experts(
    model: StackedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    leaf: torch.Tensor,
    config: TrainConfig | None = None,
    expert_ids: Sequence[int] | torch.Tensor | None = None,
) -> TrainResult:
    """Algorithm 2 in lockstep: train every expert on its own leaf's rows, all at once.

    Parameters
    ----------
    model : the experts (global ids ``model.expert_ids``); updated in place, on its own device.
    x, y : all training rows ``[N, n_in]`` and targets (``[N, n_out]`` for mse, ``[N]`` ids for cross_entropy).
    leaf : ``[N]`` global expert id of each row (from a routing tree).
    config : :class:`TrainConfig` (defaults: the paper's Adam 1e-4).
    expert_ids : train only these experts (e.g. this process's share); default all in ``model``.

    Returns
    -------
    TrainResult
        Per-expert histories, best validation losses and steps, timing. Experts with a validation
        split end at their best evaluation; experts without data are skipped with a warning.
    """
    cfg = config or TrainConfig()
    ids, skipped, plan = _prepare(model, x, y, leaf, cfg, expert_ids)
    home = model.weights[0].device
    work = model.subset(ids).to(plan.device)
    with tqdm(total=plan.steps, desc=f"lockstep x{len(ids)} experts", disable=not cfg.progress, leave=False) as bar:
        _sync(plan.device)
        t0 = time.perf_counter()
        loop = _fit(_StackAdapter(work), x, y, plan.split, cfg, plan, bar)
        _sync(plan.device)
        seconds = time.perf_counter() - t0
    model.load_experts_(work.to(home))
    return _result(ids, skipped, plan, [loop], cfg, seconds)


def train_experts_serial(
    model: StackedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    leaf: torch.Tensor,
    config: TrainConfig | None = None,
    expert_ids: Sequence[int] | torch.Tensor | None = None,
) -> TrainResult:
    """The plain reference: one ``nn.Sequential`` and one optimizer per expert, one after another.

    Same arguments, data order and stopping rule as :func:`train_experts`; slow by design.
    """
    cfg = config or TrainConfig()
    ids, skipped, plan = _prepare(model, x, y, leaf, cfg, expert_ids)
    s = plan.split
    loops = []
    t0 = time.perf_counter()
    with tqdm(total=plan.steps * len(ids), desc="serial experts", disable=not cfg.progress, leave=False) as bar:
        for j, gid in enumerate(ids.tolist()):
            tr = slice(int(s.train_offsets[j]), int(s.train_offsets[j] + s.n_train[j]))
            v0 = int((torch.cumsum(s.n_val, 0) - s.n_val)[j])
            one = LeafSplit(ids[j : j + 1], s.train_rows[tr], s.val_rows[v0 : v0 + int(s.n_val[j])],
                            s.n_train[j : j + 1], s.n_val[j : j + 1])
            module = model.expert_module(gid).to(plan.device)
            loops.append(_fit(_ModuleAdapter(module), x, y, one, cfg, plan, bar))
            model.load_expert_module_(gid, module.to(model.weights[0].device))
    _sync(plan.device)
    return _result(ids, skipped, plan, loops, cfg, time.perf_counter() - t0)


def train_dense(model: StackedMLP, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None) -> TrainResult:
    """Train a single dense MLP (a stack of one, e.g. :meth:`StackedMLP.dense_with_budget`) on all rows.

    With the same ``max_epochs`` and ``batch_size`` as the experts it sees the same number of
    samples — the equal-budget baseline.
    """
    if model.num_experts != 1:
        raise ValueError(f"train_dense needs a stack of one expert, got {model.num_experts}; use train_experts")
    leaf = torch.full((len(x),), int(model.expert_ids[0]), dtype=torch.long)
    return train_experts(model, x, y, leaf, config)
