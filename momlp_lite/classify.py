"""Classification helpers for MoMLPs on frozen features: a linear probe, accuracy, per-leaf statistics.

The linear probe is the classic baseline of frozen-feature evaluation (Oquab et al. 2023): one
linear layer on the features, trained with cross-entropy. Here it is trained with the experts'
optimizer (AdamW) so that the comparison changes one thing only: the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .runtime import choose, get_device
from .moe.experts import StackedMLP
from .regression import dense_config
from .moe.routing import RoutingTree
from .moe.trainer import TrainConfig, TrainResult, train_experts

__all__ = [
    "IMAGE_TRAIN_CONFIG",
    "ClassifierReport",
    "fit_momlp_classifier",
    "fit_dense_classifier",
    "accuracy_vs_experts",
    "image_setup",
    "LinearProbe",
    "train_linear_probe",
    "accuracy",
    "confusion_matrix",
    "leaf_class_histograms",
    "per_leaf_accuracy",
]


def _labels(pred: torch.Tensor) -> torch.Tensor:
    """Class ids from logits ``[N, C]`` or ids ``[N]``."""
    return pred.argmax(1) if pred.ndim == 2 else pred.long()


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose predicted class (logits ``[N, C]`` or ids ``[N]``) equals ``y``."""
    p = _labels(pred).cpu()
    y = y.cpu().long()
    if p.shape != y.shape:
        raise ValueError(f"predictions have shape {tuple(p.shape)} but labels {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined; pass at least one row")
    return float((p == y).float().mean())


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    p, t = _labels(pred).cpu(), y.cpu().long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def leaf_class_histograms(leaf: torch.Tensor, y: torch.Tensor, num_leaves: int, num_classes: int) -> torch.Tensor:
    """``[num_leaves, num_classes]``: how many rows of each class reached each leaf."""
    leaf, y = leaf.cpu().long(), y.cpu().long()
    if leaf.shape != y.shape:
        raise ValueError(f"leaf ids have shape {tuple(leaf.shape)} but labels {tuple(y.shape)}")
    return torch.bincount(leaf * num_classes + y, minlength=num_leaves * num_classes).reshape(num_leaves, num_classes)


def per_leaf_accuracy(leaf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accuracy [num_leaves], count [num_leaves])`` of the rows routed to each leaf (NaN where none)."""
    leaf = leaf.cpu().long()
    hit = (_labels(pred).cpu() == y.cpu().long()).float()
    count = torch.bincount(leaf, minlength=num_leaves)
    right = torch.bincount(leaf, weights=hit, minlength=num_leaves)
    acc = torch.where(count > 0, right / count.clamp(min=1), torch.full_like(right, float("nan")))
    return acc, count


@dataclass
class LinearProbe:
    """A trained linear head and how long training took."""

    layer: nn.Linear
    seconds: float
    epochs: int

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.layer.parameters())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.layer.weight.device
        return self.layer(x.to(dev)).cpu()


def train_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LinearProbe:
    """Train ``nn.Linear(d, num_classes)`` on features ``x [N, d]`` with AdamW and cross-entropy."""
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be [N, d] with one label per row, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = torch.device(device) if device is not None else get_device()
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes).to(dev)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / x.shape[1] ** 0.5
        layer.weight.copy_(torch.empty_like(layer.weight, device="cpu").uniform_(-bound, bound, generator=gen))
        layer.bias.copy_(torch.empty_like(layer.bias, device="cpu").uniform_(-bound, bound, generator=gen))
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    xd, yd = x.to(dev, torch.float32), y.to(dev).long()
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(len(xd), generator=gen).to(dev)
        for rows in order.split(batch_size):
            loss = F.cross_entropy(layer(xd[rows]), yd[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LinearProbe(layer.eval(), time.perf_counter() - start, epochs)


# ---------------------------------------------------------------------------- MoMLP heads
IMAGE_TRAIN_CONFIG = TrainConfig(loss="cross_entropy", optimizer="adamw", lr=1e-3)
"""Kratsios et al.'s image setting: cross-entropy, AdamW with learning rate 1e-3 (other fields: defaults)."""


@dataclass
class ClassifierReport:
    """A trained classifier head on features and its test results.

    ``params_active`` counts what one input touches: one expert plus the routing keys on its path.
    """

    name: str
    num_experts: int
    width: int
    accuracy: float
    seconds: float
    params_total: int
    params_active: int
    model: StackedMLP
    tree: RoutingTree | None
    test_leaves: torch.Tensor
    test_logits: torch.Tensor
    train: TrainResult


def _route(tree: RoutingTree | None, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(x), dtype=torch.long) if tree is None else tree.route(x.cpu()).cpu()


def _fit_head(
    name: str,
    model: StackedMLP,
    tree: RoutingTree | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    config: TrainConfig,
) -> ClassifierReport:
    res = train_experts(model, x_train, y_train.long(), _route(tree, x_train), config)
    model.eval()
    leaves = _route(tree, x_test)
    dev = model.weights[0].device
    with torch.no_grad():
        logits = model.forward_routed(x_test.to(dev), leaves.to(dev)).cpu()
    path = 0 if tree is None else tree.path_parameter_count
    keys = 0 if tree is None else tree.parameter_count
    return ClassifierReport(
        name=name, num_experts=model.num_experts, width=model.width, accuracy=accuracy(logits, y_test),
        seconds=res.seconds, params_total=model.num_experts * model.parameters_per_expert + keys,
        params_active=model.parameters_per_expert + path, model=model, tree=tree, test_leaves=leaves,
        test_logits=logits, train=res,
    )


def fit_momlp_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    tree: RoutingTree | None,
    width: int,
    hidden_layers: int = 4,
    config: TrainConfig = IMAGE_TRAIN_CONFIG,
    seed: int = 0,
) -> ClassifierReport:
    """Algorithm 2 on features: one expert per leaf of ``tree`` (``None``: one expert), trained on its leaf.

    Experts follow Kratsios et al.'s image setting: ``hidden_layers`` (4) hidden layers with
    BatchNorm1d before each PReLU, trained with ``config`` (default AdamW 1e-3, cross-entropy).
    """
    num = 1 if tree is None else tree.num_leaves
    dev = get_device(config.device)
    model = StackedMLP(num, x_train.shape[1], width, hidden_layers, num_classes, batchnorm=True,
                       generator=torch.Generator().manual_seed(seed)).to(dev)
    return _fit_head("MoMLP", model, tree, x_train, y_train, x_test, y_test, config)


def fit_dense_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    budget: int,
    hidden_layers: int = 4,
    config: TrainConfig = IMAGE_TRAIN_CONFIG,
    seed: int = 0,
) -> ClassifierReport:
    """One dense MLP (same layout as an expert) with at most ``budget`` parameters, trained on all rows.

    For the equal-budget baseline pass ``momlp_lite.regression.dense_config(config, L, N)``.
    """
    dev = get_device(config.device)
    model = StackedMLP.dense_with_budget(budget, x_train.shape[1], hidden_layers, num_classes, batchnorm=True,
                                         generator=torch.Generator().manual_seed(seed)).to(dev)
    return _fit_head("dense MLP", model, None, x_train, y_train, x_test, y_test, config)


def accuracy_vs_experts(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    tree_shapes: Sequence[tuple[int, int]],
    width: int,
    hidden_layers: int = 4,
    config: TrainConfig = IMAGE_TRAIN_CONFIG,
    seed: int = 0,
    dense: bool = True,
) -> list[dict[str, float | int | str]]:
    """Train a MoMLP per k-means tree shape ``(depth, branching)`` (``(0, 1)``: a single expert).

    With ``dense`` each MoMLP also gets its equal-parameter dense baseline, trained with the same
    steps and samples per step (:func:`momlp_lite.regression.dense_config`). Returns one row per
    model: ``model, experts, accuracy, params_total, params_active, train_seconds``.
    """
    rows: list[dict[str, float | int | str]] = []
    for depth, branching in tree_shapes:
        tree = None if depth == 0 else RoutingTree.from_data(x_train, depth=depth, branching=branching, seed=seed)
        mo = fit_momlp_classifier(x_train, y_train, x_test, y_test, num_classes, tree, width, hidden_layers, config, seed)
        reports = [mo]
        if dense:
            cfg = dense_config(config, mo.num_experts, len(x_train))
            reports.append(fit_dense_classifier(x_train, y_train, x_test, y_test, num_classes,
                                                mo.params_total, hidden_layers, cfg, seed))
        for r in reports:
            rows.append(dict(model=r.name, experts=mo.num_experts, width=r.width, accuracy=r.accuracy,
                             params_total=r.params_total, params_active=r.params_active,
                             train_seconds=r.seconds))
    return rows


def image_setup(profile: str | None = None) -> dict[str, Any]:
    """Sizes of the image-classification chapter and benchmark for a profile (default: the current one).

    ``extractor`` is ``(name, kwargs)`` for :func:`momlp_lite.features.get_extractor`; ``tree`` the
    chapter's main ``(depth, branching)``; ``sweep`` the tree shapes of the accuracy-vs-experts
    sweep (``(0, 1)`` = one expert).
    """
    return choose(
        smoke=dict(dataset="digits", extractor=("pca", dict(n_components=8)), limits=(None, None),
                   tree=(2, 2), sweep=[(0, 1), (1, 2), (3, 2)], width=32, steps=250, batch=64, probe_epochs=500),
        default=dict(dataset="mnist_subset", extractor=("pca", dict(n_components=48)), limits=(None, None),
                     tree=(2, 2), sweep=[(0, 1), (1, 2), (3, 2), (4, 2)], width=128, steps=1500, batch=64,
                     probe_epochs=500),
        paper=dict(dataset="cifar10", extractor=("dinov2", dict(model="dinov2_vits14")), limits=(None, None),
                   tree=(2, 4), sweep=[(0, 1), (1, 4), (2, 4), (3, 4)], width=1000, steps=5000, batch=256,
                   probe_epochs=100),
        profile=profile,
    )
