"""Algorithm 2 in lockstep: all experts train at once, each on its own leaf. Taught in: book/momlp_grid_regression."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime import check_positive_int, get_device
from .experts import StackedMLP
from .order import LeafSplit, LockstepSampler, split_by_leaf

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "LockstepStep", "per_expert_loss",
           "train_experts"]

_EVAL_CHUNK = 256  # validation rows per expert per forward: fixed, so no expert's loss depends on its group


class NonFiniteLossError(FloatingPointError):
    """An expert's loss became NaN or infinite; ``experts`` lists their ids. Taught in: book/momlp_grid_regression."""

    def __init__(self, experts: list[int], step: int) -> None:
        self.experts, self.step = [int(e) for e in experts], int(step)
        super().__init__(f"the loss of experts {self.experts} became non-finite by step {step}; lower lr, "
                         "standardize the targets or check the data of those leaves for outliers")


@dataclass(frozen=True)
class TrainConfig:
    """How to train experts (defaults: Kratsios et al.'s regression setting); ``batch_size`` is per expert, and
    ``max_epochs`` (of the largest shard) overrides ``max_steps``. Taught in: book/momlp_grid_regression."""

    loss: str = "mse"
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float | None = None  # None: the optimizer's default
    batch_size: int = 128
    max_steps: int = 1000
    max_epochs: float | None = None
    val_fraction: float = 0.1
    patience: int | None = 10  # None: never stop early
    eval_every: int | None = None
    min_delta: float = 0.0
    seed: int = 0  # fixes the split and the data order
    progress: bool = True
    device: str | None = None  # None: runtime.get_device picks one

    def __post_init__(self) -> None:
        for name, allowed in (("loss", ("mse", "cross_entropy")), ("optimizer", ("adam", "adamw"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "max_steps", "patience", "eval_every"):
            if name in ("batch_size", "max_steps") or getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name, closed in (("lr", False), ("weight_decay", True), ("max_epochs", False), ("val_fraction", True),
                             ("min_delta", True)):
            v, high = getattr(self, name), 1 if name == "val_fraction" else math.inf
            if v is None and name in ("weight_decay", "max_epochs"):
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v < high
            if not ok or not (v >= 0 if closed else v > 0):
                raise ValueError(f"{name} must be a finite number in {'[' if closed else '('}0, {high}), got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class TrainResult:
    """What a training run did; column ``j`` is ``expert_ids[j]``, histories have a row per ``eval_steps`` (NaN
    when stopped or without validation data), and -1 steps mean "never". Taught in: book/momlp_grid_regression."""

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
    seconds: float
    device: str


def _row_losses(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of every row: ``[L, B, out]`` -> ``[L, B]``."""
    if loss == "mse":
        return (pred.float() - target.float()).pow(2).mean(-1)
    L, B, C = pred.shape
    return F.cross_entropy(pred.float().reshape(L * B, C), target.reshape(L * B), reduction="none").view(L, B)


def per_expert_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of each expert: ``[L, B, out]`` -> ``[L]``. Taught in: book/momlp_grid_regression."""
    if loss == "mse":  # one mean over all B * out elements
        return (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
    return _row_losses(pred, target, loss).mean(1)


def make_optimizer(params: Any, cfg: TrainConfig, **extra: Any) -> torch.optim.Optimizer:
    """``torch.optim.Adam``/``AdamW`` with the config's learning rate and weight decay."""
    wd = {} if cfg.weight_decay is None else {"weight_decay": cfg.weight_decay}
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW)(params, lr=cfg.lr, **wd, **extra)


class LockstepStep:
    """One step of Algorithm 2: stacked forward, per-expert mean losses summed (the experts stay independent), one
    Adam step; ``step(xb [L, B, in], yb) -> losses [L]``. Taught in: book/momlp_grid_regression."""

    def __init__(self, net: StackedMLP, cfg: TrainConfig) -> None:
        self.net, self.loss, self.opt = net, cfg.loss, make_optimizer(net.parameters(), cfg, foreach=True)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        losses = per_expert_loss(self.net(xb), yb, self.loss)
        self.opt.zero_grad()
        losses.sum().backward()
        self.opt.step()
        return losses.detach()


def plan_training(model: StackedMLP, x: Any, y: Any, leaf: Any, cfg: TrainConfig,
                  expert_ids: Sequence[int] | torch.Tensor | None
                  ) -> tuple[torch.Tensor, list[int], LeafSplit, int, int, torch.device]:
    """Check the data and decide what to train (both trainers): ids, skipped ids, split, steps, eval_every, device."""
    for name, t in (("x", x), ("y", y), ("leaf", leaf)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}; use torch.as_tensor({name})")
    dtype = model.weights[0].dtype
    if x.ndim != 2 or x.shape[1] != model.n_in:
        raise ValueError(f"x must have shape [N, {model.n_in}], got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"x has dtype {x.dtype} but the experts are {dtype}; pass x.to({dtype})")
    if len(y) != len(x) or len(leaf) != len(x):
        raise ValueError(f"x, y and leaf need the same number of rows, got {len(x)}, {len(y)}, {len(leaf)}")
    if leaf.ndim != 1 or leaf.is_floating_point() or (leaf.numel() and int(leaf.min()) < 0):
        raise ValueError(f"leaf must be a 1-D integer tensor of expert ids >= 0, got {leaf.dtype} {tuple(leaf.shape)}"
                         f"{'' if not leaf.numel() or leaf.is_floating_point() else f' with min {int(leaf.min())}'}")
    if cfg.loss == "cross_entropy":
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"cross_entropy needs integer class ids y of shape [N], got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= model.n_out):
            raise ValueError(f"class ids must be in [0, {model.n_out}) for a model with n_out={model.n_out}, "
                             f"got min {int(y.min())}, max {int(y.max())}")
    else:
        if y.ndim != 2 or y.shape[1] != model.n_out:
            raise ValueError(f"mse needs targets y of shape [N, {model.n_out}] (the model's n_out), got "
                             f"{tuple(y.shape)}{'; use y[:, None]' if y.ndim == 1 else ''}")
        if not y.is_floating_point():
            raise ValueError(f"mse needs floating targets, got {y.dtype}; pass y.float()")
    for name, t in (("x", x), ("y", y)):
        bad = ~torch.isfinite(t) if t.is_floating_point() else None
        if bad is not None and bool(bad.any()):
            row = int(bad.reshape(len(t), -1).any(1).nonzero()[0])
            raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (first in row {row}: "
                             f"{t[row].tolist()}); drop or impute those rows before training")
    leaf = leaf.long()
    ids = model.expert_ids.cpu() if expert_ids is None else torch.as_tensor(expert_ids, dtype=torch.long).flatten()
    model.local_index(ids)  # raises for ids the model does not hold
    counts = torch.bincount(leaf.cpu(), minlength=int(ids.max()) + 1)[ids]
    empty = ids[counts == 0].tolist()
    if empty:
        warnings.warn(f"{len(empty)} of {len(ids)} experts have no training data and stay at their initialization "
                      f"(ids {empty[:10]}{'...' if len(empty) > 10 else ''}); use fewer leaves or a data-driven tree",
                      UserWarning, stacklevel=3)
    keep = ids[counts > 0]
    if len(keep) == 0:
        raise ValueError("no requested expert has training data: check the leaf ids against the model's expert_ids")
    split = split_by_leaf(leaf, keep, cfg.val_fraction, cfg.seed)
    tiny = keep[split.n_val == 0].tolist() if cfg.val_fraction > 0 else []
    if tiny:
        warnings.warn(f"{len(tiny)} experts have too few samples for a validation split (ids {tiny[:10]}"
                      f"{'...' if len(tiny) > 10 else ''}): they train for the full budget without early stopping",
                      UserWarning, stacklevel=3)
    n_max = int(split.n_train.max())
    steps = cfg.max_steps if cfg.max_epochs is None else math.ceil(cfg.max_epochs * n_max / cfg.batch_size)
    every = cfg.eval_every or max(1, math.ceil(n_max / cfg.batch_size))
    return keep, empty, split, max(1, steps), every, get_device(cfg.device)


def _padded(t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert (``counts[j]`` each) as ``[L, V, ...]``, zero padded to a multiple of the chunk."""
    width = max(1, math.ceil(int(counts.max()) / _EVAL_CHUNK)) * _EVAL_CHUNK
    groups = [*t.split(counts.tolist()), t.new_zeros(width, *t.shape[1:])]  # the last one sets the width
    return torch.nn.utils.rnn.pad_sequence(groups, batch_first=True)[:-1]


def _validation_loss(net: StackedMLP, x_val: torch.Tensor, y_val: torch.Tensor, n_val: torch.Tensor,
                     loss: str) -> torch.Tensor:
    """Mean validation loss per expert (NaN without rows), in fixed chunks: the same bit for bit in any group."""
    L, V = x_val.shape[:2]
    total = torch.zeros(L, device=x_val.device)
    net.eval()
    with torch.no_grad():
        for c in range(0, V, _EVAL_CHUNK):
            rows = _row_losses(net(x_val[:, c : c + _EVAL_CHUNK]), y_val[:, c : c + _EVAL_CHUNK], loss)
            mask = torch.arange(c, c + _EVAL_CHUNK, device=x_val.device) < n_val.to(x_val.device)[:, None]
            total += torch.where(mask, rows, torch.zeros_like(rows)).sum(1)
    net.train()
    return (total.cpu() / n_val.clamp(min=1)).where(n_val > 0, torch.tensor(float("nan")))


def train_experts(model: StackedMLP, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor,
                  config: TrainConfig | None = None, expert_ids: Sequence[int] | torch.Tensor | None = None, *,
                  make_step: Callable[[StackedMLP, TrainConfig], Callable[..., torch.Tensor]] = LockstepStep
                  ) -> TrainResult:
    """Algorithm 2 in lockstep: train every expert (or those of ``expert_ids``) on its leaf's rows, in place; ``y`` is
    ``[N, n_out]`` for mse, ``[N]`` class ids for cross_entropy. Taught in: book/momlp_grid_regression."""
    cfg = config or TrainConfig()
    ids, skipped, s, steps, every, dev = plan_training(model, x, y, leaf, cfg, expert_ids)
    L = len(ids)
    net = model.subset(ids).to(dev)
    step_fn = make_step(net, cfg)
    x_tr, y_tr, offsets = x[s.train_rows].to(dev), y[s.train_rows].to(dev), (s.n_train.cumsum(0) - s.n_train).to(dev)
    x_va, y_va = _padded(x[s.val_rows].to(dev), s.n_val), _padded(y[s.val_rows].to(dev), s.n_val)
    sampler = LockstepSampler(s.n_train, ids, cfg.batch_size, cfg.seed, dev)
    has_val, active = s.n_val > 0, torch.ones(L, dtype=torch.bool)
    best_val, best_step = torch.full((L,), math.inf), torch.where(has_val, 0, -1)
    stop_step, bad = torch.full((L,), -1), torch.zeros(L, dtype=torch.long)
    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    hist: dict[str, list] = {"step": [], "train": [], "val": []}
    running, since, step = torch.zeros(L, device=dev), 0, 0
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=f"lockstep x{L} experts", disable=not cfg.progress, leave=False) as bar:
        while True:
            if step % every == 0 or step == steps:                                 # evaluate
                val = _validation_loss(net, x_va, y_va, s.n_val, cfg.loss)
                train = (running / since).cpu() if since else torch.full((L,), math.nan)
                broken = active & ((~torch.isfinite(train) if since else False) | has_val & ~torch.isfinite(val))
                if bool(broken.any()):
                    raise NonFiniteLossError(ids[broken].tolist(), step)
                hist["step"].append(step)
                hist["train"].append(train.where(active, math.nan))
                hist["val"].append(val.where(active, math.nan))
                better = active & has_val & (val < best_val - cfg.min_delta)    # keep the best
                for k, v in net.state_dict().items():
                    best[k][better.to(v.device)] = v[better.to(v.device)]
                best_val[better], best_step[better] = val[better], step
                bad = torch.where(better, 0, bad + (active & has_val).long())
                if cfg.patience is not None:                                     # stop
                    stopping = active & has_val & (bad >= cfg.patience)
                    stop_step[stopping], active[stopping] = step, False
                running, since = torch.zeros(L, device=dev), 0
                bar.set_postfix(active=int(active.sum()), refresh=False)
            if step == steps or not bool(active.any()):
                break
            idx = offsets[:, None] + sampler.indices(step)                        # sample
            running += step_fn(x_tr[idx], y_tr[idx])                              # step
            since, step = since + 1, step + 1
            bar.update(1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # experts with validation data end at their best evaluation
        for k, v in net.state_dict().items():
            v[has_val.to(v.device)] = best[k][has_val.to(v.device)]
    model.load_experts_(net)
    return TrainResult(ids.tolist(), skipped, s.n_train.numpy(), s.n_val.numpy(), hist["step"],
                       torch.stack(hist["train"]).numpy(), torch.stack(hist["val"]).numpy(), best_val.numpy(),
                       best_step.numpy(), stop_step.numpy(), step, seconds, str(dev))
