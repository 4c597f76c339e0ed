"""Tests for momlp_lite.theory: the training-free construction and the VC-dimension calculators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momlp_lite.data import TARGETS, Target
from momlp_lite.theory import (
    build_interpolating_momlp,
    cells_per_axis_for,
    courant_hat,
    dense_test_points,
    dense_vc_lower,
    dense_vc_upper,
    hat_network,
    hat_parameter_count,
    kink_target,
    loglog_slope,
    momlp_total_parameters,
    momlp_vc_bound,
    plan_construction,
    relu_network_forward,
    sup_error,
)


# ------------------------------------------------------------------------------------------ the hat network
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_hat_network_equals_closed_form(n: int) -> None:
    rng = np.random.default_rng(n)
    y = rng.uniform(-1.5, 1.5, size=(4000, n))
    explicit = relu_network_forward(hat_network(n), y)[:, 0]
    closed = courant_hat(torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(explicit, closed, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_hat_is_one_at_origin_and_zero_at_other_lattice_points(n: int) -> None:
    lattice = torch.tensor(np.stack(np.meshgrid(*[[-1, 0, 1]] * n, indexing="ij"), -1).reshape(-1, n), dtype=torch.float64)
    values = courant_hat(lattice)
    is_origin = (lattice == 0).all(-1)
    assert torch.equal(values, is_origin.to(torch.float64))


def test_hat_parameter_counts_by_hand() -> None:
    # n = 1: layer 1 has 2 units (1 weight + 1 bias each) = 4; layer 2 computes relu(a), relu(a - b): 3 weights
    # + 2 biases = 5; output weights: 2. Total 11.
    assert hat_parameter_count(1) == 11
    # n = 2: 6 first-layer units (2 with two weights, 4 with one) + 6 biases = 14; 3 pairwise-min pairs -> layer 2:
    # relu(a) 1 + relu(a - b) 2 per pair = 9 weights + 6 biases = 15; layer 3: 3 values (each u1 - u2): one pair
    # 2 + 4 weights, one pass-through 2, 3 biases = 11; layer 4: values a (2 units) and c (1 unit): relu(a) 2,
    # relu(a - c) 3, biases 2 = 7; output 2 weights. 14 + 15 + 11 + 7 + 2 = 49.
    assert hat_parameter_count(2) == 49


# ------------------------------------------------------------------------------------------ the construction
@pytest.mark.parametrize(
    "target, n, eps, r",
    [
        (kink_target(), 1, 0.01, 0.0),
        (kink_target(), 1, 0.02, 1.0),
        ("weierstrass", 1, 0.05, 0.0),
        (kink_target(), 2, 0.03, 0.0),
        (kink_target(), 2, 0.03, 0.5),
        ("weierstrass", 2, 0.2, 0.5),
        ("sine", 2, 0.1, 0.0),
        ("ridge", 3, 0.2, 1 / 3),
        (kink_target(0.3), 3, 0.1, 0.0),
    ],
)
def test_sup_error_below_eps_on_dense_off_grid_points(target, n: int, eps: float, r: float) -> None:
    model = build_interpolating_momlp(target, n, eps, r=r)
    assert model.plan.error_bound <= eps
    per_axis = {1: 9973, 2: 211, 3: 41}[n]  # primes: off the dyadic interpolation grid
    x = dense_test_points(n, per_axis, random_points=3000, seed=1)
    err = sup_error(model, target, x)
    assert err <= model.plan.error_bound + 1e-9 <= eps + 1e-9


def test_affine_target_is_reproduced_exactly() -> None:
    affine = Target("affine", lambda x: 0.3 + x @ torch.tensor([0.5, -0.2], dtype=x.dtype), lambda n: 0.6, "affine")
    model = build_interpolating_momlp(affine, 2, 0.2, r=0.5)
    x = dense_test_points(2, 57, random_points=500)
    assert sup_error(model, affine, x) < 1e-12


def test_interpolates_at_grid_vertices() -> None:
    model = build_interpolating_momlp("sine", 2, 0.1, r=0.5)
    big_n = model.plan.cells_per_axis
    axis = torch.arange(big_n + 1, dtype=torch.float64) / big_n
    verts = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    assert torch.allclose(model(verts), TARGETS["sine"](verts), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_plan_counts_match_the_built_tree(n: int, r: float) -> None:
    model = build_interpolating_momlp(kink_target(), n, 0.2, r=r)
    plan, tree = model.plan, model.tree
    assert plan.num_experts == tree.num_leaves
    assert plan.loaded_parameter_count == plan.expert_parameter_count + tree.path_parameter_count
    assert plan.total_parameter_count == plan.num_experts * plan.expert_parameter_count + tree.parameter_count


def test_plan_by_hand() -> None:
    # Lip = 1, n = 1, eps = 0.05: N >= 1 / 0.1 = 10 cells. r = 0: depth ceil(log2 10) = 4, m = 1.
    p = plan_construction(1.0, 1, 0.05, r=0.0)
    assert (p.depth, p.sub_cells, p.cells_per_axis, p.num_experts) == (4, 1, 16, 16)
    assert p.expert_parameter_count == 2 * 11 + 1
    assert p.loaded_parameter_count == 23 + 4 * 2 * 1
    assert p.total_parameter_count == 16 * 23 + (2 + 4 + 8 + 16)
    # r = 1: a depth-1 tree, m = ceil(10 / 2) = 5 sub-cells per leaf.
    p = plan_construction(1.0, 1, 0.05, r=1.0)
    assert (p.depth, p.sub_cells) == (1, 5)
    assert cells_per_axis_for(1.0, 2, 0.05) == math.ceil(math.sqrt(2) / 0.1)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_loaded_parameters_grow_at_most_like_inverse_eps(n: int) -> None:
    eps = np.geomspace(0.3, 1e-4, 12)
    lip = TARGETS["weierstrass"].lipschitz(n)
    for r in (0.0, 1.0 / n):
        plans = [plan_construction(lip, n, float(e), r) for e in eps]
        loaded = loglog_slope(1 / eps, [p.loaded_parameter_count for p in plans])
        total = loglog_slope(1 / eps, [p.total_parameter_count for p in plans])
        assert loaded <= 1.1
        assert total >= n - 0.4
        if r < 1:
            assert total >= loaded + 0.5


# ------------------------------------------------------------------------------------------ helpers
def test_loglog_slope_recovers_a_power_law() -> None:
    x = np.geomspace(1, 1e4, 9)
    assert loglog_slope(x, 3.0 * x**1.5) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="two distinct"):
        loglog_slope([1.0, 1.0], [2.0, 3.0])


# ------------------------------------------------------------------------------------------ VC calculators
def test_vc_calculators_hand_values() -> None:
    # L * max(n L, J W): 10 * max(2 * 10, 3 * 50) = 10 * 150 = 1500; 100 * max(2 * 100, 150) = 20000.
    assert momlp_vc_bound(n=2, L=10, J=3, W=50) == 1500
    assert momlp_vc_bound(n=2, L=100, J=3, W=50) == 20_000
    assert momlp_vc_bound(n=1, L=1, J=1, W=1) == 1
    # P D log2 P: 1024 * 4 * 10 = 40960; P D log2(P / D): 1024 * 4 * log2(256) = 32768.
    assert dense_vc_upper(1024, 4) == pytest.approx(40_960.0)
    assert dense_vc_lower(1024, 4) == pytest.approx(32_768.0)
    # 3 experts 2 -> 5 -> 5 -> 1 with PReLU: (2+1)*5 + (5+1)*5 + (5+1)*1 + 2 = 15 + 30 + 6 + 2 = 53 each.
    assert momlp_total_parameters(n=2, L=3, J=2, W=5) == 3 * 53
    assert momlp_total_parameters(n=2, L=3, J=2, W=5, prelu=False) == 3 * 51


@given(
    n=st.integers(1, 64), L=st.integers(1, 10_000), J=st.integers(1, 16), W=st.integers(1, 4096)
)
@settings(max_examples=200, deadline=None)
def test_momlp_bound_is_monotone_and_between_linear_and_quadratic(n: int, L: int, J: int, W: int) -> None:
    b = momlp_vc_bound(n, L, J, W)
    assert b >= L * J * W and b >= n * L * L
    assert momlp_vc_bound(n, L + 1, J, W) > b
    assert b == max(n * L * L, L * J * W)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: momlp_vc_bound(0, 1, 1, 1), "n must be an integer >= 1, got 0"),
        (lambda: momlp_vc_bound(1, 2.5, 1, 1), "L must be an integer >= 1, got 2.5"),
        (lambda: momlp_vc_bound(1, 1, True, 1), "J must be an integer >= 1, got True"),
        (lambda: momlp_vc_bound(1, 1, 1, -3), "W must be an integer >= 1, got -3"),
        (lambda: dense_vc_upper(1, 3), "num_params must be >= 2"),
        (lambda: dense_vc_lower(10, 10), "num_layers .* must be < num_params"),
        (lambda: plan_construction(1.0, 1, 0.0), r"eps must be in \(0, 1\), got 0.0"),
        (lambda: cells_per_axis_for(1.0, 1, 1.0), r"eps must be in \(0, 1\), got 1.0"),
        (lambda: plan_construction(1.0, 1, "0.1"), r"eps must be a number in \(0, 1\), got '0.1'"),
        (lambda: build_interpolating_momlp("sine", 2, True), r"eps must be a number in \(0, 1\), got True"),
        (lambda: build_interpolating_momlp("sine", 2, 1.5), r"eps must be in \(0, 1\)"),
        (lambda: build_interpolating_momlp("sine", 0, 0.1), "n must be an integer >= 1, got 0"),
        (lambda: build_interpolating_momlp("sine", 2, 0.1, r=2), r"r must be a number in \[0, 1\]"),
        (lambda: build_interpolating_momlp("nope", 2, 0.1), "unknown target"),
        (lambda: build_interpolating_momlp("weierstrass", 3, 1e-3), "too many; raise eps"),
    ],
)
def test_inputs_are_validated(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_numpy_integers_are_accepted() -> None:
    assert momlp_vc_bound(np.int64(2), np.int32(3), 1, 1) == 18


def test_kink_target_and_call_validation() -> None:
    t = kink_target(0.25)
    x = torch.tensor([[0.25, 0.25], [1.25, 0.25]], dtype=torch.float64)
    assert torch.allclose(t(x), torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="c must be a finite number"):
        kink_target(float("nan"))
    model = build_interpolating_momlp(t, 2, 0.2)
    with pytest.raises(ValueError, match=r"x must have shape \[P, 2\]"):
        model(torch.zeros(3, 3))
