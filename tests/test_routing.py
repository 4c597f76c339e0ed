"""Routing trees: every point in exactly one leaf, regular leaves contain their points, tree == brute force."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from momlp_lite import RoutingTree

dims = st.integers(1, 3)


@st.composite
def regular_case(draw):
    n = draw(dims)
    branching = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    if math.prod(branching) < 2:
        branching = (2,) + branching[1:]
    depth = draw(st.integers(1, 3 if math.prod(branching) <= 4 else 2))
    a = draw(st.floats(-5, 5, allow_nan=False))
    width = draw(st.floats(0.1, 10, allow_nan=False))
    pts = draw(
        arrays(np.float64, (draw(st.integers(1, 60)), n), elements=st.floats(0, 1, allow_nan=False))
    )
    x = torch.as_tensor(a + width * pts, dtype=torch.float32)
    return RoutingTree.regular(n, depth, branching, a, a + width), x


@given(regular_case())
def test_every_point_lands_in_exactly_one_leaf(case):
    tree, x = case
    leaf = tree.route(x)
    assert leaf.shape == (len(x),) and leaf.dtype == torch.long
    assert int(leaf.min()) >= 0 and int(leaf.max()) < tree.num_leaves
    assert int(tree.leaf_counts(x).sum()) == len(x)


@given(regular_case())
def test_regular_leaf_is_the_box_containing_the_point(case):
    tree, x = case
    lo, hi = tree.leaf_cells()
    leaf = tree.route(x)
    tol = 1e-5 * (tree.bounds[1] - tree.bounds[0]) + 1e-6
    assert bool(((x >= lo[leaf] - tol) & (x <= hi[leaf] + tol)).all())


@given(regular_case())
def test_tree_routing_equals_brute_force_nearest_leaf_key(case):
    tree, x = case
    leaf_tree, leaf_flat = tree.route(x), tree.route_flat(x)
    keys = tree.leaf_keys.double()
    d_tree = ((x.double() - keys[leaf_tree]) ** 2).sum(1)
    d_all = ((x.double()[:, None, :] - keys[None]) ** 2).sum(-1)
    d_min = d_all.min(1).values
    # The tree finds a nearest leaf key; where that key is unique, the very same leaf.
    assert torch.allclose(d_tree, d_min, rtol=1e-5, atol=1e-9)
    unique = (d_all <= d_min[:, None] * (1 + 1e-4) + 1e-9).sum(1) == 1
    assert torch.equal(leaf_tree[unique], leaf_flat[unique])


@given(regular_case())
def test_path_spells_the_leaf_id(case):
    tree, x = case
    leaf, path = tree.route(x, return_path=True)
    assert path.shape == (len(x), tree.depth)
    weights = tree.branching ** torch.arange(tree.depth - 1, -1, -1)
    assert torch.equal((path * weights).sum(1), leaf)


@pytest.mark.parametrize("n,branching,depth", [(1, 3, 3), (2, (2, 3), 2), (3, 2, 2)])
def test_leaf_cells_tile_the_domain(n, branching, depth):
    tree = RoutingTree.regular(n, depth, branching, -1.0, 2.0)
    lo, hi = tree.leaf_cells()
    assert len(lo) == tree.num_leaves
    assert math.isclose(float((hi - lo).prod(1).sum()), 3.0**n, rel_tol=1e-9)
    # No two cells overlap with positive volume ...
    overlap = (torch.minimum(hi[:, None], hi[None]) - torch.maximum(lo[:, None], lo[None])).clamp(min=0).prod(-1)
    overlap.fill_diagonal_(0)
    assert float(overlap.max()) < 1e-12
    # ... and random points of the domain each sit inside exactly one open cell.
    x = -1 + 3 * torch.rand(2000, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inside = ((x[:, None] > lo[None]) & (x[:, None] < hi[None])).all(-1).sum(1)
    assert bool((inside == 1).all())


def test_regular_keys_are_subcube_centers():
    tree = RoutingTree.regular(2, 2, 2)
    lo, hi = tree.leaf_cells()
    assert torch.allclose(tree.leaf_keys.double(), (lo + hi) / 2)
    assert tree.path_parameter_count == 2 * 4 * 2


def test_kmeans_tree_routes_everything_and_is_seeded():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 3, generator=gen)
    t1 = RoutingTree.from_data(x, depth=2, branching=4, seed=7)
    t2 = RoutingTree.from_data(x, depth=2, branching=4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(t1.keys, t2.keys))
    counts = t1.leaf_counts(x)
    assert int(counts.sum()) == len(x) and t1.num_leaves == 16
    assert int((counts > 0).sum()) == 16  # well-spread Gaussian data: no empty leaf


def test_kmeans_keys_are_centroids_of_their_points():
    x = torch.rand(4000, 2, generator=torch.Generator().manual_seed(3))
    tree = RoutingTree.from_data(x, depth=1, branching=5, iters=100)
    leaf = tree.route(x)
    for j in range(5):
        assert torch.allclose(x[leaf == j].mean(0), tree.leaf_keys[j], atol=1e-4)


def test_kmeans_tree_beats_regular_tree_on_clustered_data():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.2, 0.2], [0.8, 0.7]])
    x = centers[torch.randint(0, 2, (4000,), generator=gen)] + 0.03 * torch.randn(4000, 2, generator=gen)
    km = RoutingTree.from_data(x, depth=3, branching=4)
    reg = RoutingTree.regular(2, 3, 2)
    assert int((km.leaf_counts(x) == 0).sum()) < int((reg.leaf_counts(x) == 0).sum())


def test_state_dict_round_trip():
    tree = RoutingTree.regular(2, 3, (2, 3), -1, 1)
    back = RoutingTree.from_state_dict(tree.state_dict())
    x = torch.rand(500, 2) * 2 - 1
    assert torch.equal(tree.route(x), back.route(x))
    assert torch.equal(tree.leaf_cells()[0], back.leaf_cells()[0])


def test_leaf_map_covers_all_leaves():
    tree = RoutingTree.regular(2, 2, 2)
    xs, ys, ids = tree.leaf_map(64)
    assert ids.shape == (64, 64) and set(ids.unique().tolist()) == set(range(16))
    # the raster is row = y, column = x
    assert int(ids[0, 0]) == int(tree.route(torch.tensor([[xs[0], ys[0]]]))[0])
    assert int(ids[0, -1]) == int(tree.route(torch.tensor([[xs[-1], ys[0]]]))[0])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: RoutingTree.regular(2, 0), "depth must be an integer >= 1, got 0"),
        (lambda: RoutingTree.regular(2, 2, 2, 1.0, 0.0), "a=1.0, b=0.0"),
        (lambda: RoutingTree.regular(2, 2, (2, 2, 2)), "one value per axis"),
        (lambda: RoutingTree.regular(0, 2), "dimension n must be an integer >= 1, got 0"),
        (lambda: RoutingTree.regular(2, 2, 1), "split at least one axis"),
        (lambda: RoutingTree.from_data(torch.rand(10, 2), depth=2, branching=4), "16 leaves but got only 10 points"),
        (lambda: RoutingTree.from_data(torch.rand(100, 2), depth=0), "depth must be an integer >= 1, got 0"),
    ],
)
def test_bad_construction_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_bad_route_inputs_raise_clear_errors():
    tree = RoutingTree.regular(2, 2)
    with pytest.raises(ValueError, match=r"3 coordinates per point but the tree is 2-dimensional"):
        tree.route(torch.rand(5, 3))
    with pytest.raises(ValueError, match=r"shape \[N, n\], got shape \(5,\)"):
        tree.route(torch.rand(5))
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 rows"):
        tree.route(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="NaN"):
        RoutingTree.from_data(torch.tensor([[0.1, float("nan")]] * 20), depth=1, branching=2)


def test_numpy_input_and_empty_batch():
    tree = RoutingTree.regular(2, 2)
    assert tree.route(np.array([[0.1, 0.9]])).tolist() == tree.route(torch.tensor([[0.1, 0.9]])).tolist()
    leaf, path = tree.route(torch.zeros(0, 2), return_path=True)
    assert leaf.shape == (0,) and path.shape == (0, 2)
