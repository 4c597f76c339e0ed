"""Routing trees: send every input to exactly one expert (a leaf).

The book's reading of Kratsios et al.'s "Algorithm 1: Routing Tree" (its text is not available): every
internal node holds one *prototype key* per child and an input descends to the nearest child key, level
by level. :meth:`RoutingTree.regular` puts the keys at the centers of nested sub-boxes of [a, b]^n,
:meth:`RoutingTree.from_data` makes them by recursive k-means, :meth:`RoutingTree.single` is the one-leaf
tree (no keys) of the dense baseline. Child ``c`` of node ``i`` is node ``i * B + c`` one level down, so
routing costs ``O(depth * B * n)`` per point against ``O(B**depth * n)`` for a flat search. Distances are
float32; where the two nearest keys cannot be told apart in float32 (a point on a face, or far outside
the box) the choice is made again in float64 from distance differences.

Taught in: book/routing_trees.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..runtime import check_positive_int

__all__ = ["RoutingTree"]

# Upper bound on elements of one temporary [chunk, B, n] block during routing.
_ROUTE_BLOCK = 1 << 24
_MAX_LEAVES = 1 << 22
_F32_MAX = float(torch.finfo(torch.float32).max)
_TIE_RTOL = 1e-4  # float32 squared distances this close (relatively) are decided again in float64


def _as_points(x: Any, n: int | None = None, what: str = "x") -> torch.Tensor:
    """Validate ``x`` as a finite ``[N, n]`` float tensor (integers become float64; dtype kept otherwise)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_complex():
        raise ValueError(f"{what} must be real, got dtype {t.dtype}; pass the real part")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array of shape [N, n], got shape {tuple(t.shape)}")
    if n is not None and t.shape[1] != n:
        raise ValueError(
            f"{what} has {t.shape[1]} coordinates per point but the tree is {n}-dimensional; "
            f"pass an array of shape [N, {n}]"
        )
    if t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            raise ValueError(f"{what} contains NaN or infinite values in {int(bad.any(dim=1).sum())} rows "
                             f"(first: row {row} = {t[row].tolist()}); drop or clean those rows")
        big = float(t.abs().max())
        if big > _F32_MAX:
            raise ValueError(f"{what} has a coordinate of magnitude {big:.3g}, beyond float32's range "
                             f"({_F32_MAX:.3g}) in which the keys live; rescale the input")
    return t


class RoutingTree:
    """A tree of prototype keys that routes each point to one leaf.

    Build one with :meth:`regular`, :meth:`from_data` or :meth:`single`. The constructor takes the raw
    keys: ``keys[l]`` of shape ``[B**l, B, n]`` holds the keys of the ``B`` children of each node of level
    ``l`` (finite; no keys is the one-leaf tree and needs ``n``). ``kind`` is informational; ``bounds``
    (the box [a, b]) and ``axis_branching`` (pieces per axis) describe a regular tree's cells.
    Taught in: book/routing_trees.
    """

    def __init__(self, keys: Sequence[torch.Tensor], kind: str = "custom", bounds: tuple[float, float] | None = None,
                 axis_branching: tuple[int, ...] | None = None, n: int | None = None) -> None:
        if len(keys) == 0:
            if n is None:
                raise ValueError("a tree without keys (one leaf) needs its dimension: pass n, or use RoutingTree.single(n)")
            self._n = check_positive_int("dimension n", n)
        else:
            k0 = keys[0]
            if k0.ndim != 3 or k0.shape[0] != 1:
                raise ValueError(f"keys[0] must have shape [1, B, n], got {tuple(k0.shape)}")
            b, self._n = k0.shape[1], int(k0.shape[2])
            if n is not None and n != self._n:
                raise ValueError(f"n={n} does not match the keys' dimension {self._n}")
            for level, k in enumerate(keys):
                want = (b**level, b, self._n)
                if tuple(k.shape) != want:
                    raise ValueError(f"keys[{level}] must have shape {want}, got {tuple(k.shape)}")
        self.keys = [k.detach().to(torch.float32).contiguous() for k in keys]
        for level, k in enumerate(self.keys):
            if not bool(torch.isfinite(k).all()):
                raise ValueError(f"keys[{level}] holds NaN or infinite values (after the cast to float32); "
                                 "every key must be a finite point")
        self.kind, self.bounds, self.axis_branching = kind, bounds, axis_branching
        self._device_keys: dict[torch.device, list[torch.Tensor]] = {}

    @classmethod
    def single(cls, n: int) -> "RoutingTree":
        """The one-leaf tree on ``R^n``: no keys, every point goes to leaf 0 (the dense baseline).
        Taught in: book/routing_trees."""
        return cls([], kind="single", n=n)

    @classmethod
    def regular(cls, n: int, depth: int, branching: int | Sequence[int] = 2, a: float = 0.0,
                b: float = 1.0) -> "RoutingTree":
        """Regular tree over [a, b]^n: every level splits each box into ``branching`` pieces per axis.

        ``branching`` is one integer for every axis or one per axis; the keys are the centers of the
        sub-boxes, so a point is routed to the leaf box that contains it (points exactly on a
        shared face go to one of the two boxes). Taught in: book/routing_trees.
        """
        n = check_positive_int("dimension n", n)
        depth = check_positive_int("depth", depth)
        if isinstance(branching, (int, np.integer)) and not isinstance(branching, bool):
            per_axis: tuple[Any, ...] = (branching,) * n
        elif isinstance(branching, (list, tuple)):
            per_axis = tuple(branching)
        else:
            raise ValueError(f"branching must be an integer or one integer per axis, got {branching!r}")
        if len(per_axis) != n:
            raise ValueError(f"branching must give one value per axis ({n}), got {len(per_axis)}")
        per_axis = tuple(check_positive_int("branching per axis", p) for p in per_axis)
        if not (math.isfinite(a) and math.isfinite(b)) or not a < b:
            raise ValueError(f"the box needs finite a < b, got a={a}, b={b}; swap or fix them")
        big_b = math.prod(per_axis)
        if big_b < 2:
            raise ValueError(f"branching must split at least one axis (product >= 2), got {per_axis}")
        if big_b**depth > _MAX_LEAVES:
            raise ValueError(
                f"{big_b}**{depth} = {big_b**depth} leaves is more than {_MAX_LEAVES}; lower depth or branching"
            )
        pieces = torch.tensor(per_axis, dtype=torch.float64)
        child_index = cls._child_grid(per_axis)  # [B, n] integer offsets per axis
        lo = torch.full((1, n), float(a), dtype=torch.float64)
        size = torch.full((n,), float(b - a), dtype=torch.float64)
        keys = []
        for _ in range(depth):
            child_size = size / pieces
            child_lo = lo[:, None, :] + child_index[None] * child_size  # [nodes, B, n]
            keys.append((child_lo + child_size / 2).to(torch.float32))
            lo, size = child_lo.reshape(-1, n), child_size
        return cls(keys, kind="regular", bounds=(float(a), float(b)), axis_branching=per_axis)

    @staticmethod
    def _child_grid(per_axis: tuple[int, ...]) -> torch.Tensor:
        """All child offsets, axis 0 slowest: row ``c`` holds the per-axis index of child ``c``."""
        axes = [torch.arange(p, dtype=torch.float64) for p in per_axis]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    @classmethod
    def from_data(cls, x: Any, depth: int, branching: int = 4, iters: int = 25, seed: int = 0) -> "RoutingTree":
        """Data-driven tree by recursive k-means: Lloyd's algorithm inside every node of a level at once.

        Needs at least ``branching**depth`` points; a node with fewer distinct points than ``branching``
        gets repeated keys (some leaves stay empty). Taught in: book/routing_trees.
        """
        depth = check_positive_int("depth", depth)
        big_b = check_positive_int("branching", branching)
        if big_b < 2:
            raise ValueError(f"branching must be >= 2, got {branching}")
        iters = check_positive_int("iters", iters)
        pts = _as_points(x).to(torch.float32)
        leaves = big_b**depth
        if leaves > _MAX_LEAVES:
            raise ValueError(f"{big_b}**{depth} = {leaves} leaves is too many; lower depth or branching")
        if len(pts) < leaves:
            raise ValueError(f"k-means tree with branching={big_b}, depth={depth} has {leaves} leaves but got only "
                             f"{len(pts)} points; give at least one point per leaf or lower depth/branching")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        node = torch.zeros(len(pts), dtype=torch.long, device=pts.device)
        parent_keys = pts.mean(0, keepdim=True)  # [1, n] where the root "is"
        keys = []
        for level in range(depth):
            nodes = big_b**level
            k = cls._init_keys(pts, node, nodes, big_b, parent_keys, gen)
            for _ in range(iters):
                child = _nearest(pts, k, node)
                new_k = _centroids(pts, node * big_b + child, nodes * big_b, k.reshape(-1, pts.shape[1])).reshape(nodes, big_b, -1)
                if torch.equal(new_k, k):
                    break
                k = new_k
            child = _nearest(pts, k, node)
            keys.append(k)
            node = node * big_b + child
            parent_keys = k.reshape(-1, pts.shape[1])
        return cls([k.cpu() for k in keys], kind="kmeans")

    @staticmethod
    def _init_keys(pts: torch.Tensor, node: torch.Tensor, nodes: int, big_b: int, parent_keys: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
        """Pick ``big_b`` random member points of every node as initial keys (all nodes at once)."""
        n = pts.shape[1]
        priority = torch.rand(len(pts), generator=gen).to(pts.device)
        order = torch.argsort(node.to(torch.float64) + priority.to(torch.float64))
        counts = torch.bincount(node, minlength=nodes)
        starts = torch.cumsum(counts, 0) - counts
        j = torch.arange(big_b, device=pts.device)  # repeat members when too few:
        pos = (starts[:, None] + (j[None, :] % counts.clamp(min=1)[:, None])).clamp(max=max(len(pts) - 1, 0))
        k = pts[order[pos]]  # [nodes, B, n]
        empty = counts == 0
        if bool(empty.any()):  # an empty node keeps its own location for every child
            k[empty] = parent_keys[empty][:, None, :].expand(-1, big_b, n)
        return k

    @property
    def n(self) -> int:
        """Input dimension. Taught in: book/routing_trees."""
        return self._n

    @property
    def depth(self) -> int:
        return len(self.keys)

    @property
    def branching(self) -> int:
        """Children per internal node (1 for the one-leaf tree). Taught in: book/routing_trees."""
        return int(self.keys[0].shape[1]) if self.keys else 1

    @property
    def num_leaves(self) -> int:
        return self.branching**self.depth

    @property
    def leaf_keys(self) -> torch.Tensor:
        """``[num_leaves, n]``: the key of every leaf, in leaf order (the origin for the one-leaf tree).
        Taught in: book/routing_trees."""
        return self.keys[-1].reshape(-1, self.n) if self.keys else torch.zeros(1, self.n)

    @property
    def path_parameter_count(self) -> int:
        """Key coordinates read while routing one point: ``depth * B * n``. Taught in: book/routing_trees."""
        return self.depth * self.branching * self.n

    @property
    def parameter_count(self) -> int:
        """All key coordinates stored in the tree. Taught in: book/routing_trees."""
        return sum(k.numel() for k in self.keys)

    def __repr__(self) -> str:
        extra = f", bounds={self.bounds}, axis_branching={self.axis_branching}" if self.bounds else ""
        return (
            f"RoutingTree(kind={self.kind!r}, n={self.n}, depth={self.depth}, "
            f"branching={self.branching}, leaves={self.num_leaves}{extra})"
        )

    def _keys_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._device_keys:
            self._device_keys[device] = [k.to(device) for k in self.keys]
        return self._device_keys[device]

    def route(self, x: Any, return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Leaf id of every point of ``x`` (``[N, n]``), descending by nearest key per level.

        Returns a ``[N]`` long tensor on ``x``'s device; with ``return_path=True`` also the
        ``[N, depth]`` child index chosen at every level. Taught in: book/routing_trees.
        """
        pts = _as_points(x, self.n)
        keys = self._keys_on(pts.device)
        chunk = max(1, _ROUTE_BLOCK // (self.branching * self.n))
        leaves, paths = [], []
        for start in range(0, len(pts), chunk):
            exact = pts[start : start + chunk]
            xb = exact.to(torch.float32)
            node = torch.zeros(len(xb), dtype=torch.long, device=pts.device)
            steps = []
            for k in keys:
                child = _nearest(xb, k, node, exact)
                node = node * self.branching + child
                steps.append(child)
            leaves.append(node)
            if return_path:
                steps_t = torch.stack(steps, 1) if steps else node.new_zeros((len(xb), 0))
                paths.append(steps_t)
        leaf = torch.cat(leaves) if leaves else torch.zeros(0, dtype=torch.long, device=pts.device)
        if not return_path:
            return leaf
        path = torch.cat(paths) if paths else leaf.new_zeros((0, self.depth))
        return leaf, path

    def route_flat(self, x: Any) -> torch.Tensor:
        """Brute-force routing: the nearest *leaf* key among all ``num_leaves`` of them.

        For a regular tree this equals :meth:`route`; it is the ``O(num_leaves)`` baseline.
        Taught in: book/routing_trees.
        """
        pts = _as_points(x, self.n)
        leaf_keys = self._keys_on(pts.device)[-1].reshape(-1, self.n)
        chunk = max(1, _ROUTE_BLOCK // self.num_leaves)
        out = [
            torch.cdist(
                pts[s : s + chunk].to(torch.float32), leaf_keys, compute_mode="donot_use_mm_for_euclid_dist"
            ).argmin(1)
            for s in range(0, len(pts), chunk)
        ]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=pts.device)

    def leaf_counts(self, x: Any) -> torch.Tensor:
        """How many points of ``x`` land in each leaf (``[num_leaves]``). Taught in: book/routing_trees."""
        return torch.bincount(self.route(x), minlength=self.num_leaves)

    def leaf_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes of a regular tree's leaves: ``(lo, hi)``, each ``[num_leaves, n]``, in leaf order.
        Taught in: book/routing_trees."""
        if self.kind != "regular" or self.bounds is None or self.axis_branching is None:
            raise ValueError(
                f"leaf_cells() needs a regular tree (kind={self.kind!r}); use leaf_map() for any 2-D tree"
            )
        a, b = self.bounds
        pieces = torch.tensor(self.axis_branching, dtype=torch.float64)
        offsets = self._child_grid(self.axis_branching)
        lo = torch.full((1, self.n), a, dtype=torch.float64)
        size = torch.full((self.n,), b - a, dtype=torch.float64)
        for _ in range(self.depth):
            size = size / pieces
            lo = (lo[:, None, :] + offsets[None] * size).reshape(-1, self.n)
        return lo, lo + size

    def leaf_map(self, resolution: int = 200,
                 bounds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route a ``resolution × resolution`` raster over a 2-D box: ``(xs, ys, leaf_ids)``.

        ``leaf_ids[i, j]`` is the leaf of point ``(xs[j], ys[i])`` — the layout plotly heatmaps use.
        Taught in: book/routing_trees.
        """
        if self.n != 2:
            raise ValueError(f"leaf_map() draws 2-D trees only; this tree has n={self.n}")
        resolution = check_positive_int("resolution", resolution)
        a, b = bounds or self.bounds or (0.0, 1.0)
        xs = torch.linspace(a, b, resolution)
        gy, gx = torch.meshgrid(xs, xs, indexing="ij")
        ids = self.route(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).reshape(resolution, resolution)
        return xs, xs.clone(), ids

    def state_dict(self) -> dict[str, Any]:
        """Plain description (tensors + JSON-able metadata) from which :meth:`from_state_dict` rebuilds the tree.
        Taught in: book/routing_trees."""
        return {
            "kind": self.kind,
            "bounds": list(self.bounds) if self.bounds else None,
            "axis_branching": list(self.axis_branching) if self.axis_branching else None,
            "keys": [k.clone() for k in self.keys],
            "n": self.n,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RoutingTree":
        bounds = tuple(state["bounds"]) if state.get("bounds") else None
        axis = tuple(state["axis_branching"]) if state.get("axis_branching") else None
        return cls(list(state["keys"]), kind=state.get("kind", "custom"), bounds=bounds, axis_branching=axis,  # type: ignore[arg-type]
                   n=state.get("n"))


def _nearest(x: torch.Tensor, keys: torch.Tensor, node: torch.Tensor, exact: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest child key of each point's node: ``x [N, n]``, ``keys [nodes, B, n]``, ``node [N]`` → ``[N]``.

    float32 squared distances first; rows whose smallest distance is not clearly unique are decided
    again in float64 (from ``exact``, the points in their own precision) with the differences
    ``d_j - d_b = (k_j - k_b)·(k_j + k_b - 2x)`` to the current best ``b`` until ``b`` stays: a
    coordinate where ``k_j`` and ``k_b`` agree adds exactly 0, however far ``x`` is from the keys.
    """
    d = keys[node].sub_(x[:, None, :]).square_().sum(-1)
    best = d.argmin(1)
    if keys.shape[1] < 2 or len(x) == 0:
        return best
    d_min = d.gather(1, best[:, None])
    rows = torch.nonzero((d <= d_min * (1 + _TIE_RTOL)).sum(1) > 1).flatten()
    if len(rows):
        xe = (x if exact is None else exact)[rows].double()[:, None, :]
        k, b = keys[node[rows]].double(), best[rows]
        for _ in range(keys.shape[1]):
            kb = k[torch.arange(len(rows)), b][:, None, :]
            diff = ((k - kb) * (k + kb - 2 * xe)).sum(-1)
            new = torch.where(diff.min(1).values < 0, diff.argmin(1), b)
            if torch.equal(new, b):
                break
            b = new
        best[rows] = b
    return best


def _centroids(x: torch.Tensor, cluster: torch.Tensor, k: int, old: torch.Tensor) -> torch.Tensor:
    """Mean of the points of each of ``k`` clusters; an empty cluster keeps its old center."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, cluster, x)
    counts = torch.bincount(cluster, minlength=k).to(x.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), old)
