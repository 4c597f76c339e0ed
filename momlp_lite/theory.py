"""Theory made visible: a training-free MoMLP that meets a requested sup-norm error, and VC-dimension bounds.

Taught in: book/approximation_rates (the construction) and book/vc_dimension (the bounds).

* :func:`build_interpolating_momlp` (the book's construction, illustrating Kratsios et al.'s theorem): a regular
  routing tree cuts ``[0,1]^n`` into leaf cubes; each leaf's expert is the piecewise-linear interpolant of ``f`` on
  the Kuhn triangulation of ``m^n`` sub-cubes, written exactly as a ReLU network (shifted Courant hats). On a simplex
  the error is at most ``Lip * sqrt(n) * delta / 2`` (Jensen), so ``N >= Lip sqrt(n) / (2 eps)`` cells per axis give
  sup error ``<= eps``. The book's trade-off ``r``: about ``N^r`` sub-cubes per axis per expert (``r = 0``: tiny
  experts; ``r = 1/n``: experts of ``~1/eps`` parameters, the theorem's loaded-parameter rate; ``r = 1``: one expert).
* :func:`momlp_vc_bound`: ``L * max(n L, J W)``, the paper's ``O~(L max{nL, JW})`` with constant 1 and no logs.
  :func:`dense_vc_upper` / :func:`dense_vc_lower`: Bartlett et al. (2019), ``P D log2 P`` and ``P D log2(P / D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np
import torch

from .data import Target, get_target
from .moe.routing import RoutingTree
from .moe.sizes import mlp_parameter_count
from .runtime import check_positive_int

__all__ = [
    "check_eps", "hat_network", "relu_network_forward", "hat_parameter_count", "courant_hat", "ConstructionPlan",
    "plan_construction", "InterpolatingMoMLP", "build_interpolating_momlp", "cells_per_axis_for", "sup_error",
    "dense_test_points", "loglog_slope", "momlp_vc_bound", "dense_vc_upper", "dense_vc_lower",
    "momlp_total_parameters", "kink_target",
]

_MAX_GRID_VERTICES = 20_000_000
_EVAL_BLOCK = 1 << 22  # elements of one [points, vertices, n] block


# ---------------------------------------------------------------------------------------------- validation
def check_eps(eps: float) -> float:
    """Return ``eps`` as a float after checking ``0 < eps < 1``. Taught in: book/approximation_rates."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    value = float(eps)
    if not (0.0 < value < 1.0):
        raise ValueError(f"eps must be in (0, 1), got {eps!r}; pass e.g. eps=0.05")
    return value


def _check_positive_ints(**values: int) -> None:
    """Raise ``ValueError`` naming the first value that is not an integer >= 1."""
    for name, value in values.items():
        check_positive_int(name, value)


# ---------------------------------------------------------------------------------------------- the hat as ReLU layers
def courant_hat(y: torch.Tensor) -> torch.Tensor:
    """Courant hat of the Kuhn triangulation of ``Z^n``: ``relu(1 - max(0, y) + min(0, y))`` over the last axis.

    It is 1 at the origin, 0 at every other integer point, and linear on every Kuhn simplex.
    Taught in: book/approximation_rates."""
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    big = torch.maximum(y.amax(-1), zero)
    small = torch.minimum(y.amin(-1), zero)
    return torch.relu(1.0 - big + small)


def hat_network(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Courant hat on ``R^n`` as an explicit ReLU network: a list of ``(W, b)`` layers.

    All layers but the last are followed by ReLU; the last is linear with one output. Construction:
    the first layer computes ``relu(1 - z_i + z_j)`` for the ``n (n+1)`` ordered pairs ``i != j`` of
    ``z = (0, y_1, ..., y_n)`` (so their minimum is ``relu(1 - max z + min z)``); the following layers take
    pairwise minima of non-negative numbers with ``min(a, b) = relu(a) - relu(a - b)``.
    Taught in: book/approximation_rates."""
    _check_positive_ints(n=n)
    pairs = [(i, j) for i in range(n + 1) for j in range(n + 1) if i != j]
    w1 = np.zeros((len(pairs), n))
    for row, (i, j) in enumerate(pairs):  # 1 - z_i + z_j, with z_0 = 0
        if i:
            w1[row, i - 1] -= 1.0
        if j:
            w1[row, j - 1] += 1.0
    layers = [(w1, np.ones(len(pairs)))]
    # Each current value is a linear form (a row) over the units of the last layer; all values are >= 0.
    forms = np.eye(len(pairs))
    while len(forms) > 1:
        rows, new_forms = [], []
        for k in range(0, len(forms) - 1, 2):
            a, b = forms[k], forms[k + 1]
            rows += [a, a - b]  # relu(a) = a, relu(a - b): min(a, b) = a - relu(a - b)
            new_forms.append((len(rows) - 2, len(rows) - 1, -1.0))
        if len(forms) % 2:
            rows.append(forms[-1])  # relu(c) = c for c >= 0: pass it on
            new_forms.append((len(rows) - 1, None, 0.0))
        layers.append((np.stack(rows), np.zeros(len(rows))))
        forms = np.zeros((len(new_forms), len(rows)))
        for idx, (p, q, sign) in enumerate(new_forms):
            forms[idx, p] = 1.0
            if q is not None:
                forms[idx, q] = sign
    layers.append((forms, np.zeros(1)))
    return layers


def relu_network_forward(layers: Sequence[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """Run ``(W, b)`` layers on ``x`` (``[N, in]``): ReLU after every layer but the last.
    Taught in: book/approximation_rates."""
    h = np.asarray(x, dtype=np.float64)
    for k, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def hat_parameter_count(n: int) -> int:
    """Parameters one vertex adds to an expert: non-zero weights plus biases of the hidden hat layers, plus the
    non-zero output weights (which carry ``f(v)``). The expert's single output bias is counted separately.
    Taught in: book/approximation_rates."""
    layers = hat_network(n)
    hidden = sum(int(np.count_nonzero(w)) + len(b) for w, b in layers[:-1])
    return hidden + int(np.count_nonzero(layers[-1][0]))


# ---------------------------------------------------------------------------------------------- the construction
def cells_per_axis_for(lipschitz: float, n: int, eps: float) -> int:
    """Smallest ``N`` with ``lipschitz * sqrt(n) / (2 N) <= eps``: sub-cubes per axis that guarantee sup error ``eps``.
    Taught in: book/approximation_rates."""
    _check_positive_ints(n=n)
    eps = check_eps(eps)
    if not (math.isfinite(lipschitz) and lipschitz >= 0):
        raise ValueError(f"lipschitz must be a finite number >= 0, got {lipschitz!r}")
    return max(1, math.ceil(lipschitz * math.sqrt(n) / (2 * eps) - 1e-12))


@dataclass(frozen=True)
class ConstructionPlan:
    """Sizes of the construction for one ``(f, n, eps, r)``, computed without building anything.

    ``depth`` levels of a regular tree with 2 pieces per axis (``2^n`` children per node) and ``sub_cells = m``
    sub-cubes per axis inside each leaf: ``N = 2^depth * m`` cells per axis in all.
    Taught in: book/approximation_rates."""

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
    def vertices_per_expert(self) -> int:
        return (self.sub_cells + 1) ** self.n

    @property
    def error_bound(self) -> float:
        """Guaranteed sup error ``Lip * sqrt(n) / (2 N)`` (at most ``eps``)."""
        return self.lipschitz * math.sqrt(self.n) / (2 * self.cells_per_axis)

    @property
    def expert_parameter_count(self) -> int:
        """One expert: ``(m+1)^n`` hat units (see :func:`hat_parameter_count`) plus one output bias."""
        return self.vertices_per_expert * hat_parameter_count(self.n) + 1

    @property
    def routing_path_parameter_count(self) -> int:
        """Keys read while routing one point: ``depth * 2^n * n`` (as ``RoutingTree.path_parameter_count``)."""
        return self.depth * 2**self.n * self.n

    @property
    def routing_parameter_count(self) -> int:
        """All keys of the tree: ``n * sum_{l=1..depth} 2^(n l)`` (as ``RoutingTree.parameter_count``)."""
        return self.n * sum(2 ** (self.n * level) for level in range(1, self.depth + 1))

    @property
    def loaded_parameter_count(self) -> int:
        """Parameters read by one forward pass: one expert plus the keys along the routing path."""
        return self.expert_parameter_count + self.routing_path_parameter_count

    @property
    def total_parameter_count(self) -> int:
        """All experts plus every key of the tree."""
        return self.num_experts * self.expert_parameter_count + self.routing_parameter_count

    def summary(self) -> dict[str, float]:
        """The numbers the approximation chapter plots."""
        return dict(
            n=self.n, eps=self.eps, r=self.r, depth=self.depth, sub_cells=self.sub_cells,
            cells_per_axis=self.cells_per_axis, experts=self.num_experts, error_bound=self.error_bound,
            expert_params=self.expert_parameter_count, loaded_params=self.loaded_parameter_count,
            total_params=self.total_parameter_count,
        )


def plan_construction(lipschitz: float, n: int, eps: float, r: float = 0.0) -> ConstructionPlan:
    """Choose tree depth and sub-cubes per leaf for sup error ``<= eps`` (see :func:`build_interpolating_momlp`).

    With ``N`` the cells per axis that ``eps`` needs (:func:`cells_per_axis_for`), the depth is ``floor`` or
    ``ceil`` of ``(1 - r) log2 N`` (at least 1), whichever makes ``m = ceil(N / 2^depth)`` closest to ``N^r``.
    Taught in: book/approximation_rates."""
    _check_positive_ints(n=n)
    eps = check_eps(eps)
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0.0 <= float(r) <= 1.0:
        raise ValueError(f"r must be a number in [0, 1], got {r!r}")
    needed = cells_per_axis_for(lipschitz, n, eps)
    share = (1.0 - float(r)) * math.log2(needed)
    best: tuple[float, int, int] | None = None
    for depth in sorted({max(1, math.floor(share + 1e-9)), max(1, math.ceil(share - 1e-9))}, reverse=True):
        m = max(1, math.ceil(needed / 2**depth))
        miss = abs(math.log(m) - float(r) * math.log(needed))
        if best is None or miss < best[0] - 1e-12:
            best = (miss, depth, m)
    assert best is not None
    return ConstructionPlan(int(n), eps, float(r), float(lipschitz), best[1], best[2])


@dataclass
class InterpolatingMoMLP:
    """A training-free MoMLP on ``[0,1]^n``: a regular routing tree and one exact ReLU interpolant per leaf.

    Build it with :func:`build_interpolating_momlp`. Calling it on ``[P, n]`` points routes each point to
    one leaf and runs only that leaf's expert. Sizes live in :attr:`plan`. Taught in: book/approximation_rates.
    """

    plan: ConstructionPlan
    tree: RoutingTree
    grid_values: torch.Tensor  # f at the (N+1)^n global sub-grid vertices, float64, shape (N+1,)*n
    target: Target

    @property
    def n(self) -> int:
        return self.plan.n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[P]`` (float64) for points ``x`` of shape ``[P, n]`` in ``[0,1]^n``."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"x must have shape [P, {self.n}], got {tuple(x.shape)}")
        leaf = self.tree.route(x.to(torch.float32))
        x64 = x.to(torch.float64)
        m, n, big_n = self.plan.sub_cells, self.n, self.plan.cells_per_axis
        offsets = torch.tensor(list(product(range(m + 1), repeat=n)), dtype=torch.long)  # [K, n]
        strides = torch.tensor([(big_n + 1) ** (n - 1 - i) for i in range(n)], dtype=torch.long)
        flat_values = self.grid_values.reshape(-1)
        corner = self._leaf_corners()[leaf] * m  # [P, n]: lower corner of each point's leaf, in sub-grid units
        out = torch.empty(len(x64), dtype=torch.float64)
        chunk = max(1, _EVAL_BLOCK // (len(offsets) * n))
        for s in range(0, len(x64), chunk):
            verts = corner[s : s + chunk, None, :] + offsets[None]  # [p, K, n] global vertex indices
            y = x64[s : s + chunk, None, :] * big_n - verts  # (x - v) / delta
            values = flat_values[(verts * strides).sum(-1)]  # f(v): the expert's output weights
            out[s : s + chunk] = (courant_hat(y) * values).sum(-1)
        return out

    def _leaf_corners(self) -> torch.Tensor:
        """Integer lower corner of every leaf cube in units of the leaf side ``h`` (``[num_leaves, n]``)."""
        if not hasattr(self, "_corners"):
            lo, _ = self.tree.leaf_cells()
            self._corners = torch.round(lo * 2**self.tree.depth).to(torch.long)
        return self._corners


def build_interpolating_momlp(
    target: str | Target,
    n: int,
    eps: float,
    r: float = 0.0,
    lipschitz: float | None = None,
) -> InterpolatingMoMLP:
    """Build the training-free MoMLP whose sup error on ``[0,1]^n`` is guaranteed ``<= eps``.

    Parameters
    ----------
    target : str or Target
        A Lipschitz target (``momlp_lite.data.TARGETS`` or :func:`kink_target`).
    n : int
        Input dimension (``>= 1``).
    eps : float
        Requested sup-norm error, in ``(0, 1)``.
    r : float
        Trade-off in ``[0, 1]``: each expert gets about ``N^r`` sub-cubes per axis, where ``N`` is the number
        of cells per axis that ``eps`` needs. ``0``: many constant-size experts; ``1/n``: experts of about
        ``1/eps`` parameters; ``1``: one large expert per half-cube (depth-1 tree).
    lipschitz : float, optional
        Lipschitz constant to use (default: ``target.lipschitz(n)``). Taught in: book/approximation_rates.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    _check_positive_ints(n=n)
    plan = plan_construction(float(tgt.lipschitz(n) if lipschitz is None else lipschitz), n, eps, r)
    big_n = plan.cells_per_axis
    if (big_n + 1) ** n > _MAX_GRID_VERTICES:
        raise ValueError(
            f"eps={eps} needs {big_n} cells per axis in n={n}: {(big_n + 1) ** n} grid vertices is too many; raise eps"
        )
    tree = RoutingTree.regular(n, plan.depth, branching=2)
    axis = torch.arange(big_n + 1, dtype=torch.float64) / big_n
    mesh = torch.meshgrid(*([axis] * n), indexing="ij")
    vertices = torch.stack([g.reshape(-1) for g in mesh], dim=-1)
    step = max(1, _EVAL_BLOCK // (8 * n))  # targets may expand each point (e.g. Weierstrass terms)
    values = torch.cat(
        [tgt(vertices[s : s + step]).to(torch.float64).reshape(-1) for s in range(0, len(vertices), step)]
    )
    return InterpolatingMoMLP(plan, tree, values.reshape((big_n + 1,) * n), tgt)


# ---------------------------------------------------------------------------------------------- measuring
def dense_test_points(n: int, per_axis: int, random_points: int = 0, seed: int = 0) -> torch.Tensor:
    """A dense float64 test set on ``[0,1]^n``: a regular grid with ``per_axis`` points per axis (choose it so
    that it is *not* aligned with the interpolation grid) plus ``random_points`` uniform points.
    Taught in: book/approximation_rates."""
    _check_positive_ints(n=n, per_axis=per_axis)
    axis = torch.linspace(0.0, 1.0, per_axis, dtype=torch.float64)
    mesh = torch.meshgrid(*([axis] * n), indexing="ij")
    pts = torch.stack([g.reshape(-1) for g in mesh], dim=-1)
    if random_points:
        gen = torch.Generator().manual_seed(int(seed))
        pts = torch.cat([pts, torch.rand(int(random_points), n, generator=gen, dtype=torch.float64)])
    return pts


def sup_error(model, target: str | Target, x: torch.Tensor) -> float:
    """``max |model(x) - f(x)|`` over the points ``x`` (``[P, n]``), computed in float64.
    Taught in: book/approximation_rates."""
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
    """Kratsios et al.'s MoMLP bound ``O~(L * max{n L, J W})`` with the hidden constant set to 1 and log factors dropped.

    ``n``: input dimension, ``L``: number of experts, ``J``: expert depth, ``W``: expert width.
    Taught in: book/vc_dimension."""
    _check_positive_ints(n=n, L=L, J=J, W=W)
    return int(L) * max(int(n) * int(L), int(J) * int(W))


def _check_dense(num_params: int, num_layers: int) -> None:
    _check_positive_ints(num_params=num_params, num_layers=num_layers)
    if num_params < 2:
        raise ValueError(f"num_params must be >= 2 for a logarithm > 0, got {num_params}")


def dense_vc_upper(num_params: int, num_layers: int) -> float:
    """Bartlett et al. (2019) upper bound ``O(P D log P)`` for piecewise-linear nets, constant 1: ``P * D * log2(P)``.
    Taught in: book/vc_dimension."""
    _check_dense(num_params, num_layers)
    return float(num_params * num_layers * math.log2(num_params))


def dense_vc_lower(num_params: int, num_layers: int) -> float:
    """Bartlett et al. (2019) lower bound ``Omega(P D log(P / D))``, constant 1: ``P * D * log2(P / D)``.
    Taught in: book/vc_dimension."""
    _check_dense(num_params, num_layers)
    if num_layers >= num_params:
        raise ValueError(f"num_layers ({num_layers}) must be < num_params ({num_params}) for the lower bound")
    return float(num_params * num_layers * math.log2(num_params / num_layers))


def momlp_total_parameters(n: int, L: int, J: int, W: int, prelu: bool = True) -> int:
    """Parameters of ``L`` experts ``n -> W (x J hidden layers) -> 1`` (PReLU slopes included by default).
    Taught in: book/vc_dimension."""
    _check_positive_ints(n=n, L=L, J=J, W=W)
    return int(L) * mlp_parameter_count(int(n), int(W), int(J), 1, prelu=prelu)


def kink_target(c: float = 1 / math.pi) -> Target:
    """``f(x) = |x - c 1|_2``: Lipschitz constant 1, not differentiable at ``c 1``. The default ``c = 1/pi`` is on no
    dyadic grid, so the kink never sits on an interpolation vertex (unlike ``TARGETS['distance']`` at ``c = 1/2``).
    Taught in: book/approximation_rates."""
    if not (isinstance(c, (int, float)) and math.isfinite(c)):
        raise ValueError(f"c must be a finite number, got {c!r}")
    return Target(
        "kink",
        lambda x: torch.linalg.vector_norm(x - c, dim=-1),
        lambda n: 1.0,
        f"‖x − {c:.3g}·1‖₂",
    )
