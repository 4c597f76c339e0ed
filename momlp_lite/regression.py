"""MoMLP against the equal-parameter dense MLP on grid regression (Kratsios et al.'s experiment).

:func:`fit_momlp` routes the grid samples with a routing tree, trains one expert per leaf with
Algorithm 2 (:func:`momlp_lite.train.train_experts`) and measures the test error;
:func:`fit_dense` trains one dense MLP with as many parameters as all experts together on the
same data and budget (same epochs, and the same samples per step: batch ``L * B``, capped at the
training set). Both return a :class:`FitReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .runtime import get_device
from .data import GridData, make_grid_data
from .moe.experts import StackedMLP
from .moe.routing import RoutingTree
from .moe.trainer import TrainConfig, TrainResult, train_dense, train_experts

__all__ = [
    "FitReport",
    "evaluate_routed",
    "fit_momlp",
    "fit_dense",
    "dense_config",
    "leaf_moments",
    "GridTask",
    "GridSetup",
    "grid_setup",
    "compare_on_task",
    "comparison_rows",
    "sweep_experts",
]


@dataclass
class FitReport:
    """Test error, cost and size of one trained model."""

    name: str
    num_experts: int
    width: int
    hidden_layers: int
    rmse: float
    max_error: float
    seconds: float
    params_total: int
    params_active: int
    train: TrainResult
    per_leaf_rmse: np.ndarray
    model: StackedMLP

    def row(self) -> dict[str, float | int | str]:
        """A flat dict for tables and JSON."""
        return dict(
            model=self.name,
            experts=self.num_experts,
            width=self.width,
            hidden_layers=self.hidden_layers,
            test_rmse=self.rmse,
            max_error=self.max_error,
            train_seconds=self.seconds,
            params_total=self.params_total,
            params_active=self.params_active,
            steps=self.train.steps_run,
        )


def evaluate_routed(
    model: StackedMLP, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor
) -> tuple[float, float, np.ndarray]:
    """Test RMSE, max absolute error, and RMSE per expert (NaN where no test point landed)."""
    dev = model.weights[0].device
    model.eval()
    with torch.no_grad():
        pred = model.forward_routed(x.to(dev), leaf.to(dev)).cpu()
    err = (pred - y).reshape(len(y), -1).pow(2).mean(1)
    local = model.local_index(leaf.to(dev)).cpu()
    L = model.num_experts
    sums = torch.zeros(L, dtype=torch.float64).index_add_(0, local, err.double())
    counts = torch.bincount(local, minlength=L).double()
    per_leaf = torch.where(counts > 0, (sums / counts.clamp(min=1)).sqrt(), torch.tensor(float("nan")))
    return float(err.mean().sqrt()), float((pred - y).abs().max()), per_leaf.numpy()


def leaf_moments(v: torch.Tensor, leaf: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``v [N, d]`` per leaf (``[L, d]``; std 1 where it is ~0 or undefined)."""
    v = v.double()
    counts = torch.bincount(leaf, minlength=num_leaves).double()[:, None]
    total = torch.zeros(num_leaves, v.shape[1], dtype=torch.float64).index_add_(0, leaf, v)
    mean = total / counts.clamp(min=1)
    sq = torch.zeros_like(total).index_add_(0, leaf, (v - mean[leaf]) ** 2)
    std = (sq / counts.clamp(min=1)).sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float(), std.float()


def _train_standardised(model: StackedMLP, data: GridData, leaf: torch.Tensor, config: TrainConfig) -> TrainResult:
    """Train on inputs and targets standardised per expert, then fold the maps into the weights.

    The folded model computes the same function on raw inputs; standardising only improves the
    conditioning (an expert sees a small cell of the domain and a small range of values).
    """
    L = model.num_experts
    local = model.local_index(leaf.to(model.expert_ids.device)).cpu()
    mx, sx = leaf_moments(data.x_train, local, L)
    my, sy = leaf_moments(data.y_train, local, L)
    x = (data.x_train - mx[local]) / sx[local]
    y = (data.y_train - my[local]) / sy[local]
    res = train_experts(model, x, y, leaf, config)
    dev = model.weights[0].device
    model.fold_affine_(mx.to(dev), sx.to(dev), my.to(dev), sy.to(dev))
    return res


def fit_momlp(
    data: GridData,
    tree: RoutingTree | None,
    width: int,
    hidden_layers: int,
    config: TrainConfig,
    seed: int = 0,
    standardise: bool = True,
) -> FitReport:
    """Train one expert per leaf of ``tree`` (``None``: a single expert) and test it.

    Experts are ``n -> width (x hidden_layers) -> 1`` with learnable PReLU, as in the paper.
    With ``standardise`` each expert trains on its leaf's inputs and targets standardised (then
    folded into its weights). Parameters active per forward pass: one expert plus the keys on one
    root-to-leaf path.
    """
    dev = get_device(config.device)
    num = 1 if tree is None else tree.num_leaves
    model = StackedMLP(num, data.n, width, hidden_layers, 1, generator=torch.Generator().manual_seed(seed)).to(dev)

    def route(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), dtype=torch.long) if tree is None else tree.route(x).cpu()

    leaf = route(data.x_train)
    if standardise:
        res = _train_standardised(model, data, leaf, config)
    else:
        res = train_experts(model, data.x_train, data.y_train, leaf, config)
    rmse, max_err, per_leaf = evaluate_routed(model, data.x_test, data.y_test, route(data.x_test))
    path = 0 if tree is None else tree.path_parameter_count
    return FitReport(
        name="MoMLP", num_experts=num, width=width, hidden_layers=hidden_layers, rmse=rmse, max_error=max_err,
        seconds=res.seconds, params_total=num * model.parameters_per_expert + (0 if tree is None else tree.parameter_count),
        params_active=model.parameters_per_expert + path, train=res, per_leaf_rmse=per_leaf, model=model,
    )


def dense_config(config: TrainConfig, num_experts: int, n_train: int) -> TrainConfig:
    """The baseline's budget: same epochs and samples per step as ``num_experts`` experts (batch ``L * B``)."""
    return replace(config, batch_size=max(1, min(config.batch_size * num_experts, n_train)))


def fit_dense(
    data: GridData,
    budget: int,
    hidden_layers: int,
    config: TrainConfig,
    seed: int = 0,
    standardise: bool = True,
) -> FitReport:
    """Train one dense PReLU MLP with at most ``budget`` parameters (the width is solved from it).

    ``config`` is used as given: pass :func:`dense_config` for the equal-budget baseline.
    ``standardise`` standardises inputs and targets (over all rows), as :func:`fit_momlp` does per leaf.
    """
    dev = get_device(config.device)
    model = StackedMLP.dense_with_budget(budget, data.n, hidden_layers, 1,
                                         generator=torch.Generator().manual_seed(seed)).to(dev)
    if standardise:
        res = _train_standardised(model, data, torch.zeros(len(data.x_train), dtype=torch.long), config)
    else:
        res = train_dense(model, data.x_train, data.y_train, config)
    zeros = torch.zeros(len(data.x_test), dtype=torch.long)
    rmse, max_err, per_leaf = evaluate_routed(model, data.x_test, data.y_test, zeros)
    params = model.parameters_per_expert
    return FitReport(
        name="dense MLP", num_experts=1, width=model.width, hidden_layers=hidden_layers, rmse=rmse,
        max_error=max_err, seconds=res.seconds, params_total=params, params_active=params, train=res,
        per_leaf_rmse=per_leaf, model=model,
    )


# ---------------------------------------------------------------------------- the chapter's experiment
@dataclass(frozen=True)
class GridTask:
    """One regression problem: ``target`` on the ``s**n`` grid over [0, 1]^n, a regular tree of ``depth``."""

    target: str
    n: int
    s: int
    depth: int
    branching: int = 2

    @property
    def num_experts(self) -> int:
        return self.branching ** (self.n * self.depth)


@dataclass(frozen=True)
class GridSetup:
    """Sizes of the grid-regression experiment under one profile (see :func:`grid_setup`)."""

    tasks: tuple[GridTask, ...]
    width: int
    hidden_layers: int
    train: TrainConfig
    sweep_task: GridTask
    sweep_depths: tuple[int, ...]
    sweep_width: int
    sweep_train: TrainConfig


def grid_setup(profile: str | None = None) -> GridSetup:
    """The experiment's sizes for ``smoke``, ``default`` or ``paper`` (default: ``$MOMLP_PROFILE``).

    ``paper`` is Kratsios et al.'s setting: width 1000, 3 hidden layers, learnable PReLU, Adam lr 1e-4.
    The smaller profiles use a larger learning rate (3e-3 / 1e-3) to fit in seconds or minutes.
    """
    from .runtime import choose

    targets_small = ("sine", "weierstrass")
    targets_all = ("distance", "ridge", "sine", "weierstrass")

    def tasks(targets: tuple[str, ...], grid: dict[int, tuple[int, int]]) -> tuple[GridTask, ...]:
        return tuple(GridTask(t, n, s, d) for t in targets for n, (s, d) in grid.items())

    smoke_cfg = TrainConfig(lr=3e-3, batch_size=16, max_steps=150, eval_every=25, patience=8)
    default_cfg = TrainConfig(lr=1e-3, batch_size=32, max_steps=2000, eval_every=50, patience=10)
    paper_cfg = TrainConfig(lr=1e-4, batch_size=128, max_steps=3000, eval_every=250, patience=8)
    return choose(
        smoke=GridSetup(tasks(targets_small, {1: (256, 4), 2: (24, 2), 3: (10, 1)}), 16, 3, smoke_cfg,
                        GridTask("sine", 2, 48, 3), (0, 1, 2, 3), 8, replace(smoke_cfg, max_steps=200)),
        default=GridSetup(tasks(targets_all, {1: (1024, 4), 2: (48, 2), 3: (16, 1)}), 64, 3, default_cfg,
                          GridTask("sine", 2, 160, 4), (0, 1, 2, 3, 4), 16, replace(default_cfg, max_steps=1500)),
        paper=GridSetup(tasks(targets_all, {1: (8192, 6), 2: (256, 3), 3: (40, 2)}), 1000, 3, paper_cfg,
                        GridTask("sine", 2, 256, 4), (0, 1, 2, 3, 4), 1000, paper_cfg),
        profile=profile,
    )


def compare_on_task(task: GridTask, width: int, hidden_layers: int, config: TrainConfig,
                    seed: int = 0) -> tuple[FitReport, FitReport]:
    """MoMLP (one expert per leaf) and the equal-parameter dense MLP on one grid task, same data and budget."""
    data = make_grid_data(task.target, task.n, task.s, seed=seed)
    tree = RoutingTree.regular(task.n, task.depth, task.branching)
    moe = fit_momlp(data, tree, width, hidden_layers, config, seed=seed)
    dense = fit_dense(data, moe.params_total, hidden_layers,
                      dense_config(config, tree.num_leaves, len(data.x_train)), seed=seed)
    return moe, dense


def comparison_rows(task: GridTask, moe: FitReport, dense: FitReport) -> list[dict[str, float | int | str]]:
    """Two flat rows (MoMLP, dense) for tables and JSON."""
    base = dict(target=task.target, n=task.n, s=task.s, points=task.s**task.n)
    return [{**base, **moe.row()}, {**base, **dense.row()}]


def sweep_experts(task: GridTask, depths: Sequence[int], width: int, hidden_layers: int,
                  config: TrainConfig, seed: int = 0) -> list[tuple[RoutingTree | None, FitReport]]:
    """Test error of MoMLPs with experts of a fixed size and more and more leaves (depth 0 = one expert)."""
    data = make_grid_data(task.target, task.n, task.s, seed=seed)
    out = []
    for depth in depths:  # a handful of separate models, not a loop over experts
        tree = None if depth == 0 else RoutingTree.regular(task.n, depth, task.branching)
        out.append((tree, fit_momlp(data, tree, width, hidden_layers, config, seed=seed)))
    return out
