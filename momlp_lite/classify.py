"""Classification helpers for MoMLPs on frozen features: a linear probe, accuracy, per-leaf statistics.

The linear probe is the classic baseline of frozen-feature evaluation (Oquab et al. 2023): one
linear layer on the features, trained with cross-entropy. Here it is trained with the experts'
optimizer (AdamW) so that the comparison changes one thing only: the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import get_device

__all__ = [
    "LinearProbe",
    "train_linear_probe",
    "accuracy",
    "confusion_matrix",
    "leaf_class_histograms",
    "per_leaf_accuracy",
]


def _labels(pred: torch.Tensor) -> torch.Tensor:
    """Class ids from logits ``[N, C]`` or ids ``[N]``."""
    return pred.argmax(1) if pred.ndim == 2 else pred.long()


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose predicted class (logits ``[N, C]`` or ids ``[N]``) equals ``y``."""
    p = _labels(pred).cpu()
    y = y.cpu().long()
    if p.shape != y.shape:
        raise ValueError(f"predictions have shape {tuple(p.shape)} but labels {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined; pass at least one row")
    return float((p == y).float().mean())


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts: row = true class, column = predicted class."""
    p, t = _labels(pred).cpu(), y.cpu().long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def leaf_class_histograms(leaf: torch.Tensor, y: torch.Tensor, num_leaves: int, num_classes: int) -> torch.Tensor:
    """``[num_leaves, num_classes]``: how many rows of each class reached each leaf."""
    leaf, y = leaf.cpu().long(), y.cpu().long()
    if leaf.shape != y.shape:
        raise ValueError(f"leaf ids have shape {tuple(leaf.shape)} but labels {tuple(y.shape)}")
    return torch.bincount(leaf * num_classes + y, minlength=num_leaves * num_classes).reshape(num_leaves, num_classes)


def per_leaf_accuracy(leaf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accuracy [num_leaves], count [num_leaves])`` of the rows routed to each leaf (NaN where none)."""
    leaf = leaf.cpu().long()
    hit = (_labels(pred).cpu() == y.cpu().long()).float()
    count = torch.bincount(leaf, minlength=num_leaves)
    right = torch.bincount(leaf, weights=hit, minlength=num_leaves)
    acc = torch.where(count > 0, right / count.clamp(min=1), torch.full_like(right, float("nan")))
    return acc, count


@dataclass
class LinearProbe:
    """A trained linear head and how long training took."""

    layer: nn.Linear
    seconds: float
    epochs: int

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.layer.parameters())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dev = self.layer.weight.device
        return self.layer(x.to(dev)).cpu()


def train_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LinearProbe:
    """Train ``nn.Linear(d, num_classes)`` on features ``x [N, d]`` with AdamW and cross-entropy."""
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be [N, d] with one label per row, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = torch.device(device) if device is not None else get_device()
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x.shape[1], num_classes).to(dev)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / x.shape[1] ** 0.5
        layer.weight.copy_(torch.empty_like(layer.weight, device="cpu").uniform_(-bound, bound, generator=gen))
        layer.bias.copy_(torch.empty_like(layer.bias, device="cpu").uniform_(-bound, bound, generator=gen))
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    xd, yd = x.to(dev, torch.float32), y.to(dev).long()
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        order = torch.randperm(len(xd), generator=gen).to(dev)
        for rows in order.split(batch_size):
            loss = F.cross_entropy(layer(xd[rows]), yd[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LinearProbe(layer.eval(), time.perf_counter() - start, epochs)
