"""Adversarial inputs to the MoMLP API (routing, stacked experts, trainer, grid data): every bad input is a
clear error that names the bad value (issue 15 items 3, 4, 6, 7), and far-away finite points route exactly."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momlp_lite.data.grid import make_grid_data
from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.reference import train_experts_serial
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.moe.trainer import TrainConfig, train_experts

NAN, INF = float("nan"), float("inf")


def data(n=64, L=2, n_out=1):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g)
    return x, torch.rand(n, n_out, generator=g), torch.arange(n) % L


def cfg(**kw):
    return TrainConfig(**{"batch_size": 8, "max_steps": 3, "progress": False, "device": "cpu", **kw})


# ----------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("field,value", [
    ("lr", INF), ("lr", NAN), ("lr", -1e-3), ("lr", 0.0), ("weight_decay", INF), ("weight_decay", -0.1),
    ("max_epochs", INF), ("max_epochs", 0), ("val_fraction", NAN), ("val_fraction", 1.0), ("min_delta", NAN),
    ("batch_size", 0), ("batch_size", 2.5), ("max_steps", True), ("patience", 0), ("eval_every", -3),
    ("seed", -1), ("loss", "l1"), ("optimizer", "sgd"), ("lr", "1e-3"),
])
def test_train_config_names_the_field_and_the_value(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (math.isfinite(v) and v > 0)))
@settings(max_examples=30, deadline=None)
def test_any_non_positive_or_non_finite_lr_is_refused(lr):
    with pytest.raises(ValueError, match=re.escape(f"lr must be a finite number in (0, inf), got {lr!r}")):
        TrainConfig(lr=lr)


# ----------------------------------------------------------------------------- trainer data
@pytest.mark.parametrize("train", [train_experts, train_experts_serial])
@pytest.mark.parametrize("where,value", [("x", NAN), ("x", INF), ("y", NAN), ("y", -INF)])
def test_non_finite_data_is_refused_before_training(train, where, value):
    x, y, leaf = data()
    t = x if where == "x" else y
    t[5, 0] = value
    m = StackedMLP(2, 2, 4, 1, 1, seed=0)
    before = m.weights[0].clone()
    with pytest.raises(ValueError) as err:
        train(m, x, y, leaf, cfg(val_fraction=0.0))
    msg = str(err.value)
    assert f"{where} holds 1 non-finite values (first in row 5" in msg and repr(value)[:3] in msg
    assert "drop or impute" in msg and torch.equal(m.weights[0], before)


def test_y_wider_than_the_model_output_is_refused():
    """Issue 15 item 4: a 2-column y into a 1-output model used to train through broadcasting."""
    x, y, leaf = data(n_out=2)
    with pytest.raises(ValueError, match=re.escape("shape [N, 1] (the model's n_out), got (64, 2)")):
        train_experts(StackedMLP(2, 2, 4, 1, 1), x, y, leaf, cfg())


def test_class_ids_out_of_range_are_refused():
    x, _, leaf = data()
    y = torch.arange(64) % 5
    with pytest.raises(ValueError, match=re.escape("class ids must be in [0, 3) for a model with n_out=3, got min 0, max 4")):
        train_experts(StackedMLP(2, 2, 4, 1, 3), x, y, leaf, cfg(loss="cross_entropy"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_wrong_input_dtype_to_the_trainer_is_a_clear_error(dtype):
    x, y, leaf = data()
    with pytest.raises(ValueError, match=re.escape(f"x has dtype {dtype} but the experts are torch.float32")):
        train_experts(StackedMLP(2, 2, 4, 1, 1), (x * 10).to(dtype), y, leaf, cfg())


def test_integer_targets_for_mse_and_float_leaves_are_refused():
    x, y, leaf = data()
    m = StackedMLP(2, 2, 4, 1, 1)
    with pytest.raises(ValueError, match="mse needs floating targets, got torch.int64"):
        train_experts(m, x, (y * 10).long(), leaf, cfg())
    with pytest.raises(ValueError, match="leaf must be a 1-D integer tensor of expert ids >= 0, got torch.float32"):
        train_experts(m, x, y, leaf.float(), cfg())
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got ndarray"):
        train_experts(m, x.numpy(), y, leaf, cfg())


# ----------------------------------------------------------------------------- stacked experts
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_wrong_input_dtype_to_stacked_mlp_is_a_clear_error(dtype):
    m = StackedMLP(2, 3, 4, 1, 1)
    with pytest.raises(ValueError, match=re.escape(f"x has dtype {dtype} but the experts are torch.float32")):
        m(torch.zeros(2, 5, 3, dtype=dtype))
    with pytest.raises(ValueError, match=re.escape(f"x has dtype {dtype}")):
        m.forward_routed(torch.zeros(5, 3, dtype=dtype), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("name,value", [("width", 0), ("n_in", 2.0), ("hidden_layers", -1), ("n_out", True)])
def test_stacked_mlp_sizes_name_the_value(name, value):
    sizes = dict(num_experts=2, n_in=2, width=4, hidden_layers=1, n_out=1) | {name: value}
    with pytest.raises(ValueError, match=re.escape(f"{name} must be an integer >= 1, got {value!r}")):
        StackedMLP(**sizes)


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("branching", [2.0, "2", None, 1.5])
def test_regular_tree_with_a_non_integer_branching(branching):
    with pytest.raises(ValueError, match=re.escape(f"got {branching!r}")):
        RoutingTree.regular(2, 2, branching)


def test_branching_per_axis_must_be_integers():
    with pytest.raises(ValueError, match=re.escape("branching per axis must be an integer >= 1, got 2.0")):
        RoutingTree.regular(2, 2, (2, 2.0))


@pytest.mark.parametrize("bad", [NAN, INF, -INF, 1e39])
def test_tree_keys_must_be_finite(bad):
    keys = torch.rand(1, 2, 2, dtype=torch.float64)
    keys[0, 1, 0] = bad
    with pytest.raises(ValueError, match=re.escape("keys[0] holds NaN or infinite values")):
        RoutingTree([keys])


def test_float64_point_beyond_float32_range_is_an_error_not_leaf_0():
    tree = RoutingTree.regular(2, 2)
    x = torch.tensor([[0.9, 0.9], [1e39, 0.9]], dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("magnitude 1e+39, beyond float32's range")):
        tree.route(x)


def test_nan_point_names_its_row():
    with pytest.raises(ValueError, match=re.escape("(first: row 1 = [nan, 0.5])")):
        RoutingTree.regular(2, 1).route(torch.tensor([[0.1, 0.2], [NAN, 0.5]]))


def test_one_leaf_tree_needs_its_dimension():
    with pytest.raises(ValueError, match="pass n, or use RoutingTree.single"):
        RoutingTree([])
    with pytest.raises(ValueError, match=re.escape("dimension n must be an integer >= 1, got 0")):
        RoutingTree.single(0)


@given(st.integers(1, 3), st.floats(1e6, 1e30), st.integers(0, 10_000), st.booleans())
@settings(max_examples=60, deadline=None)
def test_points_far_outside_the_box_route_to_the_nearest_key(n, far, seed, f64):
    """Issue 15 item 6: float32 squared distances tie for such points; the tree still finds the nearest key
    (for a regular tree: the leaf of the point projected onto the box)."""
    tree = RoutingTree.regular(n, 2, 2)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    axis = torch.randint(0, n, (8,), generator=g)
    sign = (torch.rand(8, generator=g) < 0.5).double() * 2 - 1
    x[torch.arange(8), axis] = sign * far
    x = x if f64 else x.float()
    expected = tree.route(x.double().clamp(0.0, 1.0))
    assert torch.equal(tree.route(x), expected)


def test_one_leaf_tree_routes_everything_to_leaf_0_and_round_trips():
    tree = RoutingTree.single(3)
    x = torch.randn(7, 3) * 1e6
    assert tree.route(x).tolist() == [0] * 7 and tree.num_leaves == 1 and tree.parameter_count == 0
    back = RoutingTree.from_state_dict(tree.state_dict())
    assert back.kind == "single" and back.n == 3 and back.depth == 0 and back.route(x).tolist() == [0] * 7
    with pytest.raises(ValueError, match="3 coordinates per point but the tree is 2-dimensional"):
        RoutingTree.single(2).route(x)


# ----------------------------------------------------------------------------- grid data
@pytest.mark.parametrize("kwargs,message", [
    (dict(a=NAN), "interval ends must be finite, got a=nan"),
    (dict(b=INF), "interval ends must be finite, got a=0.0, b=inf"),
    (dict(test_fraction=NAN), "test_fraction must be in (0, 1), got nan"),
    (dict(s=2.5), "s must be an integer >= 2, got 2.5"),
])
def test_bad_grid_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_grid_data(**{"target": "sine", "n": 2, "s": 8, **kwargs})
