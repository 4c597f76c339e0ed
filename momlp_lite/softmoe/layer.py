"""Soft MoE (Puigcerver et al.) with batched experts, and best expert subset selection (Chung et al.)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_ints

__all__ = ["SoftMoE", "NORMALIZATIONS", "expert_subset", "softmoe_flops"]

NORMALIZATIONS = ("tokens", "logits", "none")
SUBSET_MODES = ("best", "random")
EPS = 1e-6  # added to every L2 norm, as in the authors' code


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


class SoftMoE(nn.Module):
    """Soft MoE on ``X [B, m, d]``: router ``Φ [d, n·p]``, ``n`` ReLU experts ``d → h → d``, ``p`` slots each.

    ``normalize``: ``"tokens"`` (the authors': normalized tokens feed logits and slots), ``"logits"`` (vmoe: logits
    only), ``"none"`` (Definition 1); ``phi_init``: ``normal`` ``N(0, 1/d)`` or ``uniform`` ``U[-1, 1]`` (the
    authors' MNIST code). Taught in: book/softmoe_one_expert."""

    def __init__(self, dim: int, num_experts: int, hidden: int, *, slots_per_expert: int = 1,
                 normalize: str = "logits", bias: bool = False, phi_init: str = "normal",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_ints(dim=dim, num_experts=num_experts, hidden=hidden, slots_per_expert=slots_per_expert)
        _check_choice("normalize", normalize, NORMALIZATIONS)
        _check_choice("phi_init", phi_init, ("normal", "uniform"))
        self.dim, self.num_experts, self.hidden, self.slots_per_expert = dim, num_experts, hidden, slots_per_expert
        self.normalize, self.phi_init = normalize, phi_init
        self.phi = nn.Parameter(torch.empty(dim, num_experts * slots_per_expert))
        self.scale = nn.Parameter(torch.ones(())) if normalize != "none" else None
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.subset: tuple[int, str, torch.Generator | None] | None = None  # (k, mode, generator): see expert_subset
        with torch.no_grad():
            if phi_init == "normal":
                self.phi.normal_(0.0, 1.0 / math.sqrt(dim), generator=generator)
            else:
                self.phi.uniform_(-1.0, 1.0, generator=generator)
            for w, b, fan_in in ((self.w1, self.b1, dim), (self.w2, self.b2, hidden)):
                bound = 1.0 / math.sqrt(fan_in)
                w.uniform_(-bound, bound, generator=generator)
                if b is not None:
                    b.uniform_(-bound, bound, generator=generator)

    @property
    def expert_parameter_count(self) -> int:
        """Parameters in all experts together (``Φ`` and the scale not included)."""
        return self.num_experts * (2 * self.dim * self.hidden + (self.hidden + self.dim if self.b1 is not None else 0))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, D, C)``: the tokens the slots mix (normalized for ``"tokens"``), ``D`` and ``C [B, m, n·p]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SoftMoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"SoftMoE expects input of shape [batch, tokens, {self.dim}] (tokens >= 1), "
                             f"got {list(x.shape)}")
        if x.dtype != self.phi.dtype:
            raise ValueError(f"SoftMoE expects {self.phi.dtype} tokens (its parameters' dtype), got {x.dtype}; "
                             f"convert with x.to({self.phi.dtype}) or the layer with .to(dtype)")
        phi, keys = self.phi, x
        if self.normalize != "none":
            keys = x / (x.norm(dim=-1, keepdim=True) + EPS)
            phi = self.scale * (phi / (phi.norm(dim=0, keepdim=True) + EPS))
        tokens = keys if self.normalize == "tokens" else x
        logits = keys @ phi
        return tokens, logits.softmax(dim=1), logits.softmax(dim=2)

    def dispatch_combine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch ``D`` and combine ``C``, both ``[B, m, n·p]``."""
        return self.route(x)[1:]

    def expert_mass(self, x: torch.Tensor, combine: torch.Tensor | None = None) -> torch.Tensor:
        """Combine mass of every expert, summed over tokens and its slots: ``[B, n]`` (rows sum to ``m``)."""
        combine = self.route(x)[2] if combine is None else combine
        return combine.reshape(*combine.shape[:2], self.num_experts, self.slots_per_expert).sum(dim=(1, 3))

    def _mlp(self, xs: torch.Tensor, experts: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Run ``experts`` (default all) on ``xs [E, rows, d]``, one ``bmm`` per layer."""
        w1, w2 = self.w1[experts], self.w2[experts]
        h = torch.bmm(xs, w1) if self.b1 is None else torch.baddbmm(self.b1[experts].unsqueeze(1), xs, w1)
        h = F.relu(h)
        return torch.bmm(h, w2) if self.b2 is None else torch.baddbmm(self.b2[experts].unsqueeze(1), h, w2)

    def experts_forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot outputs ``Ỹ`` for slot inputs ``X̃ [B, n·p, d]``: expert ``j`` reads its ``p`` slots."""
        b = slots.shape[0]
        n, p, d = self.num_experts, self.slots_per_expert, self.dim
        if slots.shape[1:] != (n * p, d):
            raise ValueError(f"slots must have shape [batch, {n * p}, {d}], got {list(slots.shape)}")
        out = self._mlp(slots.reshape(b, n, p, d).transpose(0, 1).reshape(n, b * p, d))  # expert-major
        return out.reshape(n, b, p, d).transpose(0, 1).reshape(b, n * p, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Y = C(X) · Ỹ(X)`` ``[B, m, d]``; inside :func:`expert_subset` only ``k`` experts run."""
        if self.subset is not None:
            return self.forward_subset(x, *self.subset)
        tokens, dispatch, combine = self.route(x)
        return combine @ self.experts_forward(dispatch.transpose(1, 2) @ tokens)

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an integer with 1 <= k <= num_experts = {self.num_experts}, got {k!r}")

    def select_experts(self, x: torch.Tensor, k: int, mode: str = "best", generator: torch.Generator | None = None,
                       combine: torch.Tensor | None = None) -> torch.Tensor:
        """Ascending indices ``[B, k]`` of the kept experts: ``best``, the ``k`` of **largest** combine mass
        (Algorithm 1), or ``random``, ``k`` uniformly without replacement per input."""
        self._check_k(k)
        _check_choice("mode", mode, SUBSET_MODES)
        combine = self.route(x)[2] if combine is None else combine
        if mode == "best":
            chosen = self.expert_mass(x, combine).topk(k, dim=1).indices
        else:
            noise = torch.rand(combine.shape[0], self.num_experts, generator=generator, device="cpu")
            chosen = noise.to(combine.device).argsort(dim=1)[:, :k]
        return chosen.sort(dim=1).values

    def forward_subset(self, x: torch.Tensor, k: int, mode: str = "best", generator: torch.Generator | None = None,
                       chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 2 as in the authors' code: only the ``k`` kept experts (or ``chosen [B, k]``) run, in one
        ``bmm`` over the pairs grouped by expert; the others output zero; the **unnormalized** ``C`` combines."""
        tokens, dispatch, combine = self.route(x)
        b, m, d = x.shape
        p = self.slots_per_expert
        if chosen is None:
            chosen = self.select_experts(x, k, mode, generator, combine=combine)
        else:
            self._check_k(k)
            if chosen.shape != (b, k):
                raise ValueError(f"chosen must have shape [{b}, {k}], got {list(chosen.shape)}")
        slot_idx = (chosen.unsqueeze(-1) * p + torch.arange(p, device=x.device)).reshape(b, 1, k * p)
        slot_idx = slot_idx.expand(b, m, k * p)
        d_sel, c_sel = dispatch.gather(2, slot_idx), combine.gather(2, slot_idx)  # [B, m, k·p]
        slots = (d_sel.transpose(1, 2) @ tokens).reshape(b * k, p, d)
        # group the pairs by expert: pair i goes to row position[i] of its expert's block group[i]
        used, group, counts = torch.unique(chosen.reshape(-1), return_inverse=True, return_counts=True)
        order = torch.argsort(group, stable=True)
        position = torch.empty_like(group)
        starts = (counts.cumsum(0) - counts).repeat_interleave(counts)  # of each pair's block, in sorted order
        position[order] = torch.arange(len(group), device=x.device) - starts
        buf = slots.new_zeros(len(used), int(counts.max()), p, d).index_put((group, position), slots)
        out = self._mlp(buf.reshape(len(used), -1, d), used).reshape(buf.shape)
        return c_sel @ out[group, position].reshape(b, k * p, d)


@contextlib.contextmanager
def expert_subset(model: nn.Module, k: int | Sequence[int | None] | None, mode: str = "best",
                  generator: torch.Generator | None = None) -> Iterator[list[SoftMoE]]:
    """In the block, ``model``'s Soft MoE layers keep ``k`` experts per input (one ``k`` per layer or for all;
    ``None``: all); yields the layers. Taught in: book/softmoe_best_subset."""
    layers = [mod for mod in model.modules() if isinstance(mod, SoftMoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SoftMoE layer to select experts in")
    per_layer = list(k) if isinstance(k, Sequence) else [k] * len(layers)
    if len(per_layer) != len(layers):
        raise ValueError(f"got {len(per_layer)} values of k for {len(layers)} SoftMoE layers; give one per layer")
    _check_choice("mode", mode, SUBSET_MODES)
    for layer, kk in zip(layers, per_layer):
        if kk is not None:
            layer._check_k(kk)
    before = [layer.subset for layer in layers]
    try:
        for layer, kk in zip(layers, per_layer):
            layer.subset = None if kk is None else (kk, mode, generator)
        yield layers
    finally:
        for layer, old in zip(layers, before):
            layer.subset = old


def softmoe_flops(batch: int, tokens: int, dim: int, num_experts: int, hidden: int, slots_per_expert: int = 1,
                  k: int | None = None) -> dict[str, int]:
    """Multiply-add FLOPs of a forward pass by part, ``k`` experts kept. Taught in: book/softmoe_best_subset."""
    k = num_experts if k is None else k
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..{num_experts}, got {k}")
    mix = 2 * batch * tokens * dim * k * slots_per_expert
    out = {"router": 2 * batch * tokens * dim * num_experts * slots_per_expert, "dispatch": mix,
           "experts": 2 * batch * k * slots_per_expert * 2 * dim * hidden, "combine": mix}
    return {**out, "total": sum(out.values())}
