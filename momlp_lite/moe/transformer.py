"""A tiny vision transformer whose feed-forward blocks are dense, a learned-gate MoE, or Soft MoE.
Token-wise FFNs see a batch's ``B·m`` tokens as one ``[T, d]`` matrix. Taught in: book/moe_transformer."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import check_positive_int
from ..softmoe.layer import SoftMoE
from .experts import StackedMLP
from .gates import ExpertChoiceMoE, TokenChoiceMoE

__all__ = ["make_ffn", "ffn_parameters", "TinyViT"]


def make_ffn(kind: str, dim: int, hidden: int, num_experts: int = 1, capacity_factor: float | None = None,
             generator: torch.Generator | None = None) -> nn.Module:
    """An FFN of ``kind`` with experts ``d -> hidden -> d``: dense (one ReLU MLP), top1, top2, expert_choice (factor 1
    by default) or soft (one slot per expert). Taught in: book/moe_transformer."""
    check_positive_int("hidden", hidden)
    if kind == "dense":
        return StackedMLP(1, dim, hidden, 1, dim, prelu=False, generator=generator)
    if kind in ("top1", "top2"):
        return TokenChoiceMoE(dim, dim, num_experts, hidden, 1, k=int(kind[-1]), capacity_factor=capacity_factor,
                              generator=generator, prelu=False)
    if kind == "expert_choice":
        return ExpertChoiceMoE(dim, dim, num_experts, hidden, 1, capacity_factor=capacity_factor or 1.0,
                               generator=generator, prelu=False)
    if kind == "soft":
        return SoftMoE(dim, num_experts, hidden, generator=generator)
    raise ValueError(f"kind must be one of ('dense', 'top1', 'top2', 'expert_choice', 'soft'), got {kind!r}")


def ffn_parameters(ffn: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` of an FFN block; Soft MoE counts all as active. Taught in: book/moe_transformer."""
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
    """Patch embedding, a pre-norm block per FFN in ``ffns``, mean-token classifier. Taught in: book/moe_transformer."""

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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)  # [B, m, C·patch²]
        x = self.embed(patches) + self.position
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
        """``(total, active per token)``: all parameters, less each FFN's inactive ones."""
        total = sum(p.numel() for p in self.parameters())
        counts = [ffn_parameters(b.ffn) for b in self.blocks]
        return total, total - sum(t - a for t, a in counts)
