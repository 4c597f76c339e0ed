"""Grid data: the s^n vertices of [a, b]^n, a seeded 80/20 split, Lipschitz targets."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from momlp_lite.data import TARGETS, get_target, grid_points, make_grid_data


@given(n=st.integers(1, 3), s=st.integers(2, 9), a=st.floats(-3, 3), w=st.floats(0.5, 4))
def test_grid_has_s_to_the_n_distinct_vertices_in_the_box(n, s, a, w):
    x = grid_points(n, s, a, a + w)
    assert x.shape == (s**n, n)
    assert len(torch.unique(x, dim=0)) == s**n
    assert torch.allclose(x.min(0).values, torch.full((n,), a)) and torch.allclose(x.max(0).values, torch.full((n,), a + w))


@given(n=st.integers(1, 3), s=st.integers(3, 8), seed=st.integers(0, 10_000))
def test_split_is_80_20_disjoint_and_covers_the_grid(n, s, seed):
    d = make_grid_data("distance", n, s, seed=seed)
    assert len(d.x_test) == round(0.2 * s**n) and len(d.x_train) + len(d.x_test) == s**n
    both = torch.cat([d.x_train, d.x_test])
    assert len(torch.unique(both, dim=0)) == s**n
    assert d.y_train.shape == (len(d.x_train), 1)


def test_split_is_deterministic_by_seed():
    a, b, c = (make_grid_data("sine", 2, 10, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_test, c.x_test)


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_targets_respect_their_lipschitz_constant(name, n):
    t = get_target(name)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4000, n, generator=gen, dtype=torch.float64), torch.rand(4000, n, generator=gen, dtype=torch.float64)
    ratio = (t(x) - t(y)).abs() / torch.linalg.vector_norm(x - y, dim=1)
    assert float(ratio.max()) <= t.lipschitz(n) * (1 + 1e-9)
    assert t(x).shape == (4000,)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(target="distance", n=0, s=4), "dimension n must be an integer >= 1, got 0"),
        (dict(target="distance", n=2, s=1), "s must be an integer >= 2, got 1"),
        (dict(target="distance", n=2, s=4, a=1.0, b=0.0), "a < b, got a=1.0, b=0.0"),
        (dict(target="nope", n=2, s=4), "unknown target 'nope'"),
        (dict(target="distance", n=2, s=4, test_fraction=1.5), "test_fraction must be in"),
    ],
)
def test_bad_grid_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_grid_data(**kwargs)


def test_weierstrass_target_is_rough():
    # Its slope at the finest scale is far larger than the smooth sine's.
    x = torch.linspace(0, 1, 4097, dtype=torch.float64)[:, None]
    rough = get_target("weierstrass")(x).diff().abs().max() * 4096
    smooth = get_target("distance")(x).diff().abs().max() * 4096
    assert float(rough) > 3 * float(smooth) and math.isfinite(float(rough))


def test_leaf_moments():
    from momlp_lite.data.grid import leaf_moments

    v = torch.tensor([[1.0], [3.0], [5.0], [7.0], [2.0]])
    leaf = torch.tensor([0, 0, 1, 1, 3])
    mean, std = leaf_moments(v, leaf, 4)
    assert mean[:, 0].tolist() == [2.0, 6.0, 0.0, 2.0]
    assert std[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]  # empty leaf and single sample: std 1
    mean, std = leaf_moments(torch.tensor([[0.0], [4.0]]), torch.tensor([0, 0]), 1)
    assert float(std) == 2.0
