"""Parameter counts of MLPs and the dense width that matches a budget. Taught in: book/momlp_grid_regression."""

from __future__ import annotations

import bisect

from ..runtime import check_positive_int, check_positive_ints

__all__ = ["mlp_parameter_count", "dense_width_for_parameters"]


def mlp_parameter_count(n_in: int, width: int, hidden_layers: int, n_out: int = 1, prelu: bool = False,
                        batchnorm: bool = False) -> int:
    """Parameters of an MLP with biases (and PReLU slopes, BatchNorm affine). Taught in: book/momlp_grid_regression."""
    check_positive_ints(n_in=n_in, width=width, hidden_layers=hidden_layers, n_out=n_out)
    count = (n_in + 1) * width + (hidden_layers - 1) * (width + 1) * width + (width + 1) * n_out
    return count + (hidden_layers if prelu else 0) + (2 * width * hidden_layers if batchnorm else 0)


def dense_width_for_parameters(budget: int, n_in: int, hidden_layers: int, n_out: int = 1, prelu: bool = False,
                               batchnorm: bool = False) -> int:
    """Largest width (at least 1) whose MLP has at most ``budget`` parameters. Taught in: book/momlp_grid_regression."""
    # the count grows with the width (mlp_parameter_count checks the sizes): bisect for how many widths 1, 2, ... fit
    fits = bisect.bisect_right(range(1, check_positive_int("budget", budget) + 1), budget,
                               key=lambda w: mlp_parameter_count(n_in, w, hidden_layers, n_out, prelu, batchnorm))
    return max(1, fits)
