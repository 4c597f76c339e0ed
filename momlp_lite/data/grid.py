"""The s^n vertices of the regular grid on [a, b]^n with a seeded 80/20 split, and Lipschitz targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..runtime import check_positive_int

__all__ = ["Target", "TARGETS", "get_target", "grid_points", "GridData", "make_grid_data", "leaf_moments"]


@dataclass(frozen=True)
class Target:
    """A Lipschitz f: ``[N, n] -> [N]``; ``lipschitz(n)`` bounds its constant. Taught in: book/momlp_grid_regression."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lipschitz: Callable[[int], float]
    formula: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


WEIERSTRASS_TERMS = 6


def _weierstrass(x: torch.Tensor) -> torch.Tensor:
    # A truncated Weierstrass-type sum: rough at every scale down to 2^-WEIERSTRASS_TERMS.
    k = torch.arange(WEIERSTRASS_TERMS, dtype=x.dtype, device=x.device)
    terms = torch.cos(math.pi * 2.0**k * x[..., None]) / 2.0**k  # [N, n, K]
    return terms.sum(-1).mean(-1)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("distance", lambda x: torch.linalg.vector_norm(x - 0.5, dim=-1), lambda n: 1.0, "‖x − ½·1‖₂"),
        Target("ridge", lambda x: (x.sum(-1) - 0.5 * x.shape[-1]).abs(), math.sqrt, "|Σᵢ xᵢ − n/2|"),
        Target("sine", lambda x: torch.sin(2 * math.pi * x).sum(-1) / x.shape[-1],
               lambda n: 2 * math.pi / math.sqrt(n), "(1/n) Σᵢ sin(2π xᵢ)"),
        Target("weierstrass", _weierstrass, lambda n: math.pi * WEIERSTRASS_TERMS / math.sqrt(n),
               f"(1/n) Σᵢ Σ_{{k<{WEIERSTRASS_TERMS}}} 2⁻ᵏ cos(2ᵏ π xᵢ)"),
    ]
}


def get_target(name: str) -> Target:
    """Return the target called ``name`` (one of ``TARGETS``). Taught in: book/momlp_grid_regression."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}: choose one of {sorted(TARGETS)}") from None


def grid_points(n: int, s: int, a: float = 0.0, b: float = 1.0) -> torch.Tensor:
    """The s^n vertices of the grid on [a, b]^n, last axis fastest. Taught in: book/momlp_grid_regression."""
    check_positive_int("dimension n", n)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"interval ends must be finite, got a={a}, b={b}")
    if not a < b:
        raise ValueError(f"interval must have a < b, got a={a}, b={b}; swap them")
    if not isinstance(s, (int, np.integer)) or s < 2:
        raise ValueError(f"points per axis s must be an integer >= 2, got {s!r}")
    if s**n > 50_000_000:
        raise ValueError(f"s**n = {s**n} grid points is too many; lower s={s} or n={n}")
    axis = torch.linspace(a, b, s)
    return torch.cartesian_prod(*([axis] * n)).reshape(-1, n)


@dataclass
class GridData:
    """Seeded train/test grid samples: ``x_* [N, n]`` float32, ``y_* [N, 1]``. Taught in: book/momlp_grid_regression."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_grid_data(target: str | Target, n: int, s: int, a: float = 0.0, b: float = 1.0,
                   test_fraction: float = 0.2, seed: int = 0) -> GridData:
    """``target`` on the s^n grid over [a, b]^n, split at random (seeded). Taught in: book/momlp_grid_regression."""
    tgt = get_target(target) if isinstance(target, str) else target
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x = grid_points(n, s, a, b)
    y = tgt(x).reshape(-1, 1).to(torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
    n_test = int(round(test_fraction * len(x)))
    if n_test < 1 or n_test >= len(x):
        raise ValueError(f"test_fraction={test_fraction} of {len(x)} points leaves an empty split; raise s")
    test, train = perm[:n_test], perm[n_test:]
    return GridData(x[train], y[train], x[test], y[test])


def leaf_moments(v: torch.Tensor, leaf: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-leaf mean and std ``[L, d]`` of ``v`` (std 1 where ~0 or empty). Taught in: book/momlp_grid_regression."""
    v, leaf = v.double(), torch.as_tensor(leaf).long()
    counts = torch.bincount(leaf, minlength=num_leaves).double()[:, None].clamp(min=1)
    mean = torch.zeros(num_leaves, v.shape[1], dtype=torch.float64).index_add_(0, leaf, v) / counts
    std = (torch.zeros_like(mean).index_add_(0, leaf, (v - mean[leaf]) ** 2) / counts).sqrt()
    return mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()
