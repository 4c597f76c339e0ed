"""Classification heads on features, built from the primitives the image chapter uses.

The package no longer has classification drivers (``momlp_lite.classify`` dissolved into
book/image_classification): these tests check that the chapter's recipe — ``StackedMLP`` with
BatchNorm + PReLU, ``train_experts`` with cross-entropy and AdamW, ``forward_routed`` — learns, and that
the equal-parameter dense twin fits the MoMLP's budget. They replace the tests of the removed
``fit_momlp_classifier`` / ``fit_dense_classifier`` / ``accuracy_vs_experts`` / ``train_linear_probe``.
"""

from __future__ import annotations

import math

import torch

from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.moe.trainer import TrainConfig, train_experts

CONFIG = TrainConfig(loss="cross_entropy", optimizer="adamw", lr=1e-3, max_steps=150, batch_size=32, patience=None,
                     progress=False, device="cpu")


def _blobs(n: int = 800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes on a ring of four clusters: class = cluster, not linearly separable from one side."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    angle = y.float() * math.pi / 2
    center = torch.stack([angle.cos(), angle.sin()], 1) * 3
    return center + 0.5 * torch.randn(n, 2, generator=g), y


def _accuracy(model: StackedMLP, tree: RoutingTree, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model.forward_routed(x, tree.route(x)).argmax(1) == y).float().mean())


def test_momlp_head_on_features_learns_and_counts_its_parameters() -> None:
    x, y = _blobs()
    tree = RoutingTree.from_data(x[:600], depth=1, branching=4, seed=0)
    model = StackedMLP(tree.num_leaves, 2, 8, 4, 4, batchnorm=True, generator=torch.Generator().manual_seed(0))
    res = train_experts(model, x[:600], y[:600], tree.route(x[:600]), CONFIG)
    assert _accuracy(model, tree, x[600:], y[600:]) > 0.9 and model.num_experts == 4
    assert model.batchnorm and model.prelu and model.hidden_layers == 4
    assert sorted(res.expert_ids) == [0, 1, 2, 3] and res.seconds > 0
    # what the chapter reports as active and total parameters
    active = model.parameters_per_expert + tree.path_parameter_count
    total = model.num_experts * model.parameters_per_expert + tree.parameter_count
    assert active == model.parameters_per_expert + 4 * 2 and total == 4 * model.parameters_per_expert + 4 * 2


def test_dense_twin_is_a_one_leaf_momlp_within_the_budget() -> None:
    x, y = _blobs()
    tree = RoutingTree.from_data(x[:600], depth=1, branching=4, seed=0)
    experts = StackedMLP(tree.num_leaves, 2, 8, 4, 4, batchnorm=True)
    budget = experts.num_experts * experts.parameters_per_expert + tree.parameter_count
    dense = StackedMLP.dense_with_budget(budget, 2, 4, 4, batchnorm=True, generator=torch.Generator().manual_seed(0))
    one_leaf = RoutingTree.single(2)
    assert one_leaf.num_leaves == 1 and one_leaf.depth == 0 and one_leaf.parameter_count == 0
    assert bool((one_leaf.route(x) == 0).all())
    assert dense.parameters_per_expert <= budget and dense.width > experts.width
    cfg = TrainConfig(**{**CONFIG.__dict__, "batch_size": CONFIG.batch_size * tree.num_leaves})
    train_experts(dense, x[:600], y[:600], one_leaf.route(x[:600]), cfg)
    assert _accuracy(dense, one_leaf, x[600:], y[600:]) > 0.5


def _linear_probe(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Linear:
    """The chapter's linear probe recipe (seeded init, full-batch AdamW, lr 1e-2), written independently."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return layer


def test_linear_probe_recipe_learns_separable_classes_reproducibly() -> None:
    x, y = _blobs()
    probe = _linear_probe(x[:500], y[:500], 300, seed=0)
    assert float((probe(x[500:]).argmax(1) == y[500:]).float().mean()) > 0.9
    assert sum(p.numel() for p in probe.parameters()) == 2 * 4 + 4
    assert torch.equal(_linear_probe(x[:500], y[:500], 300, seed=0).weight, probe.weight)  # seeded
