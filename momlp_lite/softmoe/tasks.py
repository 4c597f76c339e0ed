"""Chung et al.'s Soft MoE tasks: ‖X‖₂ (Theorem 1), MNIST as 4 patches, and Table 1's best-subset oracle."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.images import ImageSplit
from ..runtime import check_positive_int, check_positive_ints
from .layer import SoftMoE

__all__ = ["norm_task_batch", "SoftMoERegressor", "MNIST_MEAN", "MNIST_STD", "mnist_tokens",
           "SoftMoEClassifier", "train_classifier", "predict", "subset_masks", "oracle_correct"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def norm_task_batch(batch: int, tokens: int, token_dim: int, variance: float = 5.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``X ~ N(0, variance·I)`` as ``[batch, tokens, token_dim]``, and ``‖X‖₂``. Taught in: book/softmoe_one_expert."""
    check_positive_ints(batch=batch, tokens=tokens, token_dim=token_dim)
    if variance <= 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    x = torch.randn(batch, tokens, token_dim, generator=generator) * math.sqrt(variance)
    return x, x.flatten(1).norm(dim=1)


class SoftMoERegressor(nn.Module):
    """A Soft MoE layer (experts ``d → 10d/n → d``), then a fixed sum head. Taught in: book/softmoe_one_expert."""

    def __init__(self, token_dim: int, num_experts: int, *, normalize: str = "none",
                 generator: torch.Generator | None = None):
        super().__init__()
        if (10 * token_dim) % num_experts:
            raise ValueError(f"num_experts must divide 10·token_dim = {10 * token_dim} to keep 20·d² expert "
                             f"weights, got {num_experts}")
        self.moe = SoftMoE(token_dim, num_experts, 10 * token_dim // num_experts, normalize=normalize,
                           generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x).sum(dim=(1, 2))


def mnist_tokens(split: ImageSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST split as ``(x [N, 4, 196], labels)``, the authors' tokens. Taught in: book/softmoe_best_subset."""
    if not isinstance(split.images, torch.Tensor) or tuple(split.images.shape[1:]) != (1, 28, 28):
        raise ValueError("mnist_tokens needs an in-memory MNIST split of uint8 [N, 1, 28, 28] images, got "
                         f"{getattr(split.images, 'shape', type(split.images).__name__)}")
    x = (split.images[:, 0].to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    quarters = x.reshape(len(x), 2, 14, 2, 14).permute(0, 1, 3, 2, 4)  # [N, row, column, 14, 14]
    return quarters.reshape(len(x), 4, 196).contiguous(), split.labels


class SoftMoEClassifier(nn.Module):
    """The authors' MNIST model: Soft MoE (``Φ ~ U[-1, 1]``, ``⌊784/n⌋`` hidden), a bias-free linear head.
    Taught in: book/softmoe_best_subset."""

    def __init__(self, num_experts: int, *, tokens: int = 4, dim: int = 196, hidden: int | None = None,
                 num_classes: int = 10, normalize: str = "tokens", generator: torch.Generator | None = None) -> None:
        super().__init__()
        hidden = max(1, (dim * 4) // num_experts) if hidden is None else hidden
        self.moe = SoftMoE(dim, num_experts, hidden, normalize=normalize, phi_init="uniform", generator=generator)
        self.head = nn.Linear(tokens * dim, num_classes, bias=False)
        bound = 1.0 / math.sqrt(tokens * dim)
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.moe(x).flatten(1))

    def expert_logits(self, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Each expert's share ``[B, n, classes]`` of the logits; a kept subset's logits are the sum of its rows."""
        moe, out = self.moe, []
        for start in range(0, len(x), chunk):
            tokens, dispatch, combine = moe.route(x[start : start + chunk])
            y_tilde = moe.experts_forward(dispatch.transpose(1, 2) @ tokens)  # [b, n·p, d]
            b, m, _ = combine.shape
            head_view = torch.einsum("bsd,cid->bsic", y_tilde, self.head.weight.reshape(-1, m, moe.dim))
            per_slot = torch.einsum("bis,bsic->bsc", combine, head_view)  # slot s's share of the logits
            out.append(per_slot.reshape(b, moe.num_experts, moe.slots_per_expert, -1).sum(dim=2))
        return torch.cat(out)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch: int = 256,
                     lr: float = 1e-3, shuffle: bool = False, seed: int = 0, progress: bool = True,
                     desc: str = "training") -> list[float]:
    """Adam + cross-entropy, unshuffled by default (the authors' loader). Taught in: book/softmoe_best_subset."""
    check_positive_int("epochs", epochs)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(y), generator=gen) if shuffle else torch.arange(len(y))
        total = 0.0
        for idx in order.split(batch):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(y))
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Predicted classes ``[N]`` (eval mode, in chunks of ``batch``). Taught in: book/softmoe_best_subset."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(xb.to(device)).argmax(dim=1).cpu() for xb in x.split(batch)])


def subset_masks(n: int, k: int) -> torch.Tensor:
    """All ``k``-subsets of ``n`` experts as 0/1 rows ``[C(n, k), n]``. Taught in: book/softmoe_best_subset."""
    check_positive_ints(n=n, k=k)
    if k > n:
        raise ValueError(f"k = {k} is larger than n = {n}; use 1 <= k <= n")
    combos = torch.tensor(list(itertools.combinations(range(n), k)))
    return torch.zeros(len(combos), n).scatter_(1, combos, 1.0)


@torch.no_grad()
def oracle_correct(expert_logits: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Table 1's oracle: does **some** ``k``-subset predict the label? Taught in: book/softmoe_best_subset."""
    masks = subset_masks(expert_logits.shape[1], k).to(expert_logits)
    out = []
    for part, lab in zip(expert_logits.split(chunk), labels.split(chunk)):
        logits = torch.einsum("sn,bnc->bsc", masks, part)  # [b, subsets, classes]
        out.append((logits.argmax(dim=2) == lab[:, None].to(logits.device)).any(dim=1))
    return torch.cat(out).cpu()
