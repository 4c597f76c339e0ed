"""Classification helpers: metrics, per-leaf statistics, the linear probe and MoMLP heads on features."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from momlp_lite.classify import (
    IMAGE_TRAIN_CONFIG,
    accuracy,
    accuracy_vs_experts,
    confusion_matrix,
    fit_dense_classifier,
    fit_momlp_classifier,
    image_setup,
    leaf_class_histograms,
    per_leaf_accuracy,
    train_linear_probe,
)
from momlp_lite.moe.routing import RoutingTree


def test_metrics_by_hand() -> None:
    y = torch.tensor([0, 1, 2, 2, 1])
    pred = torch.tensor([0, 2, 2, 2, 1])
    assert accuracy(pred, y) == pytest.approx(0.8)
    logits = torch.nn.functional.one_hot(pred, 3).float()
    assert accuracy(logits, y) == pytest.approx(0.8)
    cm = confusion_matrix(pred, y, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 2]]
    leaf = torch.tensor([1, 1, 0, 0, 2])
    assert leaf_class_histograms(leaf, y, 4, 3).tolist() == [[0, 0, 2], [1, 1, 0], [0, 1, 0], [0, 0, 0]]
    acc, count = per_leaf_accuracy(leaf, pred, y, 4)
    assert count.tolist() == [2, 2, 1, 0]
    assert acc[:3].tolist() == [1.0, 0.5, 1.0] and math.isnan(float(acc[3]))
    with pytest.raises(ValueError, match="shape"):
        accuracy(pred[:3], y)
    with pytest.raises(ValueError, match="empty"):
        accuracy(pred[:0], y[:0])


def _blobs(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes on a ring of four clusters: class = cluster, not linearly separable from one side."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    angle = y.float() * math.pi / 2
    centre = torch.stack([angle.cos(), angle.sin()], 1) * 3
    return centre + 0.5 * torch.randn(n, 2, generator=g), y


def test_linear_probe_learns_separable_classes() -> None:
    x, y = _blobs()
    probe = train_linear_probe(x[:500], y[:500], 4, epochs=300, lr=1e-2, batch_size=500, device="cpu", progress=False)
    assert accuracy(probe(x[500:]), y[500:]) > 0.9
    assert probe.parameter_count == 2 * 4 + 4 and probe.seconds > 0
    again = train_linear_probe(x[:500], y[:500], 4, epochs=300, lr=1e-2, batch_size=500, device="cpu", progress=False)
    assert torch.equal(again.layer.weight, probe.layer.weight)  # seeded
    with pytest.raises(ValueError, match="one label per row"):
        train_linear_probe(x, y[:3], 4)


def test_momlp_and_dense_heads_on_features() -> None:
    x, y = _blobs(800)
    tree = RoutingTree.from_data(x[:600], depth=1, branching=4, seed=0)
    cfg = replace(IMAGE_TRAIN_CONFIG, max_steps=150, batch_size=32, patience=None, progress=False, device="cpu")
    mo = fit_momlp_classifier(x[:600], y[:600], x[600:], y[600:], 4, tree, width=8, config=cfg)
    assert mo.accuracy > 0.9 and mo.num_experts == 4
    assert mo.model.batchnorm and mo.model.prelu and mo.model.hidden_layers == 4
    assert mo.params_active == mo.model.parameters_per_expert + tree.path_parameter_count
    assert mo.params_total == 4 * mo.model.parameters_per_expert + tree.parameter_count
    assert torch.equal(mo.test_leaves, tree.route(x[600:]))
    dense = fit_dense_classifier(x[:600], y[:600], x[600:], y[600:], 4, mo.params_total, config=cfg)
    assert dense.params_total <= mo.params_total and dense.params_active == dense.params_total
    assert dense.width > mo.width and dense.accuracy > 0.5


def test_accuracy_vs_experts_rows() -> None:
    x, y = _blobs(400)
    cfg = replace(IMAGE_TRAIN_CONFIG, max_steps=20, batch_size=16, patience=None, progress=False, device="cpu")
    rows = accuracy_vs_experts(x[:300], y[:300], x[300:], y[300:], 4, [(0, 1), (1, 2)], width=8, config=cfg)
    assert [(r["model"], r["experts"]) for r in rows] == [("MoMLP", 1), ("dense MLP", 1), ("MoMLP", 2), ("dense MLP", 2)]
    assert all(0 <= r["accuracy"] <= 1 and r["params_active"] <= r["params_total"] for r in rows)
    assert rows[3]["params_total"] <= rows[2]["params_total"]  # the dense twin fits the MoMLP's budget


def test_image_setup_profiles() -> None:
    smoke, paper = image_setup("smoke"), image_setup("paper")
    assert smoke["dataset"] == "digits" and smoke["extractor"][0] == "pca"  # offline
    assert paper["dataset"] == "cifar10" and paper["extractor"][0] == "dinov2" and paper["width"] == 1000
