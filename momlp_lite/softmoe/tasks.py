"""The Soft MoE experiments of Chung et al.: the ‖X‖₂ task (Theorem 1) and MNIST cut into 4 patches.

* :func:`norm_task_batch`, :class:`SoftMoERegressor`, :func:`train_norm_task` — Appendix C: one Soft MoE
  layer, then a fixed sum head, learning ``t(X) = ‖X‖₂``.
* :func:`patchify`, :func:`mnist_tokens`, :class:`SoftMoEClassifier`, :func:`train_classifier`,
  :func:`predict` — the authors' MNIST setup (4 tokens of 14×14 = 196 pixels, bias-free experts
  ``196 → ⌊784/n⌋ → 196``, a bias-free linear head).
* :func:`subset_masks`, :func:`oracle_correct` — Table 1's exhaustive best-subset oracle, batched.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.images import ImageSplit
from ..runtime import check_positive_int
from .layer import SoftMoE

__all__ = ["norm_task_batch", "SoftMoERegressor", "train_norm_task", "MNIST_MEAN", "MNIST_STD", "patchify",
           "mnist_tokens", "SoftMoEClassifier", "train_classifier", "predict", "subset_masks", "oracle_correct"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# ---------------------------------------------------------------------- Theorem 1: t(X) = ||X||_2
def norm_task_batch(batch: int, tokens: int, token_dim: int, variance: float = 5.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``X ~ N(0, variance·I)`` in ``ℝ^{tokens·token_dim}`` as ``[batch, tokens, token_dim]``, and ``‖X‖₂ [batch]``.

    Taught in: book/softmoe_one_expert (``variance=5`` and ``variance=25`` are the two readings of N(0, 5I)).
    """
    for name, value in dict(batch=batch, tokens=tokens, token_dim=token_dim).items():
        check_positive_int(name, value)
    if variance <= 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    x = torch.randn(batch, tokens, token_dim, generator=generator) * math.sqrt(variance)
    return x, x.flatten(1).norm(dim=1)


class SoftMoERegressor(nn.Module):
    """One Soft MoE layer followed by a **fixed** sum head (no residual, no trainable head).

    Experts are ``d → 10d/n → d`` without biases, so all experts hold ``20 d²`` weights for every ``n``
    dividing ``10d`` (Appendix C of Chung et al.). The router is Definition 1's (``normalize="none"``) by
    default. Taught in: book/softmoe_one_expert.
    """

    def __init__(self, token_dim: int, num_experts: int, *, normalize: str = "none",
                 generator: torch.Generator | None = None):
        super().__init__()
        if (10 * token_dim) % num_experts:
            raise ValueError(f"num_experts must divide 10·token_dim = {10 * token_dim} to keep 20·d² expert "
                             f"weights, got {num_experts}")
        self.moe = SoftMoE(token_dim, num_experts, 10 * token_dim // num_experts, normalize=normalize,
                           generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction ``[B]``: the sum of all output entries of the Soft MoE layer."""
        return self.moe(x).sum(dim=(1, 2))


def train_norm_task(num_experts: int, tokens: int, token_dim: int, *, epochs: int = 500, batch: int = 10_000,
                    lr: float = 1e-3, variance: float = 5.0, normalize: str = "none", seed: int = 0,
                    device: torch.device | str = "cpu", progress: bool = True) -> tuple[SoftMoERegressor, list[float]]:
    """Train :class:`SoftMoERegressor` on ``‖X‖₂``, one fresh batch per epoch (Adam, MSE).

    Returns the model and the training loss of every epoch. Taught in: book/softmoe_one_expert.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SoftMoERegressor(token_dim, num_experts, normalize=normalize, generator=gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc=f"n={num_experts}, {tokens}×{token_dim}", disable=not progress, leave=False):
        x, y = norm_task_batch(batch, tokens, token_dim, variance, gen)
        loss = F.mse_loss(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


# ---------------------------------------------------------------------- MNIST as 4 patches
def patchify(images: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Cut ``[N, H, W]`` images into ``patch × patch`` tokens ``[N, (H/patch)(W/patch), patch²]``, row by row.

    Taught in: book/softmoe_best_subset.
    """
    if images.dim() != 3 or images.shape[1] % patch or images.shape[2] % patch:
        raise ValueError(f"images must be [N, H, W] with H and W multiples of {patch}, got {list(images.shape)}")
    n, h, w = images.shape
    t = images.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
    return t.reshape(n, (h // patch) * (w // patch), patch * patch)


def mnist_tokens(split: ImageSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST :class:`~momlp_lite.data.images.ImageSplit` (uint8 ``[N, 1, 28, 28]``) as 4 tokens of 196 pixels.

    Pixels are scaled to [0, 1] and normalized with MNIST's mean and std (0.1307, 0.3081), as in the authors'
    code. Returns ``(x [N, 4, 196], labels [N])``. Taught in: book/softmoe_best_subset.
    """
    if not isinstance(split.images, torch.Tensor) or tuple(split.images.shape[1:]) != (1, 28, 28):
        raise ValueError("mnist_tokens needs an in-memory MNIST split of uint8 [N, 1, 28, 28] images, got "
                         f"{getattr(split.images, 'shape', type(split.images).__name__)}")
    x = (split.images[:, 0].to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return patchify(x).contiguous(), split.labels


class SoftMoEClassifier(nn.Module):
    """Patch tokens → one Soft MoE layer → flatten → bias-free linear head, as in the authors' MNIST code.

    Experts ``196 → hidden → 196`` without biases, ``hidden = max(1, ⌊196·4/n⌋)`` (the authors' ``int()``), so
    the experts hold about ``8·196² ≈ 307K`` weights (exactly for ``n ≤ 16``); ``Φ ~ U[-1, 1]``. ``normalize``:
    ``"tokens"`` is the authors' router (``normalize_moe_input=True``), ``"none"`` raw logits ``XΦ``.
    Taught in: book/softmoe_best_subset.
    """

    def __init__(self, num_experts: int, *, tokens: int = 4, dim: int = 196, hidden: int | None = None,
                 num_classes: int = 10, slots_per_expert: int = 1, normalize: str = "tokens",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        hidden = max(1, (dim * 4) // num_experts) if hidden is None else hidden
        self.moe = SoftMoE(dim, num_experts, hidden, slots_per_expert=slots_per_expert, normalize=normalize,
                           phi_init="uniform", generator=generator)
        self.head = nn.Linear(tokens * dim, num_classes, bias=False)
        bound = 1.0 / math.sqrt(tokens * dim)
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]`` for patch tokens ``[B, tokens, dim]``."""
        return self.head(self.moe(x).flatten(1))

    def expert_logits(self, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Each expert's share of the class logits, ``[B, n, num_classes]`` (computed ``chunk`` inputs at a time).

        The head is linear without bias and Algorithm 1 does not renormalize ``C``, so the logits with a kept
        subset ``S`` are exactly ``Σ_{j∈S}`` of these rows (all ``n`` rows give ``forward(x)``).
        """
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
    """Adam + cross-entropy for ``epochs`` epochs of optimizer steps; the mean training loss of every epoch.

    ``shuffle=False`` (default) visits the data in the same order every epoch, like the authors' loader. Their
    loop also runs one epoch without any optimizer step first; it changes no weight, so it is not run here.
    Taught in: book/softmoe_best_subset.
    """
    check_positive_int("epochs", epochs)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(y), generator=gen) if shuffle else torch.arange(len(y))
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
    """Predicted classes ``[N]`` (eval mode, in chunks of ``batch``). Taught in: book/softmoe_best_subset."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(x[i : i + batch].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch)])


# ---------------------------------------------------------------------- Table 1: the exhaustive oracle
def subset_masks(n: int, k: int) -> torch.Tensor:
    """All ``C(n, k)`` subsets of ``k`` of ``n`` experts as 0/1 rows ``[C(n, k), n]``. Taught in: book/softmoe_best_subset."""
    check_positive_int("n", n)
    check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k = {k} is larger than n = {n}; use 1 <= k <= n")
    combos = torch.tensor(list(itertools.combinations(range(n), k)))
    return torch.zeros(len(combos), n).scatter_(1, combos, 1.0)


@torch.no_grad()
def oracle_correct(expert_logits: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Table 1's oracle: ``[N]`` bool, True where **some** ``k``-subset of the experts predicts the label.

    ``expert_logits [N, n, classes]`` as from :meth:`SoftMoEClassifier.expert_logits`; all subsets are scored at
    once (one matmul per chunk of inputs). Taught in: book/softmoe_best_subset.
    """
    masks = subset_masks(expert_logits.shape[1], k).to(expert_logits)
    out = []
    for start in range(0, len(labels), chunk):
        logits = torch.einsum("sn,bnc->bsc", masks, expert_logits[start : start + chunk])  # [b, subsets, classes]
        out.append((logits.argmax(dim=2) == labels[start : start + chunk, None].to(logits.device)).any(dim=1))
    return torch.cat(out).cpu()
