"""Parameter counts of MLPs and the dense width that matches a parameter budget."""

from __future__ import annotations

import math

__all__ = ["mlp_parameter_count", "dense_width_for_parameters"]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def mlp_parameter_count(
    n_in: int,
    width: int,
    hidden_layers: int,
    n_out: int = 1,
    prelu: bool = False,
    batchnorm: bool = False,
) -> int:
    """Parameters of an MLP ``n_in → width (× hidden_layers) → n_out`` with biases.

    ``prelu`` adds one learnable slope per hidden layer; ``batchnorm`` adds a scale and a shift
    per hidden unit (running statistics are buffers, not parameters).
    """
    _check_sizes(n_in=n_in, width=width, hidden_layers=hidden_layers, n_out=n_out)
    count = (n_in + 1) * width + (hidden_layers - 1) * (width + 1) * width + (width + 1) * n_out
    if prelu:
        count += hidden_layers
    if batchnorm:
        count += 2 * width * hidden_layers
    return count


def dense_width_for_parameters(
    budget: int,
    n_in: int,
    hidden_layers: int,
    n_out: int = 1,
    prelu: bool = False,
    batchnorm: bool = False,
) -> int:
    """Largest width whose MLP has at most ``budget`` parameters (at least 1).

    Used for the equal-parameter dense baseline: one MLP as large as all experts together.
    """
    _check_sizes(budget=budget, n_in=n_in, hidden_layers=hidden_layers, n_out=n_out)

    def count(w: int) -> int:
        return mlp_parameter_count(n_in, w, hidden_layers, n_out, prelu, batchnorm)

    # Solve the quadratic for a first guess, then step to the exact answer.
    a = hidden_layers - 1
    b = n_in + 1 + (hidden_layers - 1) + n_out + (2 * hidden_layers if batchnorm else 0)
    c = n_out + (hidden_layers if prelu else 0) - budget
    guess = (-c / b) if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    w = max(1, int(guess))
    while w > 1 and count(w) > budget:
        w -= 1
    while count(w + 1) <= budget:
        w += 1
    return w
