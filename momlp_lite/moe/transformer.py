"""A tiny vision transformer whose feed-forward blocks can be dense, a learned-gate MoE, or Soft MoE.

Taught in: book/moe_transformer.

Images ``[B, C, H, W]`` are cut into ``m`` square patches, embedded to dimension ``d`` with a learned
position embedding, and go through pre-norm blocks ``x + Attn(LN x)`` then ``x + FFN(LN x)``; the
head classifies the mean token. Each block's FFN is any module built by :func:`make_ffn`. Token-wise
FFNs see the ``B·m`` tokens of a batch as one ``[T, d]`` matrix (so capacity counts every token of the
batch); Soft MoE sees ``[B, m, d]`` and mixes the ``m`` tokens of each image into its slots.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from ..softmoe.layer import SoftMoE
from .experts import StackedMLP
from .gates import ExpertChoiceMoE, TokenChoiceMoE

__all__ = ["FFN_KINDS", "DenseFFN", "make_ffn", "ffn_parameters", "TinyViT"]

FFN_KINDS = ("dense", "top1", "top2", "expert_choice", "soft")


class DenseFFN(nn.Module):
    """One ReLU MLP ``d -> hidden -> d`` (a stack of one expert), token-wise.

    Taught in: book/moe_transformer.
    """

    def __init__(self, dim: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.mlp = StackedMLP(1, dim, hidden, 1, dim, prelu=False, generator=generator)
        self.last_aux: dict[str, torch.Tensor | float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.unsqueeze(0))[0]

    @property
    def params_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    params_active = params_total


def make_ffn(kind: str, dim: int, hidden: int, num_experts: int = 1, capacity_factor: float | None = None,
             generator: torch.Generator | None = None) -> nn.Module:
    """An FFN block of the given ``kind`` (one of :data:`FFN_KINDS`); experts are ``d -> hidden -> d``.

    ``top1``/``top2``: :class:`TokenChoiceMoE` (``capacity_factor`` None drops nothing);
    ``expert_choice``: :class:`ExpertChoiceMoE` (factor default 1); ``soft``: the book's
    :class:`SoftMoE` with one slot per expert (no expert biases, ReLU).

    Taught in: book/moe_transformer.
    """
    check_positive_int("hidden", hidden)
    if kind == "dense":
        return DenseFFN(dim, hidden, generator)
    if kind in ("top1", "top2"):
        return TokenChoiceMoE(dim, dim, num_experts, hidden, 1, k=int(kind[-1]), capacity_factor=capacity_factor,
                              generator=generator, prelu=False)
    if kind == "expert_choice":
        return ExpertChoiceMoE(dim, dim, num_experts, hidden, 1, capacity_factor=capacity_factor or 1.0,
                               generator=generator, prelu=False)
    if kind == "soft":
        return SoftMoE(dim, num_experts, hidden, generator=generator)
    raise ValueError(f"kind must be one of {FFN_KINDS}, got {kind!r}")


def ffn_parameters(ffn: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` of an FFN block. Soft MoE runs every expert on every input's slots,
    so all its parameters count as active.

    Taught in: book/moe_transformer.
    """
    total = sum(p.numel() for p in ffn.parameters())
    return total, int(getattr(ffn, "params_active", total))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.ln2(x)
        if isinstance(self.ffn, SoftMoE):
            return x + self.ffn(h)
        return x + self.ffn(h.reshape(-1, h.shape[-1])).reshape(h.shape)  # dropped tokens: residual only


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm block per FFN in ``ffns``, mean-token classifier.

    Parameters
    ----------
    ffns : sequence of nn.Module
        The FFN of each block (see :func:`make_ffn`); their number is the depth.
    dim, heads : int
        Token dimension and attention heads.
    patch, image_size, channels, classes : int
        Square patches of ``patch`` pixels from ``image_size``-pixel images.

    Taught in: book/moe_transformer.
    """

    def __init__(self, ffns: Sequence[nn.Module], dim: int, heads: int = 2, patch: int = 7, image_size: int = 28,
                 channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}; choose a divisor")
        if not ffns:
            raise ValueError("ffns must hold at least one FFN block, got none")
        self.patch, self.tokens = patch, (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.position = nn.Parameter(torch.randn(self.tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, f) for f in ffns)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, m, C·patch²]``."""
        return F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.patches(images)) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))

    def aux_loss(self, alpha: float = 0.01, beta: float = 0.0) -> torch.Tensor:
        """``α Σ load_balancing + β Σ z_loss`` over the blocks' routers (after a forward pass)."""
        total = self.head.weight.new_zeros(())
        for block in self.blocks:
            aux = getattr(block.ffn, "last_aux", {})
            if "load_balancing" in aux:
                total = total + alpha * aux["load_balancing"] + beta * aux["z_loss"]
        return total

    def parameter_counts(self) -> tuple[int, int]:
        """``(total, active per token)``: all parameters, and the shared ones plus each FFN's active ones."""
        total = sum(p.numel() for p in self.parameters())
        ffn_total = sum(ffn_parameters(b.ffn)[0] for b in self.blocks)
        ffn_active = sum(ffn_parameters(b.ffn)[1] for b in self.blocks)
        return total, total - ffn_total + ffn_active
