"""Soft MoE (Puigcerver et al.) with batched experts, and best expert subset selection (Chung et al.).

Shapes used throughout (``B`` batch, ``m`` tokens, ``d`` token dim, ``n`` experts, ``p`` slots per
expert, ``h`` expert hidden width, ``k`` experts kept):

* input ``X``: ``[B, m, d]``; router ``Φ``: ``[d, n·p]`` (column ``j·p + s`` is slot ``s`` of expert ``j``);
* logits ``XΦ``: ``[B, m, n·p]``; dispatch ``D`` = softmax over **tokens** (dim 1);
  combine ``C`` = softmax over **all slots** (dim 2);
* slot inputs ``X̃ = Dᵀ X``: ``[B, n·p, d]``; slot outputs ``Ỹ``: row ``j·p + s`` is ``f_j(X̃_{j·p+s})``;
* output ``Y = C Ỹ``: ``[B, m, d]``.

The ``n`` expert MLPs ``d → h → d`` are stored stacked (``w1 [n, d, h]``, ``w2 [n, h, d]``) and run
with one ``bmm`` per layer: no Python loop over experts.

Best expert subset selection (Algorithm 1 of Chung et al.): per input, sum the combine weights of each
expert over tokens (and its slots), keep the ``k`` experts with the largest mass, zero the other
experts' outputs and do **not** renormalise ``C``. :meth:`SoftMoE.forward_subset` is the batched
version (the paper's Algorithm 2, corrected as in the authors' code) and runs only the kept experts.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SoftMoE",
    "SubsetChoice",
    "softmoe_layers",
    "set_expert_subset",
    "expert_subset",
    "best_subset_single",
    "softmoe_forward_expert_loop",
    "softmoe_flops",
]

SUBSET_MODES = ("best", "random")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class SubsetChoice:
    """Which experts a :class:`SoftMoE` layer keeps at inference: ``k`` of them, ``best`` or ``random``."""

    k: int
    mode: str = "best"
    generator: torch.Generator | None = None


def _shape(t: torch.Tensor | Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, torch.Tensor) else t)) + "]"


class SoftMoE(nn.Module):
    """A Soft MoE layer whose experts are ``n`` two-layer MLPs ``d → h → d`` run as one batched matmul.

    Parameters
    ----------
    dim : int
        Token dimension ``d`` (input and output).
    num_experts : int
        Number of experts ``n``.
    hidden : int
        Hidden width ``h`` of every expert.
    slots_per_expert : int
        Slots ``p`` per expert (``Φ`` has ``n·p`` columns).
    normalize : bool
        L2-normalise tokens and the columns of ``Φ`` **for the logits** and multiply by a learnable
        scale (init 1), as in the reference code. The values sent to the experts are not normalised.
    bias : bool
        Give the experts biases (the authors' MNIST experts have none).
    activation : str
        ``relu`` or ``gelu``.
    phi_init : str
        ``normal``: ``Φ ~ N(0, 1/d)`` (Puigcerver et al.); ``uniform``: ``U[-1, 1]`` (the authors' MNIST code).
    generator : torch.Generator, optional
        Seeds the initialisation.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden: int,
        *,
        slots_per_expert: int = 1,
        normalize: bool = True,
        bias: bool = False,
        activation: str = "relu",
        phi_init: str = "normal",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in dict(dim=dim, num_experts=num_experts, hidden=hidden, slots_per_expert=slots_per_expert).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if phi_init not in ("normal", "uniform"):
            raise ValueError(f"phi_init must be 'normal' or 'uniform', got {phi_init!r}")
        self.dim, self.num_experts, self.hidden, self.slots_per_expert = dim, num_experts, hidden, slots_per_expert
        self.normalize, self.activation, self.phi_init = normalize, activation, phi_init
        self.phi = nn.Parameter(torch.empty(dim, num_experts * slots_per_expert))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self.subset: SubsetChoice | None = None
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Φ as chosen by ``phi_init``; expert weights like ``nn.Linear`` (``U(±1/√fan_in)``)."""
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
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}, "
            f"bias={self.b1 is not None}, activation={self.activation!r}"
        )

    @property
    def num_slots(self) -> int:
        """Total number of slots ``n·p``."""
        return self.num_experts * self.slots_per_expert

    @property
    def expert_parameter_count(self) -> int:
        """Parameters in all experts together (``Φ`` and the scale not included)."""
        per = 2 * self.dim * self.hidden + (self.hidden + self.dim if self.b1 is not None else 0)
        return self.num_experts * per

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected and received shapes unless ``x`` is ``[B, m, d]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SoftMoE expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(
                f"SoftMoE expects input of shape [batch, tokens, {self.dim}] (tokens >= 1), got {_shape(x)}"
            )

    # ------------------------------------------------------------------ routing
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``XΦ`` ``[B, m, n·p]`` (with L2-normalised tokens and ``Φ`` columns if ``normalize``)."""
        self.check_input(x)
        phi = self.phi
        if self.normalize:
            x = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
            phi = self.scale * (phi / (phi.norm(dim=0, keepdim=True) + 1e-6))
        return x @ phi

    def dispatch_combine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch ``D`` (softmax over tokens) and combine ``C`` (softmax over slots), both ``[B, m, n·p]``."""
        logits = self.logits(x)
        return logits.softmax(dim=1), logits.softmax(dim=2)

    def expert_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Combine mass of every expert, summed over tokens and its slots: ``[B, n]`` (rows sum to ``m``)."""
        _, combine = self.dispatch_combine(x)
        return self._mass(combine)

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
        """Slot outputs ``Ỹ`` for slot inputs ``X̃`` ``[B, n·p, d]``: expert ``j`` reads its ``p`` slots."""
        b = slots.shape[0]
        n, p, d = self.num_experts, self.slots_per_expert, self.dim
        if slots.shape[1:] != (n * p, d):
            raise ValueError(f"slots must have shape [batch, {n * p}, {d}], got {_shape(slots)}")
        xs = slots.reshape(b, n, p, d).transpose(0, 1).reshape(n, b * p, d)  # expert-major
        out = self._mlp(xs)
        return out.reshape(n, b, p, d).transpose(0, 1).reshape(b, n * p, d)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Y = C(X) · Ỹ(X)`` ``[B, m, d]``; with a subset set (:func:`set_expert_subset`) only ``k`` experts run."""
        if self.subset is not None:
            s = self.subset
            return self.forward_subset(x, s.k, s.mode, s.generator)
        dispatch, combine = self.dispatch_combine(x)
        slots = dispatch.transpose(1, 2) @ x
        return combine @ self.experts_forward(slots)

    def check_k(self, k: int) -> None:
        """Raise a ``ValueError`` unless ``1 <= k <= num_experts``."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be an integer number of experts in 1..{self.num_experts}, got {k!r}")
        if k < 1:
            raise ValueError(
                f"k must be >= 1 (k = {k} would drop every expert and output zeros); "
                f"use 1 <= k <= num_experts = {self.num_experts}"
            )
        if k > self.num_experts:
            raise ValueError(
                f"k = {k} is larger than num_experts = {self.num_experts}; use 1 <= k <= {self.num_experts}"
            )

    def select_experts(
        self,
        x: torch.Tensor,
        k: int,
        mode: str = "best",
        generator: torch.Generator | None = None,
        combine: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Indices ``[B, k]`` (ascending) of the experts kept for every input.

        ``best``: the ``k`` experts with the largest combine mass (Algorithm 1's rule, done for the whole
        batch: ``topk`` of the mass, i.e. **dropping the n − k smallest**). ``random``: ``k`` experts drawn
        uniformly without replacement, independently per input (the paper's baseline).
        """
        self.check_k(k)
        if mode not in SUBSET_MODES:
            raise ValueError(f"mode must be one of {SUBSET_MODES}, got {mode!r}")
        if combine is None:
            _, combine = self.dispatch_combine(x)
        b = combine.shape[0]
        if mode == "best":
            chosen = self._mass(combine).topk(k, dim=1).indices
        else:
            noise = torch.rand(b, self.num_experts, generator=generator, device="cpu").to(combine.device)
            chosen = noise.argsort(dim=1)[:, :k]
        return chosen.sort(dim=1).values

    def forward_subset(
        self,
        x: torch.Tensor,
        k: int,
        mode: str = "best",
        generator: torch.Generator | None = None,
        chosen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Batched best (or random) expert subset selection; only the ``k`` kept experts are computed.

        This is Algorithm 2 of Chung et al. as the authors' code does it: per input keep the ``k``
        experts with the **largest** summed combine weight, give the others zero output, and combine
        with the **unnormalised** ``C``. ``chosen [B, k]`` overrides the selection.

        The kept (input, expert) pairs are grouped by expert into one buffer ``[experts used, capacity, p, d]``
        (capacity = the most inputs any expert got) and run with one ``bmm``.
        """
        self.check_input(x)
        b, m, d = x.shape
        p = self.slots_per_expert
        dispatch, combine = self.dispatch_combine(x)
        if chosen is None:
            chosen = self.select_experts(x, k, mode, generator, combine=combine)
        else:
            self.check_k(k)
            if chosen.shape != (b, k):
                raise ValueError(f"chosen must have shape [{b}, {k}], got {_shape(chosen)}")
        slot_idx = (chosen.unsqueeze(-1) * p + torch.arange(p, device=x.device)).reshape(b, 1, k * p)
        slot_idx = slot_idx.expand(b, m, k * p)
        d_sel, c_sel = dispatch.gather(2, slot_idx), combine.gather(2, slot_idx)  # [B, m, k·p]
        slots = (d_sel.transpose(1, 2) @ x).reshape(b, k, p, d)
        y_sel = self._run_chosen(slots, chosen)  # [B, k, p, d]
        return c_sel @ y_sel.reshape(b, k * p, d)

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
        buf = slots.new_zeros(len(used), capacity, p, d)
        buf = buf.index_put((group, position), slots.reshape(b * k, p, d))
        out = self._mlp(buf.reshape(len(used), capacity * p, d), used).reshape(len(used), capacity, p, d)
        return out[group, position].reshape(b, k, p, d)


# ---------------------------------------------------------------------- several layers
def softmoe_layers(model: nn.Module) -> list[SoftMoE]:
    """All :class:`SoftMoE` layers of ``model`` in module order (``model`` itself included)."""
    return [mod for mod in model.modules() if isinstance(mod, SoftMoE)]


def set_expert_subset(
    model: nn.Module,
    k: int | Sequence[int | None] | None,
    mode: str = "best",
    generator: torch.Generator | None = None,
) -> list[SoftMoE]:
    """Make the Soft MoE layers of ``model`` keep only ``k`` experts per input (per layer, no training).

    ``k`` is one number for every layer, a sequence with one entry per layer (``None`` = all experts in
    that layer), or ``None`` to switch selection off everywhere. Returns the layers, in order.
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
def expert_subset(
    model: nn.Module,
    k: int | Sequence[int | None] | None,
    mode: str = "best",
    generator: torch.Generator | None = None,
) -> Iterator[list[SoftMoE]]:
    """Context manager form of :func:`set_expert_subset`; restores the previous choice on exit."""
    layers = softmoe_layers(model)
    before = [layer.subset for layer in layers]
    try:
        yield set_expert_subset(model, k, mode, generator)
    finally:
        for layer, old in zip(layers, before):
            layer.subset = old


# ---------------------------------------------------------------------- references and costs
def best_subset_single(layer: SoftMoE, x: torch.Tensor, k: int) -> torch.Tensor:
    """Algorithm 1 for **one** input ``x [m, d]``, literally: run all experts, keep the ``k`` with most mass.

    ``C_sum,j = Σ_i C_ij`` (over tokens, and over the expert's slots); keep the ``k`` largest; zero the
    other experts' rows of ``Ỹ``; return ``C · Ŷ`` without renormalising ``C``. Used to check
    :meth:`SoftMoE.forward_subset`; it computes every expert, so it saves no time.
    """
    if x.dim() != 2 or x.shape[-1] != layer.dim:
        raise ValueError(f"best_subset_single expects one input of shape [tokens, {layer.dim}], got {_shape(x)}")
    layer.check_k(k)
    dispatch, combine = layer.dispatch_combine(x.unsqueeze(0))
    y_tilde = layer.experts_forward(dispatch.transpose(1, 2) @ x.unsqueeze(0))[0]  # [n·p, d]
    mass = combine[0].sum(dim=0).reshape(layer.num_experts, layer.slots_per_expert).sum(dim=1)  # [n]
    keep = torch.zeros(layer.num_experts, dtype=torch.bool, device=x.device)
    keep[mass.topk(k).indices] = True
    y_hat = y_tilde * keep.repeat_interleave(layer.slots_per_expert).unsqueeze(1).to(y_tilde.dtype)
    return combine[0] @ y_hat


def softmoe_forward_expert_loop(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer with a Python loop over experts (as many public implementations do).

    A baseline for ``benchmarks/softmoe_layer.py`` only: it gives the same output as ``layer(x)``.
    """
    dispatch, combine = layer.dispatch_combine(x)
    slots = dispatch.transpose(1, 2) @ x  # [B, n·p, d]
    p = layer.slots_per_expert
    act = ACTIVATIONS[layer.activation]
    outs = []
    for j in range(layer.num_experts):
        h = slots[:, j * p : (j + 1) * p] @ layer.w1[j]
        if layer.b1 is not None:
            h = h + layer.b1[j]
        o = act(h) @ layer.w2[j]
        if layer.b2 is not None:
            o = o + layer.b2[j]
        outs.append(o)
    return combine @ torch.cat(outs, dim=1)


def softmoe_flops(
    batch: int, tokens: int, dim: int, num_experts: int, hidden: int, slots_per_expert: int = 1, k: int | None = None
) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, by part; ``k`` experts kept (default all).

    ``router``: ``XΦ``; ``dispatch``: ``DᵀX`` for the kept slots; ``experts``: the kept experts;
    ``combine``: ``C Ỹ`` for the kept slots. Softmaxes, norms and activations are not counted.
    """
    k = num_experts if k is None else k
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..{num_experts}, got {k}")
    slots_all, slots_kept = num_experts * slots_per_expert, k * slots_per_expert
    out = {
        "router": 2 * batch * tokens * dim * slots_all,
        "dispatch": 2 * batch * tokens * dim * slots_kept,
        "experts": 2 * batch * slots_kept * 2 * dim * hidden,
        "combine": 2 * batch * tokens * dim * slots_kept,
    }
    out["total"] = sum(out.values())
    return out
