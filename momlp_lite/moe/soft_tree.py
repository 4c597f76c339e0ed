"""A learned soft binary routing tree over stacked leaf experts (Belcak & Wattenhofer's fast feedforward networks).
Heap-ordered nodes as in ``RoutingTree``. Taught in: book/routing_families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from .experts import StackedMLP

__all__ = ["SoftTreeMoE"]


class SoftTreeMoE(nn.Module):
    """A learned binary tree of ``depth`` levels of hyperplanes ``(w_i, b_i)`` over ``2**depth`` PReLU leaf experts.

    Node ``i`` sends ``x`` right with probability ``σ(w_i·x + b_i)``; training: ``y = Σ_leaf p_leaf(x) f_leaf(x)``;
    eval: the one leaf the signs reach. ``last_aux``: ``hardening`` (mean node entropy, a loss term), ``expert_load``
    ``[2**depth]``, ``dropped`` (0.0). Taught in: book/routing_families."""

    def __init__(self, n_in: int, n_out: int, depth: int, width: int, hidden_layers: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_in = check_positive_int("n_in", n_in)
        self.n_out = check_positive_int("n_out", n_out)
        self.depth = check_positive_int("depth", depth)
        if self.depth > 16:
            raise ValueError(f"depth must be <= 16 (2**depth leaves), got {depth}; lower it")
        self.num_leaves = 2**self.depth
        nodes, bound = self.num_leaves - 1, self.n_in**-0.5  # nn.Linear's initialization, one hyperplane per node
        self.node_weight = nn.Parameter(torch.empty(nodes, self.n_in).uniform_(-bound, bound, generator=generator))
        self.node_bias = nn.Parameter(torch.empty(nodes).uniform_(-bound, bound, generator=generator))
        self.experts = StackedMLP(self.num_leaves, self.n_in, width, hidden_layers, self.n_out, generator=generator)
        self.last_aux: dict[str, torch.Tensor | float] = {}

    @property
    def params_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def params_active(self) -> int:
        """Parameters one input touches at inference: ``depth`` hyperplanes and one leaf expert."""
        return self.depth * (self.n_in + 1) + self.experts.parameters_per_expert

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.n_in:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SoftTreeMoE expects x of shape [N, {self.n_in}], got {got}")

    def route_soft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf probabilities ``[N, 2**depth]`` and each input's leaf entropy ``[N]``, summed node by node."""
        self._check(x)
        z = torch.addmm(self.node_bias, x, self.node_weight.T)
        reach = x.new_ones(len(x), 1)
        entropy = x.new_zeros(len(x))
        for level in range(self.depth):  # chain rule: H(leaf) = Σ_nodes P(reach node) · H(node)
            zl = z[:, 2**level - 1 : 2 ** (level + 1) - 1]  # [N, 2**level]
            right = torch.sigmoid(zl)
            c = torch.sigmoid(zl)  # the node's entropy in nats, stably (its own sigmoid: gradients round as before)
            entropy = entropy + (reach * (c * F.softplus(-zl) + (1 - c) * F.softplus(zl))).sum(1)
            reach = torch.stack([reach * (1 - right), reach * right], dim=2).reshape(len(x), -1)
        return reach, entropy

    def hard_leaf(self, x: torch.Tensor) -> torch.Tensor:
        """The one leaf each input reaches by the signs of its node logits (zero goes left): ``[N]`` long ids."""
        self._check(x)
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for level in range(self.depth):
            idx = 2**level - 1 + node
            z = (x * self.node_weight[idx]).sum(1) + self.node_bias[idx]
            node = 2 * node + (z > 0).long()
        return node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft routing over all leaves in training mode, one leaf per input in eval mode; sets ``last_aux``."""
        if self.training:
            probs, entropy = self.route_soft(x)
            self.last_aux = {"hardening": entropy.mean(), "expert_load": probs.detach().mean(0), "dropped": 0.0}
            return torch.einsum("nl,lno->no", probs, self.experts(x))  # every leaf on every input, batched
        leaf = self.hard_leaf(x)
        load = torch.bincount(leaf, minlength=self.num_leaves).to(x.dtype) / max(len(x), 1)
        self.last_aux = {"hardening": x.new_zeros(()), "expert_load": load, "dropped": 0.0}
        return self.experts.forward_routed(x, leaf)

    @torch.no_grad()
    def hard_leaf_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Soft probability of the leaf that hard routing picks, per input ``[N]`` (1 = fully hardened)."""
        probs, _ = self.route_soft(x)
        return probs.gather(1, self.hard_leaf(x)[:, None]).squeeze(1)
