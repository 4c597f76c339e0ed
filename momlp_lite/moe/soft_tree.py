"""A learned soft routing tree over stacked leaf experts (fast feedforward style).

Belcak & Wattenhofer's fast feedforward networks put leaf MLPs under a *learned* binary tree: node
``i`` holds a hyperplane ``(w_i, b_i)`` and sends an input to its right child with probability
``σ(w_i·x + b_i)``. During training the tree is **soft**: every leaf gets the product of the
probabilities along its path, and the output is the probability-weighted sum of all leaves. At
inference it is **hard**: the input descends by the sign of ``w_i·x + b_i`` and only the one leaf
it reaches runs (``depth`` node evaluations plus one expert). A *hardening* penalty, the entropy of
the leaf distribution, drives the node probabilities to 0 or 1 so that the two modes agree.

Nodes are numbered level by level (heap order): level ``l`` holds nodes ``2**l - 1 .. 2**(l+1) - 2``
and child ``c`` (0 left, 1 right) of the ``j``-th node of a level is the ``2 j + c``-th node of the
next, the same numbering as :class:`momlp_lite.moe.routing.RoutingTree`. Leaves are the experts of
one :class:`momlp_lite.moe.experts.StackedMLP`; every hot path loops over the ``depth`` levels
only, never over nodes or leaves.

The entropy penalty and its weight are the book's reading of the paper's hardening loss (labeled
so in the chapter). Taught in: book/routing_families.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from .experts import StackedMLP

__all__ = ["SoftTreeMoE", "binary_entropy_from_logits"]

_MAX_DEPTH = 16


def binary_entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a coin that shows 1 with probability ``σ(z)``, computed stably from ``z``.

    ``H = σ(z)·softplus(-z) + (1 - σ(z))·softplus(z)``. Taught in: book/routing_families.
    """
    c = torch.sigmoid(z)
    return c * F.softplus(-z) + (1 - c) * F.softplus(z)


class SoftTreeMoE(nn.Module):
    """A learned binary tree of depth ``depth`` over ``2**depth`` leaf MLP experts.

    Training mode (``.train()``): soft routing, ``y = Σ_leaf p_leaf(x) · f_leaf(x)`` with all leaves
    run at once by the stacked experts. Eval mode (``.eval()``): hard routing, exactly one leaf per
    input (``y = f_{leaf(x)}(x)``). After each forward ``last_aux`` holds ``"hardening"`` (the mean
    entropy of the leaf distribution, a scalar tensor to add to the loss), ``"expert_load"`` (share
    of the inputs, or of the soft probability mass, taken by each leaf, ``[2**depth]``) and
    ``"dropped"`` (always 0.0: no capacity limit).

    Parameters
    ----------
    n_in, n_out : int
        Input and output dimension.
    depth : int
        Levels of decision nodes (``2**depth - 1`` nodes, ``2**depth`` leaves); 1 to 16.
    width, hidden_layers : int
        Every leaf expert is ``n_in -> width (x hidden_layers) -> n_out`` with learnable PReLU.
    generator : torch.Generator, optional
        Seeds the initialization of the nodes and the experts.

    Examples
    --------
    >>> tree = SoftTreeMoE(2, 1, depth=3, width=8, hidden_layers=2)
    >>> tree(torch.zeros(5, 2)).shape
    torch.Size([5, 1])
    >>> tree.eval().hard_leaf(torch.zeros(5, 2)).shape
    torch.Size([5])

    Taught in: book/routing_families.
    """

    def __init__(self, n_in: int, n_out: int, depth: int, width: int, hidden_layers: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_in = check_positive_int("n_in", n_in)
        self.n_out = check_positive_int("n_out", n_out)
        self.depth = check_positive_int("depth", depth)
        if self.depth > _MAX_DEPTH:
            raise ValueError(f"depth must be <= {_MAX_DEPTH} (2**depth leaves), got {depth}; lower it")
        nodes = 2**self.depth - 1
        bound = self.n_in**-0.5  # nn.Linear's initialization, one hyperplane per node
        w = torch.empty(nodes, self.n_in).uniform_(-bound, bound, generator=generator)
        b = torch.empty(nodes).uniform_(-bound, bound, generator=generator)
        self.node_weight = nn.Parameter(w)
        self.node_bias = nn.Parameter(b)
        self.experts = StackedMLP(2**self.depth, self.n_in, width, hidden_layers, self.n_out, generator=generator)
        self.last_aux: dict[str, torch.Tensor | float] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def num_leaves(self) -> int:
        """Number of leaf experts, ``2**depth``."""
        return 2**self.depth

    @property
    def params_total(self) -> int:
        """All trainable parameters: the nodes' hyperplanes and every leaf expert."""
        return self.node_weight.numel() + self.node_bias.numel() + self.num_leaves * self.experts.parameters_per_expert

    @property
    def params_active(self) -> int:
        """Parameters one input touches at inference: ``depth`` hyperplanes and one leaf expert."""
        return self.depth * (self.n_in + 1) + self.experts.parameters_per_expert

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, depth={self.depth}, leaves={self.num_leaves}"

    # ------------------------------------------------------------------ routing
    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.n_in:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SoftTreeMoE expects x of shape [N, {self.n_in}], got {got}")

    def node_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``w_i·x + b_i`` for every input and node: ``[N, 2**depth - 1]`` (one matmul)."""
        self._check(x)
        return torch.addmm(self.node_bias, x, self.node_weight.T)

    def route_soft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf probabilities ``[N, 2**depth]`` (rows sum to 1) and each input's leaf entropy ``[N]``.

        The entropy is summed node by node (chain rule: ``H(leaf) = Σ_nodes P(reach node)·H(node)``),
        so it costs one pass down the levels and never forms ``log p_leaf``.
        """
        z = self.node_logits(x)
        reach = x.new_ones(len(x), 1)
        entropy = x.new_zeros(len(x))
        for level in range(self.depth):  # a loop over levels, not nodes
            zl = z[:, 2**level - 1 : 2 ** (level + 1) - 1]  # [N, 2**level]
            right = torch.sigmoid(zl)
            entropy = entropy + (reach * binary_entropy_from_logits(zl)).sum(1)
            reach = torch.stack([reach * (1 - right), reach * right], dim=2).reshape(len(x), -1)
        return reach, entropy

    def hard_leaf(self, x: torch.Tensor) -> torch.Tensor:
        """The one leaf each input reaches by the sign of its node logits: ``[N]`` long ids.

        A zero logit goes left. Costs ``depth`` dot products per input.
        """
        self._check(x)
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for level in range(self.depth):
            idx = 2**level - 1 + node
            z = (x * self.node_weight[idx]).sum(1) + self.node_bias[idx]
            node = 2 * node + (z > 0).long()
        return node

    # ------------------------------------------------------------------ forward
    def forward_soft(self, x: torch.Tensor) -> torch.Tensor:
        """Training-time output ``Σ_leaf p_leaf(x)·f_leaf(x)``: ``[N, n_out]``; sets ``last_aux``."""
        probs, entropy = self.route_soft(x)
        y = self.experts(x)  # [L, N, n_out]: every leaf on every input, one batched matmul per layer
        self.last_aux = {"hardening": entropy.mean(), "expert_load": probs.detach().mean(0), "dropped": 0.0}
        return torch.einsum("nl,lno->no", probs, y)

    def forward_hard(self, x: torch.Tensor) -> torch.Tensor:
        """Inference output: each input through the one leaf it reaches, ``[N, n_out]``; sets ``last_aux``."""
        leaf = self.hard_leaf(x)
        load = torch.bincount(leaf, minlength=self.num_leaves).to(x.dtype) / max(len(x), 1)
        self.last_aux = {"hardening": x.new_zeros(()), "expert_load": load, "dropped": 0.0}
        return self.experts.forward_routed(x, leaf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft routing in training mode, hard routing (one leaf per input) in eval mode."""
        return self.forward_soft(x) if self.training else self.forward_hard(x)

    @torch.no_grad()
    def hard_leaf_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Soft probability of the leaf that hard routing picks, per input ``[N]`` (1 = fully hardened)."""
        probs, _ = self.route_soft(x)
        return probs.gather(1, self.hard_leaf(x)[:, None]).squeeze(1)
