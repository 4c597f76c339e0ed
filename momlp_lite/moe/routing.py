"""Routing trees: a point descends level by level to the nearest child key, to a leaf. Taught in: book/routing_trees."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ..runtime import check_positive_int

__all__ = ["RoutingTree"]

_ROUTE_BLOCK = 1 << 24  # upper bound on elements of one temporary [chunk, B, n] block during routing
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
        raise ValueError(f"{what} has {t.shape[1]} coordinates per point but the tree is {n}-dimensional; "
                         f"pass an array of shape [N, {n}]")
    if t.numel():
        bad = ~torch.isfinite(t).all(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"{what} contains NaN or infinite values in {int(bad.sum())} rows "
                             f"(first: row {row} = {t[row].tolist()}); drop or clean those rows")
        big = float(t.abs().max())
        if big > _F32_MAX:
            raise ValueError(f"{what} has a coordinate of magnitude {big:.3g}, beyond float32's range "
                             f"({_F32_MAX:.3g}) in which the keys live; rescale the input")
    return t


class RoutingTree:
    """Prototype keys that route points to leaves; ``keys[l] [B**l, B, n]``: the child keys of level ``l``'s nodes.
    Child ``c`` of node ``i`` is node ``i * B + c``. Taught in: book/routing_trees."""

    def __init__(self, keys: Sequence[torch.Tensor], kind: str = "custom", bounds: tuple[float, float] | None = None,
                 axis_branching: tuple[int, ...] | None = None, n: int | None = None) -> None:
        self.keys = [k.detach().to(torch.float32).contiguous() for k in keys]
        if not self.keys:
            if n is None:
                raise ValueError("a tree without keys (one leaf) needs its dimension: "
                                 "pass n, or use RoutingTree.single(n)")
            self.n, self.branching = check_positive_int("dimension n", n), 1
        elif self.keys[0].ndim != 3 or self.keys[0].shape[0] != 1:
            raise ValueError(f"keys[0] must have shape [1, B, n], got {tuple(self.keys[0].shape)}")
        else:
            self.branching, self.n = int(self.keys[0].shape[1]), int(self.keys[0].shape[2])
            if n is not None and n != self.n:
                raise ValueError(f"n={n} does not match the keys' dimension {self.n}")
        for level, k in enumerate(self.keys):
            want = (self.branching**level, self.branching, self.n)
            if tuple(k.shape) != want:
                raise ValueError(f"keys[{level}] must have shape {want}, got {tuple(k.shape)}")
            if not bool(torch.isfinite(k).all()):
                raise ValueError(f"keys[{level}] holds NaN or infinite values (after the cast to float32); "
                                 "every key must be a finite point")
        self.kind, self.bounds, self.axis_branching = kind, bounds, axis_branching
        self.depth, self.num_leaves = len(self.keys), self.branching ** len(self.keys)
        self.leaf_keys = self.keys[-1].reshape(-1, self.n) if self.keys else torch.zeros(1, self.n)
        self.path_parameter_count = self.depth * self.branching * self.n
        self.parameter_count = sum(k.numel() for k in self.keys)
        self._device_keys: dict[torch.device, list[torch.Tensor]] = {}

    @classmethod
    def single(cls, n: int) -> "RoutingTree":
        """The one-leaf tree on ``R^n``: no keys, every point goes to leaf 0 (the dense baseline)."""
        return cls([], kind="single", n=n)

    @classmethod
    def regular(cls, n: int, depth: int, branching: int | Sequence[int] = 2, a: float = 0.0,
                b: float = 1.0) -> "RoutingTree":
        """Regular tree over [a, b]^n: each level cuts every box in ``branching`` pieces per axis, keys at centers."""
        n = check_positive_int("dimension n", n)
        depth = check_positive_int("depth", depth)
        per_axis = tuple(branching) if isinstance(branching, (list, tuple)) else (branching,) * n
        if len(per_axis) != n:
            raise ValueError(f"branching must give one value per axis ({n}), got {len(per_axis)}")
        per_axis = tuple(check_positive_int("branching per axis", p) for p in per_axis)
        if not (math.isfinite(a) and math.isfinite(b)) or not a < b:
            raise ValueError(f"the box needs finite a < b, got a={a}, b={b}; swap or fix them")
        big_b = math.prod(per_axis)
        if big_b < 2:
            raise ValueError(f"branching must split at least one axis (product >= 2), got {per_axis}")
        if big_b**depth > _MAX_LEAVES:
            raise ValueError(f"{big_b}**{depth} = {big_b**depth} leaves is more than {_MAX_LEAVES}; "
                             "lower depth or branching")
        keys = [(lo.reshape(-1, big_b, n) + size / 2).to(torch.float32) for lo, size in _boxes(per_axis, a, b, depth)]
        return cls(keys, kind="regular", bounds=(float(a), float(b)), axis_branching=per_axis)

    @classmethod
    def from_data(cls, x: Any, depth: int, branching: int = 4, iters: int = 25, seed: int = 0) -> "RoutingTree":
        """Recursive k-means tree, Lloyd in every node of a level at once (a node short of points repeats keys)."""
        depth = check_positive_int("depth", depth)
        big_b = check_positive_int("branching", branching)
        if big_b < 2:
            raise ValueError(f"branching must be >= 2, got {branching}")
        iters = check_positive_int("iters", iters)
        pts = _as_points(x).to(torch.float32)
        leaves, n = big_b**depth, pts.shape[1]
        if leaves > _MAX_LEAVES:
            raise ValueError(f"{big_b}**{depth} = {leaves} leaves is too many; lower depth or branching")
        if len(pts) < leaves:
            raise ValueError(f"k-means tree with branching={big_b}, depth={depth} has {leaves} leaves but got only "
                             f"{len(pts)} points; give at least one point per leaf or lower depth/branching")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        node = torch.zeros(len(pts), dtype=torch.long, device=pts.device)
        parent_keys = pts.mean(0, keepdim=True)  # [1, n] where the root "is"
        keys, j = [], torch.arange(big_b, device=pts.device)
        for level in range(depth):
            nodes = big_b**level
            # initial keys: big_b random member points of every node (repeated when too few)
            priority = torch.rand(len(pts), generator=gen).to(pts.device)
            order = torch.argsort(node.to(torch.float64) + priority.to(torch.float64))
            counts = torch.bincount(node, minlength=nodes)
            pos = (torch.cumsum(counts, 0) - counts)[:, None] + j[None, :] % counts.clamp(min=1)[:, None]
            k = pts[order[pos.clamp(max=len(pts) - 1)]]  # [nodes, B, n]
            empty = counts == 0  # an empty node keeps its own location for every child
            k[empty] = parent_keys[empty][:, None, :].expand(-1, big_b, n)
            for _ in range(iters):  # Lloyd: every key moves to the mean of its points (an empty cluster stays)
                cluster = node * big_b + _nearest(pts, k, node)
                sums = torch.zeros(nodes * big_b, n, dtype=pts.dtype, device=pts.device).index_add_(0, cluster, pts)
                size = torch.bincount(cluster, minlength=nodes * big_b).to(pts.dtype)[:, None]
                new_k = torch.where(size > 0, sums / size.clamp(min=1), k.reshape(-1, n)).reshape(nodes, big_b, n)
                if torch.equal(new_k, k):
                    break
                k = new_k
            keys.append(k)
            node = node * big_b + _nearest(pts, k, node)
            parent_keys = k.reshape(-1, n)
        return cls([k.cpu() for k in keys], kind="kmeans")

    def __repr__(self) -> str:
        extra = f", bounds={self.bounds}, axis_branching={self.axis_branching}" if self.bounds else ""
        return (f"RoutingTree(kind={self.kind!r}, n={self.n}, depth={self.depth}, "
                f"branching={self.branching}, leaves={self.num_leaves}{extra})")

    def _keys_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._device_keys:
            self._device_keys[device] = [k.to(device) for k in self.keys]
        return self._device_keys[device]

    def route(self, x: Any, return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Leaf id ``[N]`` of every point of ``x [N, n]``; with ``return_path`` also the ``[N, depth]`` children."""
        pts = _as_points(x, self.n)
        leaf = torch.zeros(len(pts), dtype=torch.long, device=pts.device)
        path = leaf.new_zeros((len(pts), self.depth))
        chunk = max(1, _ROUTE_BLOCK // (self.branching * self.n))
        for s in range(0, len(pts), chunk):
            exact, node = pts[s : s + chunk], leaf[s : s + chunk]  # node: a view, updated in place
            for level, k in enumerate(self._keys_on(pts.device)):
                child = _nearest(exact, k, node)
                path[s : s + chunk, level] = child
                node.mul_(self.branching).add_(child)
        return (leaf, path) if return_path else leaf

    def route_flat(self, x: Any) -> torch.Tensor:
        """Brute force: the nearest of all ``num_leaves`` leaf keys (equals :meth:`route` for a regular tree)."""
        pts = _as_points(x, self.n)
        leaf_keys = self._keys_on(pts.device)[-1].reshape(-1, self.n)
        chunk = max(1, _ROUTE_BLOCK // self.num_leaves)
        exact = "donot_use_mm_for_euclid_dist"
        return torch.cat([torch.cdist(p.float(), leaf_keys, compute_mode=exact).argmin(1) for p in pts.split(chunk)])

    def leaf_counts(self, x: Any) -> torch.Tensor:
        """How many points of ``x`` land in each leaf (``[num_leaves]``)."""
        return torch.bincount(self.route(x), minlength=self.num_leaves)

    def leaf_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes of a regular tree's leaves: ``(lo, hi)``, each ``[num_leaves, n]``, in leaf order."""
        if self.kind != "regular" or self.bounds is None or self.axis_branching is None:
            raise ValueError(f"leaf_cells() needs a regular tree (kind={self.kind!r}); use leaf_map() for any 2-D tree")
        lo, size = _boxes(self.axis_branching, *self.bounds, self.depth)[-1]
        return lo, lo + size

    def leaf_map(self, resolution: int = 200,
                 bounds: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route a raster over a 2-D box: ``(xs, ys, leaf_ids)``, ``leaf_ids[i, j]`` the leaf of ``(xs[j], ys[i])``."""
        if self.n != 2:
            raise ValueError(f"leaf_map() draws 2-D trees only; this tree has n={self.n}")
        resolution = check_positive_int("resolution", resolution)
        a, b = bounds or self.bounds or (0.0, 1.0)
        xs = torch.linspace(a, b, resolution)
        gy, gx = torch.meshgrid(xs, xs, indexing="ij")
        ids = self.route(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).reshape(resolution, resolution)
        return xs, xs.clone(), ids

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able metadata from which :meth:`from_state_dict` rebuilds the tree."""
        return {"kind": self.kind, "bounds": list(self.bounds) if self.bounds else None,
                "axis_branching": list(self.axis_branching) if self.axis_branching else None,
                "keys": [k.clone() for k in self.keys], "n": self.n}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RoutingTree":
        bounds = tuple(state["bounds"]) if state.get("bounds") else None
        axis = tuple(state["axis_branching"]) if state.get("axis_branching") else None
        return cls(list(state["keys"]), kind=state.get("kind", "custom"), bounds=bounds,  # type: ignore[arg-type]
                   axis_branching=axis, n=state.get("n"))


def _boxes(per_axis: tuple[int, ...], a: float, b: float, depth: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Lower corners ``[B**l, n]`` and side lengths ``[n]`` of the boxes of levels 1..depth of [a, b]^n."""
    n, pieces = len(per_axis), torch.tensor(per_axis, dtype=torch.float64)
    mesh = torch.meshgrid(*[torch.arange(p, dtype=torch.float64) for p in per_axis], indexing="ij")
    offsets = torch.stack([m.reshape(-1) for m in mesh], dim=-1)  # [B, n]: child c's index per axis, axis 0 slowest
    lo = torch.full((1, n), float(a), dtype=torch.float64)
    size, out = torch.full((n,), float(b - a), dtype=torch.float64), []
    for _ in range(depth):
        size = size / pieces
        lo = (lo[:, None, :] + offsets[None] * size).reshape(-1, n)
        out.append((lo, size))
    return out


def _nearest(x: torch.Tensor, keys: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """Index ``[N]`` of the nearest child key of each point's node: ``x [N, n]``, ``keys [nodes, B, n]``, ``node [N]``.
    float32 distances; near ties decided again in float64 (from ``x`` itself) by ``d_j - d_b = (k_j - k_b)·(k_j + k_b -
    2x)``, exact 0 on coordinates where the keys agree, however far ``x`` is."""
    d = keys[node].sub_(x.to(torch.float32)[:, None, :]).square_().sum(-1)
    best = d.argmin(1)
    if keys.shape[1] < 2 or len(x) == 0:
        return best
    d_min = d.gather(1, best[:, None])
    rows = torch.nonzero((d <= d_min * (1 + _TIE_RTOL)).sum(1) > 1).flatten()
    if len(rows):
        xe = x[rows].double()[:, None, :]
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
