"""Learned routers: a softmax gate with noisy top-k, load balancing, the router z-loss, expert capacity
with token dropping, and expert-choice routing, all over the book's stacked experts.

Taught in: book/learned_gates (the primitives) and book/moe_transformer (inside a small ViT).

Shapes: ``T`` tokens of width ``n_in``, ``N`` experts, ``k`` experts per token, capacity ``C`` tokens
per expert. Router logits are ``[T, N]``.

Kernel (CPU and GPU alike). Tokens per expert are uneven, so the routed (token, expert) pairs are
scattered into one padded buffer ``[N, C, n_in]`` at positions found with one cumulative sum
(first choices before second choices, then token order, as in GShard), the experts run as one
lockstep :class:`~momlp_lite.moe.experts.StackedMLP` forward (``baddbmm`` per layer), and the
outputs are gathered back and summed into the tokens with ``index_add``. There is no loop over
experts. The padding costs at most ``capacity_factor`` times the work of a perfect balance, and one
dense batched matmul is what both a CPU BLAS and a GPU run fastest at these sizes; a grouped GEMM
over exactly-sized groups would skip the padding but has no stable PyTorch API yet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from .experts import StackedMLP

__all__ = [
    "check_logits", "noisy_logits", "top_k_gate", "load_balancing_loss", "router_z_loss",
    "expert_capacity", "assign_slots", "run_token_choice", "expert_choice", "run_expert_choice",
    "TokenChoiceMoE", "ExpertChoiceMoE",
]


# ---------------------------------------------------------------------------------------- checks
def _check_k(k: int, num_experts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (experts per token), got {k!r}; use 1 <= k <= {num_experts}")
    if k > num_experts:
        raise ValueError(f"k = {k} is larger than num_experts = {num_experts}; use 1 <= k <= {num_experts}")
    return k


def _check_capacity_factor(capacity_factor: float | None) -> float | None:
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor must be a number > 0, got {capacity_factor!r}; use e.g. 1.25, "
            "or None for no dropping"
        )
    return float(capacity_factor)


def _router_float(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32: the router runs in full precision even under bf16 (Switch)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def check_logits(logits: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
    """Raise ``ValueError`` unless ``logits`` is a finite ``[T, N]`` tensor (``N = num_experts`` if given).

    Taught in: book/learned_gates.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"router logits must have shape [tokens, experts] with tokens >= 1, got {shape}")
    if num_experts is not None and logits.shape[1] != num_experts:
        raise ValueError(f"router logits must have {num_experts} columns (one per expert), got {logits.shape[1]}")
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise ValueError(
            f"router logits contain {int(bad.sum())} NaN/inf values (tokens {rows}...); check the input tokens "
            "for NaN, lower the learning rate, or add the router z-loss"
        )
    return logits


def noisy_logits(clean: torch.Tensor, noise_logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Shazeer et al.'s noisy logits ``H = x W_g + ε · softplus(x W_noise)``, ``ε ~ N(0, 1)`` (or ``noise``).

    Taught in: book/learned_gates.
    """
    eps = torch.randn_like(clean) if noise is None else noise
    return clean + eps * F.softplus(noise_logits)


# ---------------------------------------------------------------------------------------- token choice
def top_k_gate(logits: torch.Tensor, k: int, renormalize: bool | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax gate keeping each token's ``k`` largest experts.

    Returns ``(weights [T, k], index [T, k], probs [T, N])``: ``probs`` is the full softmax, ``index``
    the chosen experts in decreasing order, ``weights`` their gate values. ``renormalize`` (default:
    ``k > 1``) rescales the kept values to sum to one, i.e. ``softmax(KeepTopK(H))`` of Shazeer et
    al., GShard's top-2 and Mixtral; with ``k = 1`` Switch keeps the raw probability ``p_i``, so
    the task loss still trains the router.

    Taught in: book/learned_gates.
    """
    check_logits(logits)
    _check_k(k, logits.shape[1])
    probs = _router_float(logits).softmax(dim=-1)
    top, index = probs.topk(k, dim=-1)
    if renormalize if renormalize is not None else k > 1:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), index, probs


def load_balancing_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss ``N · Σᵢ fᵢ · Pᵢ`` (without α); 1 at a perfect balance.

    ``fᵢ`` is the fraction of tokens whose **first** choice (``index[:, 0]``) is expert ``i`` and ``Pᵢ``
    the mean router probability of expert ``i`` (``probs [T, N]``). Only ``Pᵢ`` carries a gradient.

    Taught in: book/learned_gates.
    """
    num_tokens, num_experts = probs.shape
    f = torch.bincount(index[:, 0], minlength=num_experts).to(probs.dtype) / num_tokens
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_t (log Σᵢ exp logits[t, i])²``: keeps router logits small.

    Taught in: book/learned_gates.
    """
    return torch.logsumexp(_router_float(logits), dim=-1).pow(2).mean()


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int = 1) -> int:
    """Tokens an expert may take: ``⌈capacity_factor · k · num_tokens / num_experts⌉``.

    With ``k = 1`` this is Switch's ``⌈capacity_factor · tokens / experts⌉``; for ``k > 1`` the
    ``k`` assignments per token are counted, as in GShard and T5X.

    Taught in: book/learned_gates.
    """
    check_positive_int("num_tokens", num_tokens)
    check_positive_int("num_experts", num_experts)
    _check_k(k, num_experts)
    cf = _check_capacity_factor(capacity_factor)
    if cf is None:
        raise ValueError("capacity_factor must be a number > 0 here; for no dropping use capacity=None")
    return max(1, math.ceil(cf * k * num_tokens / num_experts - 1e-9))


def assign_slots(index: torch.Tensor, num_experts: int, capacity: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each assignment's position in its expert's buffer, and which assignments fit.

    ``index [T, k]``. Priority: all first choices (in token order), then all second choices, ...
    Returns ``(position [T, k], keep [T, k] bool, capacity)``; with ``capacity=None`` nothing is
    dropped and the capacity returned is the busiest expert's load.

    Taught in: book/learned_gates.
    """
    t, k = index.shape
    onehot = F.one_hot(index.T.reshape(-1), num_experts)  # [k·T, N], choice-major priority
    position = ((onehot.cumsum(dim=0) - 1) * onehot).sum(dim=1).reshape(k, t).T
    if capacity is None:
        capacity = int(onehot.sum(dim=0).max())
    return position, position < capacity, capacity


def run_token_choice(experts: StackedMLP, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                     position: torch.Tensor, keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """Dispatch the kept (token, expert) pairs into ``[N, C, n_in]``, run the stack once, combine.

    Output ``[T, n_out]``: ``y_t = Σ_j weights[t, j] · f_{index[t, j]}(x_t)`` over the kept ``j``;
    a token with no kept choice gets zeros (in a residual block it passes through unchanged).

    Taught in: book/learned_gates.
    """
    tok, choice = torch.nonzero(keep, as_tuple=True)
    expert, slot = index[tok, choice], position[tok, choice]
    buffer = x.new_zeros(experts.num_experts, capacity, x.shape[1])
    buffer = buffer.index_put((expert, slot), x[tok])  # scatter
    out = experts(buffer)  # [N, C, n_out]: one baddbmm per layer
    picked = out[expert, slot] * weights[tok, choice].unsqueeze(1).to(out.dtype)  # gather
    return out.new_zeros(x.shape[0], out.shape[2]).index_add(0, tok, picked)


# ---------------------------------------------------------------------------------------- expert choice
def expert_choice(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zhou et al.'s expert-choice routing: each expert takes the ``capacity`` tokens it scores highest.

    Scores are the softmax over experts of ``logits [T, N]``. Returns ``(weights [N, c], tokens [N, c],
    probs [T, N])`` with ``c = min(capacity, T)``; ``tokens[i]`` are expert ``i``'s tokens.

    Taught in: book/learned_gates.
    """
    check_logits(logits)
    check_positive_int("capacity", capacity)
    probs = _router_float(logits).softmax(dim=-1)
    weights, tokens = probs.T.topk(min(capacity, logits.shape[0]), dim=1)
    return weights.to(logits.dtype), tokens, probs


def run_expert_choice(experts: StackedMLP, x: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor
                      ) -> torch.Tensor:
    """Gather each expert's tokens into ``[N, c, n_in]``, run the stack once, weight and ``index_add`` back.

    Taught in: book/learned_gates.
    """
    out = experts(x[tokens])  # [N, c, n_out]
    picked = (out * weights.unsqueeze(2).to(out.dtype)).reshape(-1, out.shape[2])
    return out.new_zeros(x.shape[0], out.shape[2]).index_add(0, tokens.reshape(-1), picked)


# ---------------------------------------------------------------------------------------- layers
class _RoutedLayer(nn.Module):
    """Shared parts: a bias-free linear router and ``N`` stacked MLP experts."""

    def __init__(self, n_in: int, n_out: int, num_experts: int, width: int, hidden_layers: int,
                 generator: torch.Generator | None, prelu: bool) -> None:
        super().__init__()
        self.n_in = check_positive_int("n_in", n_in)
        self.n_out = check_positive_int("n_out", n_out)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.router = nn.Parameter(torch.empty(n_in, num_experts))
        with torch.no_grad():  # Switch's router init: truncated normal, std sqrt(0.1 / fan_in)
            self.router.normal_(0.0, (0.1 / n_in) ** 0.5, generator=generator).clamp_(-2 * (0.1 / n_in) ** 0.5,
                                                                                       2 * (0.1 / n_in) ** 0.5)
        self.experts = StackedMLP(num_experts, n_in, width, hidden_layers, n_out, prelu=prelu, generator=generator)
        self.last_aux: dict[str, torch.Tensor | float] = {}

    def _check_tokens(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.n_in or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects tokens of shape [T, {self.n_in}] with T >= 1, got {shape}; "
                "flatten a [batch, tokens, dim] input with x.reshape(-1, dim)"
            )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean router logits ``x W_g`` ``[T, N]``."""
        self._check_tokens(x)
        return x @ self.router

    @property
    def router_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("experts."))

    @property
    def params_total(self) -> int:
        """All parameters: router plus every expert."""
        return sum(p.numel() for p in self.parameters())


class TokenChoiceMoE(_RoutedLayer):
    """Top-k learned gate over stacked MLP experts (Shazeer 2017 / Switch / GShard).

    Each token picks its ``k`` experts from ``softmax(x W_g)`` (noisy logits in training when
    ``noisy``); ``capacity_factor`` limits every expert to ``⌈cf · k · T / N⌉`` tokens and drops the
    rest (they get zero output), ``None`` drops nothing. ``forward`` stores in ``last_aux``:
    ``load_balancing`` (``N Σ fᵢPᵢ``, without α), ``z_loss``, ``expert_load`` (``[N]``, fraction of
    the routed assignments each expert received, before dropping), ``dropped`` (fraction of
    assignments dropped; of tokens when ``k = 1``) and ``logits`` (detached).

    Taught in: book/learned_gates, book/moe_transformer.
    """

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
        return self.router_parameters + self.k * self.experts.parameters_per_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, n_in] -> [T, n_out]``."""
        clean = self.logits(x)
        logits = noisy_logits(clean, x @ self.noise) if self.noise is not None and self.training else clean
        weights, index, probs = top_k_gate(logits, self.k)
        t = x.shape[0]
        cap = None if self.capacity_factor is None else expert_capacity(t, self.num_experts, self.capacity_factor,
                                                                          self.k)
        position, keep, cap = assign_slots(index, self.num_experts, cap)
        y = run_token_choice(self.experts, x, index, weights, position, keep, cap)
        load = torch.bincount(index.reshape(-1), minlength=self.num_experts).float() / index.numel()
        self.last_aux = {
            "load_balancing": load_balancing_loss(probs, index), "z_loss": router_z_loss(logits),
            "expert_load": load, "dropped": float(1.0 - keep.float().mean()), "logits": logits.detach(),
        }
        return y


class ExpertChoiceMoE(_RoutedLayer):
    """Expert-choice routing (Zhou et al. 2022): every expert takes its ``⌈cf · T / N⌉`` top-scored tokens.

    The load is balanced by construction; a token may be taken by several experts or by none (then it
    gets zero output). ``last_aux``: ``expert_load`` (always uniform), ``dropped`` (fraction of tokens
    no expert took), ``z_loss``, ``load_balancing`` (zero: nothing to balance), ``experts_per_token``
    (``[T]``) and ``logits``.

    Taught in: book/learned_gates, book/moe_transformer.
    """

    def __init__(self, n_in: int, n_out: int, num_experts: int, width: int, hidden_layers: int,
                 capacity_factor: float = 1.0, generator: torch.Generator | None = None, *,
                 prelu: bool = True) -> None:
        super().__init__(n_in, n_out, num_experts, width, hidden_layers, generator, prelu)
        cf = _check_capacity_factor(capacity_factor)
        if cf is None:
            raise ValueError("expert choice needs a capacity_factor > 0 (e.g. 1.0 or 2.0), got None")
        self.capacity_factor = cf

    @property
    def params_active(self) -> int:
        """Average parameters per token: router plus ``capacity_factor`` experts (``N·c/T`` on average)."""
        return self.router_parameters + round(self.capacity_factor * self.experts.parameters_per_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, n_in] -> [T, n_out]``."""
        logits = self.logits(x)
        t = x.shape[0]
        weights, tokens, probs = expert_choice(logits, expert_capacity(t, self.num_experts, self.capacity_factor))
        y = run_expert_choice(self.experts, x, weights, tokens)
        per_token = torch.bincount(tokens.reshape(-1), minlength=t)
        self.last_aux = {
            "load_balancing": logits.new_zeros(()), "z_loss": router_z_loss(logits),
            "expert_load": torch.full((self.num_experts,), 1.0 / self.num_experts),
            "dropped": float((per_token == 0).float().mean()), "experts_per_token": per_token,
            "logits": logits.detach(),
        }
        return y
