"""Data: the regular grid on [a, b]^n with its seeded 80/20 split, Lipschitz targets, and image datasets.

Kratsios et al. sample the s^n vertices of the regular grid on [a, b]^n and draw a random
80% (train + validation) / 20% (test) split for each run; this module does exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


__all__ = [
    "Target",
    "TARGETS",
    "get_target",
    "grid_points",
    "GridData",
    "make_grid_data",
    "leaf_moments",
]


@dataclass(frozen=True)
class Target:
    """A Lipschitz target function f: R^n -> R.

    Attributes
    ----------
    name : str
        Short key used in ``TARGETS``.
    fn : callable
        Maps a ``[N, n]`` tensor to a ``[N]`` tensor.
    lipschitz : callable
        ``lipschitz(n)`` returns a Lipschitz constant (w.r.t. the Euclidean norm) in dimension n.
    formula : str
        The formula, for captions.
    Taught in: book/momlp_grid_regression.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lipschitz: Callable[[int], float]
    formula: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _distance(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x - 0.5, dim=-1)


def _ridge(x: torch.Tensor) -> torch.Tensor:
    return (x.sum(-1) - 0.5 * x.shape[-1]).abs()


def _sine(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x).sum(-1) / x.shape[-1]


WEIERSTRASS_TERMS = 6


def _weierstrass(x: torch.Tensor) -> torch.Tensor:
    # A truncated Weierstrass-type sum: rough at every scale down to 2^-WEIERSTRASS_TERMS.
    k = torch.arange(WEIERSTRASS_TERMS, dtype=x.dtype, device=x.device)
    terms = torch.cos(math.pi * 2.0**k * x[..., None]) / 2.0**k  # [N, n, K]
    return terms.sum(-1).mean(-1)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("distance", _distance, lambda n: 1.0, "‖x − ½·1‖₂"),
        Target("ridge", _ridge, lambda n: math.sqrt(n), "|Σᵢ xᵢ − n/2|"),
        Target("sine", _sine, lambda n: 2 * math.pi / math.sqrt(n), "(1/n) Σᵢ sin(2π xᵢ)"),
        Target(
            "weierstrass",
            _weierstrass,
            lambda n: math.pi * WEIERSTRASS_TERMS / math.sqrt(n),
            f"(1/n) Σᵢ Σ_{{k<{WEIERSTRASS_TERMS}}} 2⁻ᵏ cos(2ᵏ π xᵢ)",
        ),
    ]
}


def get_target(name: str) -> Target:
    """Return the target called ``name`` (one of ``TARGETS``). Taught in: book/momlp_grid_regression."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}: choose one of {sorted(TARGETS)}") from None


def _check_box(n: int, a: float, b: float) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"dimension n must be an integer >= 1, got {n!r}")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"interval ends must be finite, got a={a}, b={b}")
    if not a < b:
        raise ValueError(f"interval must have a < b, got a={a}, b={b}; swap them")


def grid_points(n: int, s: int, a: float = 0.0, b: float = 1.0) -> torch.Tensor:
    """The s^n vertices of the regular grid on [a, b]^n, as a ``[s**n, n]`` float32 tensor.

    Rows are in lexicographic order (last coordinate fastest).
    Taught in: book/momlp_grid_regression.
    """
    _check_box(n, a, b)
    if not isinstance(s, (int, np.integer)) or s < 2:
        raise ValueError(f"points per axis s must be an integer >= 2, got {s!r}")
    if s**n > 50_000_000:
        raise ValueError(f"s**n = {s**n} grid points is too many; lower s={s} or n={n}")
    axis = torch.linspace(a, b, s)
    mesh = torch.meshgrid(*([axis] * n), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


@dataclass
class GridData:
    """A seeded train/test split of grid samples ``(x, f(x))``.

    ``x_*`` are ``[N, n]`` float32 tensors and ``y_*`` are ``[N, 1]``.
    Taught in: book/momlp_grid_regression.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    target: Target
    n: int
    s: int
    a: float
    b: float

    @property
    def num_points(self) -> int:
        return len(self.x_train) + len(self.x_test)


def make_grid_data(
    target: str | Target,
    n: int,
    s: int,
    a: float = 0.0,
    b: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> GridData:
    """Sample ``target`` on the s^n grid over [a, b]^n and split it at random (seeded).

    The test set holds ``round(test_fraction * s**n)`` points; the rest is for training
    (and validation, which the trainer carves out of it).
    Taught in: book/momlp_grid_regression.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x = grid_points(n, s, a, b)
    y = tgt(x).reshape(-1, 1).to(torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(x), generator=gen)
    n_test = int(round(test_fraction * len(x)))
    if n_test < 1 or n_test >= len(x):
        raise ValueError(
            f"test_fraction={test_fraction} of {len(x)} points leaves an empty split; raise s"
        )
    test, train = perm[:n_test], perm[n_test:]
    return GridData(x[train], y[train], x[test], y[test], tgt, int(n), int(s), float(a), float(b))


def leaf_moments(v: torch.Tensor, leaf: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``v [N, d]`` per leaf, ``[L, d]`` each (std 1 where ~0 or undefined).

    For training every expert on its leaf's standardized data. Taught in: book/momlp_grid_regression.
    """
    v, leaf = v.double(), torch.as_tensor(leaf).long()
    counts = torch.bincount(leaf, minlength=num_leaves).double()[:, None].clamp(min=1)
    mean = torch.zeros(num_leaves, v.shape[1], dtype=torch.float64).index_add_(0, leaf, v) / counts
    std = (torch.zeros_like(mean).index_add_(0, leaf, (v - mean[leaf]) ** 2) / counts).sqrt()
    return mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()
