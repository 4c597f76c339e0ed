"""Soft MoE (Puigcerver et al.) with batched experts, and best expert subset selection (Chung et al.).

Shapes (``B`` batch, ``m`` tokens, ``d`` token dim, ``n`` experts, ``p`` slots per expert, ``k`` kept):
input ``X [B, m, d]``; router ``Φ [d, n·p]`` (column ``j·p + s`` is slot ``s`` of expert ``j``); logits
``[B, m, n·p]``; dispatch ``D`` = softmax over **tokens**, combine ``C`` = softmax over **slots**; slot
inputs ``X̃ = Dᵀ X [B, n·p, d]``; slot outputs ``Ỹ`` (row ``j·p + s`` is ``f_j(X̃_{j·p+s})``); ``Y = C Ỹ``.

Three normalization conventions, named by what is normalized (``normalize=``):

* ``"tokens"`` — the authors' MNIST code (``normalize_moe_input=True``) and bwconrad/soft-moe: every
  token is L2-normalized **before** the layer, so the logits *and the slots* (hence the experts) see
  normalized tokens; the columns of ``Φ`` are L2-normalized and multiplied by a trainable scalar (init 1).
* ``"logits"`` — Google vmoe: tokens and ``Φ`` columns are normalized (same scalar) **for the logits only**;
  the slots mix the raw tokens.
* ``"none"`` — Definition 1 of Chung et al.: logits ``XΦ``, raw tokens into the slots.

The ``n`` expert MLPs ``d → h → d`` are stacked (``w1 [n, d, h]``, ``w2 [n, h, d]``) and run with one
``bmm`` per layer: no Python loop over experts. :meth:`SoftMoE.forward_subset` is the batched best expert
subset selection (the paper's Algorithm 2 as the authors' code does it) and runs only the kept experts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int

__all__ = ["SoftMoE", "SubsetChoice", "NORMALIZATIONS", "softmoe_layers", "set_expert_subset", "expert_subset",
           "softmoe_flops"]

NORMALIZATIONS = ("tokens", "logits", "none")
SUBSET_MODES = ("best", "random")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
EPS = 1e-6  # added to every L2 norm, as in the authors' code


def l2_normalize(a: torch.Tensor, dim: int) -> torch.Tensor:
    """``a / (‖a‖₂ + 1e-6)`` along ``dim``. Taught in: book/softmoe_one_expert."""
    return a / (a.norm(dim=dim, keepdim=True) + EPS)


@dataclass
class SubsetChoice:
    """Which experts a :class:`SoftMoE` layer keeps: ``k``, ``best`` or ``random``. Taught in: book/softmoe_best_subset."""

    k: int
    mode: str = "best"
    generator: torch.Generator | None = None


def _shape(t: torch.Tensor | Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, torch.Tensor) else t)) + "]"


class SoftMoE(nn.Module):
    """A Soft MoE layer whose ``n`` experts are MLPs ``d → h → d`` run as one batched matmul.

    Taught in: book/softmoe_one_expert (the layer, the conventions), book/softmoe_best_subset (subsets).

    Parameters
    ----------
    dim, num_experts, hidden, slots_per_expert : int
        Token dimension ``d``, experts ``n``, expert hidden width ``h``, slots per expert ``p``.
    normalize : str
        ``"tokens"`` (the authors' / bwconrad), ``"logits"`` (vmoe) or ``"none"`` (Definition 1); see the module.
    bias : bool
        Give the experts biases (the authors' MNIST experts have none).
    activation : str
        ``relu`` or ``gelu``.
    phi_init : str
        ``normal``: ``Φ ~ N(0, 1/d)`` (vmoe, bwconrad); ``uniform``: ``U[-1, 1]`` (the authors' MNIST code).
    generator : torch.Generator, optional
        Seeds the initialization.
    """

    def __init__(self, dim: int, num_experts: int, hidden: int, *, slots_per_expert: int = 1,
                 normalize: str = "logits", bias: bool = False, activation: str = "relu",
                 phi_init: str = "normal", generator: torch.Generator | None = None) -> None:
        super().__init__()
        for name, value in dict(dim=dim, num_experts=num_experts, hidden=hidden,
                                slots_per_expert=slots_per_expert).items():
            check_positive_int(name, value)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if phi_init not in ("normal", "uniform"):
            raise ValueError(f"phi_init must be 'normal' or 'uniform', got {phi_init!r}")
        self.dim, self.num_experts, self.hidden, self.slots_per_expert = dim, num_experts, hidden, slots_per_expert
        self.normalize, self.activation, self.phi_init = normalize, activation, phi_init
        self.phi = nn.Parameter(torch.empty(dim, num_experts * slots_per_expert))
        self.scale = nn.Parameter(torch.ones(())) if normalize != "none" else None
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.subset: SubsetChoice | None = None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Φ as chosen by ``phi_init``; expert weights like ``nn.Linear`` (``U(±1/√fan_in)``); scale 1."""
        if self.phi_init == "normal":
            self.phi.normal_(0.0, 1.0 / math.sqrt(self.dim), generator=generator)
        else:
            self.phi.uniform_(-1.0, 1.0, generator=generator)
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound, generator=generator)
            if b is not None:
                b.uniform_(-bound, bound, generator=generator)
        if self.scale is not None:
            self.scale.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, "
                f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize!r}, "
                f"bias={self.b1 is not None}, activation={self.activation!r}")

    @property
    def num_slots(self) -> int:
        """Total number of slots ``n·p``."""
        return self.num_experts * self.slots_per_expert

    @property
    def expert_parameter_count(self) -> int:
        """Parameters in all experts together (``Φ`` and the scale not included)."""
        return self.num_experts * (2 * self.dim * self.hidden + (self.hidden + self.dim if self.b1 is not None else 0))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected and received shapes unless ``x`` is ``[B, m, d]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SoftMoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"SoftMoE expects input of shape [batch, tokens, {self.dim}] (tokens >= 1), got {_shape(x)}")
        if x.dtype != self.phi.dtype:
            raise ValueError(f"SoftMoE expects {self.phi.dtype} tokens (its parameters' dtype), got {x.dtype}; "
                             f"convert with x.to({self.phi.dtype}) or the layer with .to(dtype)")

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, D, C)``: the tokens the slots mix (normalized for ``"tokens"``), dispatch and combine.

        ``D`` (softmax over tokens) and ``C`` (softmax over slots) are ``[B, m, n·p]``.
        """
        self.check_input(x)
        phi, keys = self.phi, x
        if self.normalize != "none":
            keys = l2_normalize(x, -1)
            phi = self.scale * l2_normalize(phi, 0)
        tokens = keys if self.normalize == "tokens" else x
        logits = keys @ phi
        return tokens, logits.softmax(dim=1), logits.softmax(dim=2)

    def dispatch_combine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch ``D`` and combine ``C``, both ``[B, m, n·p]``."""
        return self.route(x)[1:]

    def expert_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Combine mass of every expert, summed over tokens and its slots: ``[B, n]`` (rows sum to ``m``)."""
        return self._mass(self.route(x)[2])

    def _mass(self, combine: torch.Tensor) -> torch.Tensor:
        b, m, _ = combine.shape
        return combine.reshape(b, m, self.num_experts, self.slots_per_expert).sum(dim=(1, 3))

    # ------------------------------------------------------------------ experts
    def _mlp(self, xs: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Run experts on ``xs [E, rows, d]`` (``E`` = all experts, or those listed in ``experts``)."""
        w1, w2, b1, b2 = self.w1, self.w2, self.b1, self.b2
        if experts is not None:
            w1, w2 = w1[experts], w2[experts]
            b1 = b1[experts] if b1 is not None else None
            b2 = b2[experts] if b2 is not None else None
        h = torch.bmm(xs, w1) if b1 is None else torch.baddbmm(b1.unsqueeze(1), xs, w1)
        h = ACTIVATIONS[self.activation](h)
        return torch.bmm(h, w2) if b2 is None else torch.baddbmm(b2.unsqueeze(1), h, w2)

    def experts_forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot outputs ``Ỹ`` for slot inputs ``X̃ [B, n·p, d]``: expert ``j`` reads its ``p`` slots."""
        b = slots.shape[0]
        n, p, d = self.num_experts, self.slots_per_expert, self.dim
        if slots.shape[1:] != (n * p, d):
            raise ValueError(f"slots must have shape [batch, {n * p}, {d}], got {_shape(slots)}")
        out = self._mlp(slots.reshape(b, n, p, d).transpose(0, 1).reshape(n, b * p, d))  # expert-major
        return out.reshape(n, b, p, d).transpose(0, 1).reshape(b, n * p, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Y = C(X) · Ỹ(X)`` ``[B, m, d]``; with a subset set (:func:`set_expert_subset`) only ``k`` experts run."""
        if self.subset is not None:
            s = self.subset
            return self.forward_subset(x, s.k, s.mode, s.generator)
        tokens, dispatch, combine = self.route(x)
        return combine @ self.experts_forward(dispatch.transpose(1, 2) @ tokens)

    # ------------------------------------------------------------------ subsets
    def check_k(self, k: int) -> None:
        """Raise a ``ValueError`` unless ``1 <= k <= num_experts``."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be an integer number of experts in 1..{self.num_experts}, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1 (k = {k} would drop every expert and output zeros); "
                             f"use 1 <= k <= num_experts = {self.num_experts}")
        if k > self.num_experts:
            raise ValueError(f"k = {k} is larger than num_experts = {self.num_experts}; use 1 <= k <= {self.num_experts}")

    def select_experts(self, x: torch.Tensor, k: int, mode: str = "best", generator: torch.Generator | None = None,
                       combine: torch.Tensor | None = None) -> torch.Tensor:
        """Indices ``[B, k]`` (ascending) of the experts kept for every input.

        ``best``: the ``k`` experts with the largest combine mass (Algorithm 1's rule: ``topk``, i.e. **drop the
        n − k smallest**). ``random``: ``k`` experts uniformly without replacement, independently per input.
        """
        self.check_k(k)
        if mode not in SUBSET_MODES:
            raise ValueError(f"mode must be one of {SUBSET_MODES}, got {mode!r}")
        if combine is None:
            combine = self.route(x)[2]
        if mode == "best":
            chosen = self._mass(combine).topk(k, dim=1).indices
        else:
            noise = torch.rand(combine.shape[0], self.num_experts, generator=generator, device="cpu")
            chosen = noise.to(combine.device).argsort(dim=1)[:, :k]
        return chosen.sort(dim=1).values

    def forward_subset(self, x: torch.Tensor, k: int, mode: str = "best", generator: torch.Generator | None = None,
                       chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Batched best (or random) expert subset selection; only the ``k`` kept experts are computed.

        Algorithm 2 of Chung et al. as the authors' code does it: keep the ``k`` experts with the **largest**
        summed combine weight, give the others zero output, combine with the **unnormalized** ``C``.
        ``chosen [B, k]`` overrides the selection. The kept (input, expert) pairs are grouped by expert into one
        buffer ``[experts used, capacity, p, d]`` and run with one ``bmm``.
        """
        tokens, dispatch, combine = self.route(x)
        b, m, d = x.shape
        p = self.slots_per_expert
        if chosen is None:
            chosen = self.select_experts(x, k, mode, generator, combine=combine)
        else:
            self.check_k(k)
            if chosen.shape != (b, k):
                raise ValueError(f"chosen must have shape [{b}, {k}], got {_shape(chosen)}")
        slot_idx = (chosen.unsqueeze(-1) * p + torch.arange(p, device=x.device)).reshape(b, 1, k * p)
        slot_idx = slot_idx.expand(b, m, k * p)
        d_sel, c_sel = dispatch.gather(2, slot_idx), combine.gather(2, slot_idx)  # [B, m, k·p]
        slots = (d_sel.transpose(1, 2) @ tokens).reshape(b, k, p, d)
        return c_sel @ self._run_chosen(slots, chosen).reshape(b, k * p, d)

    def _run_chosen(self, slots: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Run expert ``chosen[b, i]`` on ``slots[b, i]`` for all pairs, grouped by expert (no loop)."""
        b, k, p, d = slots.shape
        flat = chosen.reshape(-1)  # [B·k]
        counts = torch.bincount(flat, minlength=self.num_experts)
        used = torch.nonzero(counts).squeeze(1)  # experts that run at all
        capacity = int(counts.max())
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.long, device=flat.device)
        slot_of[used] = torch.arange(len(used), device=flat.device)
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(flat)
        position[order] = torch.arange(len(flat), device=flat.device) - starts[flat[order]]
        group = slot_of[flat]
        buf = slots.new_zeros(len(used), capacity, p, d).index_put((group, position), slots.reshape(b * k, p, d))
        out = self._mlp(buf.reshape(len(used), capacity * p, d), used).reshape(len(used), capacity, p, d)
        return out[group, position].reshape(b, k, p, d)


def softmoe_layers(model: nn.Module) -> list[SoftMoE]:
    """All :class:`SoftMoE` layers of ``model`` in module order. Taught in: book/softmoe_best_subset."""
    return [mod for mod in model.modules() if isinstance(mod, SoftMoE)]


def set_expert_subset(model: nn.Module, k: int | Sequence[int | None] | None, mode: str = "best",
                      generator: torch.Generator | None = None) -> list[SoftMoE]:
    """Make the Soft MoE layers of ``model`` keep only ``k`` experts per input (per layer, no training).

    ``k`` is one number for every layer, one entry per layer (``None`` = all experts there), or ``None`` to
    switch selection off. Returns the layers in order. Taught in: book/softmoe_best_subset.
    """
    layers = softmoe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SoftMoE layer to select experts in")
    if k is None or isinstance(k, int):
        per_layer: list[int | None] = [k] * len(layers)
    else:
        per_layer = list(k)
        if len(per_layer) != len(layers):
            raise ValueError(f"got {len(per_layer)} values of k for {len(layers)} SoftMoE layers; give one per layer")
    if mode not in SUBSET_MODES:
        raise ValueError(f"mode must be one of {SUBSET_MODES}, got {mode!r}")
    for layer, kk in zip(layers, per_layer):
        if kk is not None:
            layer.check_k(kk)
    for layer, kk in zip(layers, per_layer):
        layer.subset = None if kk is None else SubsetChoice(kk, mode, generator)
    return layers


@contextlib.contextmanager
def expert_subset(model: nn.Module, k: int | Sequence[int | None] | None, mode: str = "best",
                  generator: torch.Generator | None = None) -> Iterator[list[SoftMoE]]:
    """:func:`set_expert_subset` for a ``with`` block; restores the previous choice. Taught in: book/softmoe_best_subset."""
    layers = softmoe_layers(model)
    before = [layer.subset for layer in layers]
    try:
        yield set_expert_subset(model, k, mode, generator)
    finally:
        for layer, old in zip(layers, before):
            layer.subset = old


def softmoe_flops(batch: int, tokens: int, dim: int, num_experts: int, hidden: int, slots_per_expert: int = 1,
                  k: int | None = None) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, by part, with ``k`` experts kept (default all).

    ``router`` ``XΦ``; ``dispatch`` ``DᵀX`` and ``combine`` ``CỸ`` for the kept slots; ``experts`` the kept
    experts. Softmaxes, norms and activations are not counted. Taught in: book/softmoe_best_subset.
    """
    k = num_experts if k is None else k
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..{num_experts}, got {k}")
    slots_all, slots_kept = num_experts * slots_per_expert, k * slots_per_expert
    out = {"router": 2 * batch * tokens * dim * slots_all, "dispatch": 2 * batch * tokens * dim * slots_kept,
           "experts": 2 * batch * slots_kept * 2 * dim * hidden, "combine": 2 * batch * tokens * dim * slots_kept}
    out["total"] = sum(out.values())
    return out
