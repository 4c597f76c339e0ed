"""A training-free MoMLP that meets a requested sup-norm error (book/approximation_rates), and VC-dimension bounds
(book/vc_dimension)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from .data import Target, get_target
from .moe.routing import RoutingTree
from .moe.sizes import mlp_parameter_count
from .runtime import check_positive_ints

__all__ = [
    "hat_network", "relu_network_forward", "hat_parameter_count", "courant_hat", "ConstructionPlan",
    "plan_construction", "InterpolatingMoMLP", "build_interpolating_momlp", "cells_per_axis_for", "sup_error",
    "dense_test_points", "loglog_slope", "momlp_vc_bound", "dense_vc_upper", "dense_vc_lower",
    "momlp_total_parameters", "kink_target",
]

_MAX_GRID_VERTICES = 20_000_000
_EVAL_BLOCK = 1 << 22  # elements of one [points, vertices, n] block


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}; pass e.g. eps=0.05")
    return float(eps)


def _grid(axis: torch.Tensor, n: int) -> torch.Tensor:
    """All points of ``axis^n`` as ``[len(axis)^n, n]``, the last coordinate varying fastest."""
    return torch.cartesian_prod(*[axis] * n).reshape(-1, n)


# ---------------------------------------------------------------------------------------------- the hat as ReLU layers
def courant_hat(y: torch.Tensor) -> torch.Tensor:
    """Courant hat of Kuhn's triangulation: ``relu(1 - max(0, y) + min(0, y))``. Taught in: book/approximation_rates."""
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    return torch.relu(1.0 - torch.maximum(y.amax(-1), zero) + torch.minimum(y.amin(-1), zero))


def hat_network(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Courant hat as ``(W, b)`` layers, ReLU after all but the last. Taught in: book/approximation_rates."""
    check_positive_ints(n=n)
    z = np.vstack([np.zeros(n), np.eye(n)])  # z = (0, y_1, ..., y_n) as rows over y
    w1 = np.stack([z[j] - z[i] for i in range(n + 1) for j in range(n + 1) if i != j])
    layers = [(w1, np.ones(len(w1)))]
    forms = np.eye(len(w1))  # each current value (>= 0) as a linear form over the last layer's units
    while len(forms) > 1:
        half = len(forms) // 2
        a, b = forms[0 : 2 * half : 2], forms[1 : 2 * half : 2]
        rows = np.vstack([np.stack([a, a - b], 1).reshape(2 * half, -1), forms[2 * half :]])  # odd one: relu(c) = c
        layers.append((rows, np.zeros(len(rows))))
        eye = np.eye(len(rows))
        forms = eye[0::2] - np.vstack([eye[1::2], np.zeros((len(forms) % 2, len(rows)))])  # relu(a) - relu(a - b)
    layers.append((forms, np.zeros(1)))
    return layers


def relu_network_forward(layers: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Run ``(W, b)`` layers on ``x [N, in]``, ReLU after all but the last. Taught in: book/approximation_rates."""
    h = np.asarray(x, dtype=np.float64)
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def hat_parameter_count(n: int) -> int:
    """Parameters one vertex adds to an expert: non-zero weights and biases of the hidden hat layers plus the non-zero
    output weights (the expert's one output bias is counted apart). Taught in: book/approximation_rates."""
    layers = hat_network(n)
    hidden = sum(int(np.count_nonzero(w)) + len(b) for w, b in layers[:-1])
    return hidden + int(np.count_nonzero(layers[-1][0]))


# ---------------------------------------------------------------------------------------------- the construction
def cells_per_axis_for(lipschitz: float, n: int, eps: float) -> int:
    """Smallest ``N`` (cells per axis) with ``lipschitz sqrt(n) / (2N) <= eps``. Taught in: book/approximation_rates."""
    check_positive_ints(n=n)
    eps = _check_eps(eps)
    if not (math.isfinite(lipschitz) and lipschitz >= 0):
        raise ValueError(f"lipschitz must be a finite number >= 0, got {lipschitz!r}")
    return max(1, math.ceil(lipschitz * math.sqrt(n) / (2 * eps) - 1e-12))


@dataclass(frozen=True)
class ConstructionPlan:
    """Sizes of the construction for one ``(f, n, eps, r)``: a regular tree of ``depth`` levels, ``sub_cells`` sub-cubes
    per axis in each leaf. Taught in: book/approximation_rates."""

    n: int
    eps: float
    r: float
    lipschitz: float
    depth: int
    sub_cells: int

    @property
    def cells_per_axis(self) -> int:
        return 2**self.depth * self.sub_cells

    @property
    def num_experts(self) -> int:
        return 2 ** (self.n * self.depth)

    @property
    def error_bound(self) -> float:
        """Guaranteed sup error (at most ``eps``)."""
        return self.lipschitz * math.sqrt(self.n) / (2 * self.cells_per_axis)

    @property
    def expert_parameter_count(self) -> int:
        """``(m+1)^n`` hat units plus one output bias."""
        return (self.sub_cells + 1) ** self.n * hat_parameter_count(self.n) + 1

    @property
    def loaded_parameter_count(self) -> int:
        """Read by one forward pass: one expert plus the keys along the routing path."""
        return self.expert_parameter_count + self.depth * 2**self.n * self.n

    @property
    def total_parameter_count(self) -> int:
        routing = self.n * sum(2 ** (self.n * level) for level in range(1, self.depth + 1))
        return self.num_experts * self.expert_parameter_count + routing

    def summary(self) -> dict[str, float]:
        """The numbers the approximation chapter plots."""
        return dict(n=self.n, eps=self.eps, r=self.r, depth=self.depth, sub_cells=self.sub_cells,
                    cells_per_axis=self.cells_per_axis, experts=self.num_experts, error_bound=self.error_bound,
                    expert_params=self.expert_parameter_count, loaded_params=self.loaded_parameter_count,
                    total_params=self.total_parameter_count)


def plan_construction(lipschitz: float, n: int, eps: float, r: float = 0.0) -> ConstructionPlan:
    """Tree depth (``floor`` or ``ceil`` of ``(1 - r) log2 N``) and sub-cubes per leaf (closest to ``N^r``) for sup
    error ``<= eps``. Taught in: book/approximation_rates."""
    needed = cells_per_axis_for(lipschitz, n, eps)
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0.0 <= float(r) <= 1.0:
        raise ValueError(f"r must be a number in [0, 1], got {r!r}")
    share = (1.0 - float(r)) * math.log2(needed)
    best = (math.inf, 0, 0)
    for depth in sorted({max(1, math.floor(share + 1e-9)), max(1, math.ceil(share - 1e-9))}, reverse=True):
        m = max(1, math.ceil(needed / 2**depth))
        miss = abs(math.log(m) - float(r) * math.log(needed))
        if miss < best[0] - 1e-12:
            best = (miss, depth, m)
    return ConstructionPlan(int(n), float(eps), float(r), float(lipschitz), best[1], best[2])


@dataclass
class InterpolatingMoMLP:
    """A training-free MoMLP on ``[0,1]^n``: a regular routing tree and one exact ReLU interpolant per leaf.
    Taught in: book/approximation_rates."""

    plan: ConstructionPlan
    tree: RoutingTree
    grid_values: torch.Tensor  # f at the (N+1)^n global sub-grid vertices, float64, shape (N+1,)*n
    target: Target

    @cached_property
    def _leaf_corners(self) -> torch.Tensor:
        """Integer lower corner of every leaf cube in units of the leaf side (``[num_leaves, n]``)."""
        return torch.round(self.tree.leaf_cells()[0] * 2**self.tree.depth).to(torch.long)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[P]`` (float64) for points ``x`` of shape ``[P, n]`` in ``[0,1]^n``."""
        x = torch.as_tensor(x)
        m, n, big_n = self.plan.sub_cells, self.plan.n, self.plan.cells_per_axis
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"x must have shape [P, {n}], got {tuple(x.shape)}")
        leaf = self.tree.route(x.to(torch.float32))
        x64 = x.to(torch.float64)
        offsets = _grid(torch.arange(m + 1), n)  # [K, n]
        strides = (big_n + 1) ** torch.arange(n - 1, -1, -1)
        flat_values = self.grid_values.reshape(-1)
        corner = self._leaf_corners[leaf] * m  # [P, n]: lower corner of each point's leaf, in sub-grid units
        out = torch.empty(len(x64), dtype=torch.float64)
        chunk = max(1, _EVAL_BLOCK // (len(offsets) * n))
        for s in range(0, len(x64), chunk):
            verts = corner[s : s + chunk, None, :] + offsets[None]  # [p, K, n] global vertex indices
            y = x64[s : s + chunk, None, :] * big_n - verts  # (x - v) / delta
            values = flat_values[(verts * strides).sum(-1)]  # f(v): the expert's output weights
            out[s : s + chunk] = (courant_hat(y) * values).sum(-1)
        return out


def build_interpolating_momlp(
    target: str | Target, n: int, eps: float, r: float = 0.0, lipschitz: float | None = None
) -> InterpolatingMoMLP:
    """The training-free MoMLP with sup error ``<= eps`` on ``[0,1]^n``, each expert about ``N^r`` sub-cubes per axis.
    ``lipschitz`` defaults to ``target.lipschitz(n)``. Taught in: book/approximation_rates."""
    tgt = get_target(target) if isinstance(target, str) else target
    check_positive_ints(n=n)
    plan = plan_construction(float(tgt.lipschitz(n) if lipschitz is None else lipschitz), n, eps, r)
    big_n = plan.cells_per_axis
    if (big_n + 1) ** n > _MAX_GRID_VERTICES:
        raise ValueError(
            f"eps={eps} needs {big_n} cells per axis in n={n}: {(big_n + 1) ** n} grid vertices is too many; raise eps"
        )
    vertices = _grid(torch.arange(big_n + 1, dtype=torch.float64) / big_n, n)
    step = max(1, _EVAL_BLOCK // (8 * n))  # targets may expand each point (e.g. Weierstrass terms)
    values = torch.cat([tgt(vertices[s : s + step]).reshape(-1) for s in range(0, len(vertices), step)])
    tree = RoutingTree.regular(n, plan.depth, branching=2)
    return InterpolatingMoMLP(plan, tree, values.to(torch.float64).reshape((big_n + 1,) * n), tgt)


# ---------------------------------------------------------------------------------------------- measuring
def dense_test_points(n: int, per_axis: int, random_points: int = 0, seed: int = 0) -> torch.Tensor:
    """A float64 grid of ``per_axis`` points per axis on ``[0,1]^n`` (pick it off the interpolation grid) plus
    ``random_points`` uniform points. Taught in: book/approximation_rates."""
    check_positive_ints(n=n, per_axis=per_axis)
    pts = _grid(torch.linspace(0.0, 1.0, per_axis, dtype=torch.float64), n)
    if random_points:
        gen = torch.Generator().manual_seed(int(seed))
        pts = torch.cat([pts, torch.rand(int(random_points), n, generator=gen, dtype=torch.float64)])
    return pts


def sup_error(model, target: str | Target, x: torch.Tensor) -> float:
    """``max |model(x) - f(x)|`` over the points ``x`` (``[P, n]``), in float64. Taught in: book/approximation_rates."""
    tgt = get_target(target) if isinstance(target, str) else target
    x64 = torch.as_tensor(x).to(torch.float64)
    pred = torch.as_tensor(model(x64)).to(torch.float64).reshape(-1)
    return float((pred - tgt(x64).to(torch.float64).reshape(-1)).abs().max())


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``. Taught in: book/approximation_rates."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(lx) < 2 or np.ptp(lx) == 0:
        raise ValueError(f"need at least two distinct x values to fit a slope, got {list(x)}")
    return float(np.polyfit(lx, ly, 1)[0])


# ---------------------------------------------------------------------------------------------- VC dimension
def momlp_vc_bound(n: int, L: int, J: int, W: int) -> int:
    """Kratsios et al.'s ``O~(L max{n L, J W})`` for ``L`` experts of depth ``J`` and width ``W`` on ``R^n``, with
    constant 1 and no log factors. Taught in: book/vc_dimension."""
    check_positive_ints(n=n, L=L, J=J, W=W)
    return int(L) * max(int(n) * int(L), int(J) * int(W))


def _check_dense(num_params: int, num_layers: int) -> None:
    check_positive_ints(num_params=num_params, num_layers=num_layers)
    if num_params < 2:
        raise ValueError(f"num_params must be >= 2 for a logarithm > 0, got {num_params}")


def dense_vc_upper(num_params: int, num_layers: int) -> float:
    """Bartlett et al. (2019) upper bound, constant 1: ``P * D * log2(P)``. Taught in: book/vc_dimension."""
    _check_dense(num_params, num_layers)
    return float(num_params * num_layers * math.log2(num_params))


def dense_vc_lower(num_params: int, num_layers: int) -> float:
    """Bartlett et al. (2019) lower bound, constant 1: ``P * D * log2(P / D)``. Taught in: book/vc_dimension."""
    _check_dense(num_params, num_layers)
    if num_layers >= num_params:
        raise ValueError(f"num_layers ({num_layers}) must be < num_params ({num_params}) for the lower bound")
    return float(num_params * num_layers * math.log2(num_params / num_layers))


def momlp_total_parameters(n: int, L: int, J: int, W: int, prelu: bool = True) -> int:
    """Parameters of ``L`` experts ``n -> W (J hidden layers) -> 1``, PReLU by default. Taught in: book/vc_dimension."""
    check_positive_ints(n=n, L=L, J=J, W=W)
    return int(L) * mlp_parameter_count(int(n), int(W), int(J), 1, prelu=prelu)


def kink_target(c: float = 1 / math.pi) -> Target:
    """``|x - c 1|_2`` (Lipschitz 1); ``c = 1/pi`` is on no dyadic grid vertex. Taught in: book/approximation_rates."""
    if not (isinstance(c, (int, float)) and math.isfinite(c)):
        raise ValueError(f"c must be a finite number, got {c!r}")
    return Target("kink", lambda x: torch.linalg.vector_norm(x - c, dim=-1), lambda n: 1.0, f"‖x − {c:.3g}·1‖₂")
