"""Learned routers over stacked experts: noisy top-k, load balancing, router z-loss, capacity, expert choice.
``T`` tokens, ``N`` experts, router logits ``[T, N]``. Taught in: book/learned_gates and book/moe_transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int, check_positive_ints
from .experts import StackedMLP

__all__ = ["top_k_gate", "load_balancing_loss", "router_z_loss", "expert_capacity", "assign_slots",
           "expert_choice", "TokenChoiceMoE", "ExpertChoiceMoE"]


def _check_k(k: int, num_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (experts per token), got {k!r}; use 1 <= k <= {num_experts}")
    if k > num_experts:
        raise ValueError(f"k = {k} is larger than num_experts = {num_experts}; use 1 <= k <= {num_experts}")
    return k


def _check_capacity_factor(capacity_factor: float | None, none_drops_nothing: bool = True) -> float | None:
    if capacity_factor is None and none_drops_nothing:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        hint = ", or None for no dropping" if none_drops_nothing else "; None (no dropping) is for token choice only"
        raise ValueError(f"capacity_factor must be a number > 0, got {capacity_factor!r}; use e.g. 1.25{hint}")
    return float(capacity_factor)


def _router_float(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: the router runs in full precision even under bf16 (Switch)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _router_probs(logits: torch.Tensor) -> torch.Tensor:
    """The softmax over experts of finite ``[T, N]`` logits, in at least float32."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router logits must have shape [tokens, experts] with tokens >= 1, got {shape}")
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"router logits contain {int(bad.sum())} NaN/inf values (tokens {rows}...); check the "
                         "input tokens for NaN, lower the learning rate, or add the router z-loss")
    return _router_float(logits).softmax(dim=-1)


def top_k_gate(logits: torch.Tensor, k: int, renormalize: bool | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax gate keeping each token's ``k`` largest experts: ``(weights [T, k], index [T, k], probs [T, N])``.

    ``index`` decreasing; ``renormalize`` (default ``k > 1``): kept weights sum to 1. Taught in: book/learned_gates."""
    probs = _router_probs(logits)
    _check_k(k, logits.shape[1])
    top, index = probs.topk(k, dim=-1)
    if renormalize if renormalize is not None else k > 1:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), index, probs


def load_balancing_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch's ``N Σᵢ fᵢ Pᵢ`` (first-choice share, mean probability). Taught in: book/learned_gates."""
    num_tokens, num_experts = probs.shape
    f = torch.bincount(index[:, 0], minlength=num_experts).to(probs.dtype) / num_tokens
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_t (log Σᵢ exp logits[t, i])²``. Taught in: book/learned_gates."""
    return torch.logsumexp(_router_float(logits), dim=-1).pow(2).mean()


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1) -> int:
    """Tokens an expert may take: ``⌈capacity_factor · k · T / N⌉``. Taught in: book/learned_gates."""
    check_positive_ints(num_tokens=num_tokens, num_experts=num_experts)
    _check_k(k, num_experts)
    cf = _check_capacity_factor(capacity_factor, none_drops_nothing=False)
    return max(1, math.ceil(cf * k * num_tokens / num_experts - 1e-9))


def assign_slots(index: torch.Tensor, num_experts: int, capacity: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each assignment's slot in its expert's buffer, and which fit: ``(position [T, k], keep [T, k], capacity)``.

    Priority: all first choices in token order, then all second choices, ... (GShard). ``capacity=None`` drops
    nothing and returns the busiest expert's load as the capacity. Taught in: book/learned_gates."""
    t, k = index.shape
    onehot = F.one_hot(index.T.reshape(-1), num_experts)  # [k·T, N], choice-major priority
    position = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=1).reshape(k, t).T
    if capacity is None:
        capacity = int(onehot.sum(dim=0).max())
    return position, position < capacity, capacity


def expert_choice(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zhou et al.'s expert choice: each expert takes the ``c = min(capacity, T)`` tokens it scores highest.

    Returns ``(weights [N, c], tokens [N, c], probs [T, N])``, softmax over experts. Taught in: book/learned_gates."""
    probs = _router_probs(logits)
    check_positive_int("capacity", capacity)
    weights, tokens = probs.T.topk(min(capacity, logits.shape[0]), dim=1)
    return weights.to(logits.dtype), tokens, probs


class _RoutedLayer(nn.Module):
    """Shared parts: a bias-free linear router and ``N`` stacked MLP experts."""

    def __init__(self, n_in: int, n_out: int, num_experts: int, width: int, hidden_layers: int,
                 generator: torch.Generator | None, prelu: bool) -> None:
        super().__init__()
        self.n_in = check_positive_int("n_in", n_in)
        self.n_out = check_positive_int("n_out", n_out)
        self.num_experts = check_positive_int("num_experts", num_experts)
        std = (0.1 / n_in) ** 0.5  # Switch's router init: truncated normal, std sqrt(0.1 / fan_in)
        router = torch.empty(n_in, num_experts).normal_(0.0, std, generator=generator)
        self.router = nn.Parameter(router.clamp_(-2 * std, 2 * std))
        self.experts = StackedMLP(num_experts, n_in, width, hidden_layers, n_out, prelu=prelu, generator=generator)
        self.last_aux: dict[str, torch.Tensor | float] = {}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean router logits ``x W_g`` ``[T, N]``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.n_in or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects tokens of shape [T, {self.n_in}] with T >= 1, got "
                             f"{shape}; flatten a [batch, tokens, dim] input with x.reshape(-1, dim)")
        return x @ self.router

    @property
    def params_total(self) -> int:
        """All parameters: router plus every expert."""
        return sum(p.numel() for p in self.parameters())


class TokenChoiceMoE(_RoutedLayer):
    """Top-k learned gate over stacked MLP experts (Shazeer 2017, Switch, GShard).

    ``noisy``: trained noise ``ε · softplus(x W_noise)``; ``capacity_factor``: at most ``expert_capacity(T, N, cf, k)``
    tokens per expert, the rest output zero (``None``: no dropping). ``last_aux``: ``load_balancing``, ``z_loss``,
    ``expert_load`` ``[N]``, ``dropped``, ``logits``. Taught in: book/learned_gates, book/moe_transformer."""

    def __init__(self, n_in: int, n_out: int, num_experts: int, width: int, hidden_layers: int, k: int = 1,
                 capacity_factor: float | None = None, noisy: bool = False,
                 generator: torch.Generator | None = None, *, prelu: bool = True) -> None:
        super().__init__(n_in, n_out, num_experts, width, hidden_layers, generator, prelu)
        self.k = _check_k(k, num_experts)
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        self.noise = nn.Parameter(torch.zeros(n_in, num_experts)) if noisy else None  # Shazeer: W_noise = 0

    @property
    def params_active(self) -> int:
        """Parameters one token touches: the router plus ``k`` experts."""
        return self.params_total - (self.num_experts - self.k) * self.experts.parameters_per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, n_in] -> [T, n_out]``: scatter the kept pairs into ``[N, C, n_in]``, one forward, gather back."""
        logits = self.logits(x)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(x @ self.noise)
        weights, index, probs = top_k_gate(logits, self.k)
        cf = self.capacity_factor
        cap = None if cf is None else expert_capacity(len(x), self.num_experts, cf, self.k)
        position, keep, cap = assign_slots(index, self.num_experts, cap)
        tok, choice = torch.nonzero(keep, as_tuple=True)
        expert, slot = index[tok, choice], position[tok, choice]
        out = self.experts(x.new_zeros(self.num_experts, cap, x.shape[1]).index_put((expert, slot), x[tok]))
        picked = out[expert, slot] * weights[tok, choice].unsqueeze(1).to(out.dtype)
        load = torch.bincount(index.reshape(-1), minlength=self.num_experts).float() / index.numel()
        self.last_aux = {"load_balancing": load_balancing_loss(probs, index), "z_loss": router_z_loss(logits),
                         "expert_load": load, "dropped": float(1.0 - keep.float().mean()), "logits": logits.detach()}
        return out.new_zeros(len(x), out.shape[2]).index_add(0, tok, picked)


class ExpertChoiceMoE(_RoutedLayer):
    """Expert-choice routing (Zhou et al. 2022): every expert takes its ``⌈cf · T / N⌉`` top-scored tokens.

    A token may be taken by several experts or by none (zero output). ``last_aux`` adds ``experts_per_token`` ``[T]``.
    Taught in: book/learned_gates, book/moe_transformer."""

    def __init__(self, n_in: int, n_out: int, num_experts: int, width: int, hidden_layers: int,
                 capacity_factor: float = 1.0, generator: torch.Generator | None = None, *,
                 prelu: bool = True) -> None:
        super().__init__(n_in, n_out, num_experts, width, hidden_layers, generator, prelu)
        self.capacity_factor = _check_capacity_factor(capacity_factor, none_drops_nothing=False)

    @property
    def params_active(self) -> int:
        """Average parameters per token: router plus ``capacity_factor`` experts."""
        ppe = self.experts.parameters_per_expert
        return self.params_total - self.num_experts * ppe + round(self.capacity_factor * ppe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, n_in] -> [T, n_out]``: gather each expert's tokens ``[N, c, n_in]``, one forward, add back."""
        logits = self.logits(x)
        weights, tokens, _ = expert_choice(logits, expert_capacity(len(x), self.num_experts, self.capacity_factor))
        out = self.experts(x[tokens])
        picked = (out * weights.unsqueeze(2).to(out.dtype)).reshape(-1, out.shape[2])
        per_token = torch.bincount(tokens.reshape(-1), minlength=len(x))
        self.last_aux = {"load_balancing": logits.new_zeros(()), "z_loss": router_z_loss(logits),
                         "expert_load": torch.full((self.num_experts,), 1.0 / self.num_experts),
                         "dropped": float((per_token == 0).float().mean()), "experts_per_token": per_token,
                         "logits": logits.detach()}
        return out.new_zeros(len(x), out.shape[2]).index_add(0, tokens.reshape(-1), picked)
