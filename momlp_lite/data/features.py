"""Frozen features for image classification, computed once and cached on disk.

Kratsios et al. classify CIFAR-10/100 and Food-101 with MoMLP heads on *frozen* backbone features,
following Oquab et al. (DINOv2). A :class:`FeatureExtractor` maps float image batches ``[B, C, H, W]``
in [0, 1] to vectors ``[B, d]``: :class:`DINOv2Features` (a ``torch.hub`` backbone; offline it raises
:class:`ExtractorUnavailableError`, never falls back), :class:`PixelFeatures` (standardized pixels) and
:class:`PCAFeatures` (their top principal components). :func:`compute_features` runs one over both
splits with a progress bar and caches the result as checked safetensors files keyed by dataset tag,
extractor key and split, written atomically.

Taught in: book/image_classification.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime import get_device
from .images import ImageData, ImageSplit, data_root
from ..store.experts import StoreError, load_expert_file, save_expert_file

__all__ = [
    "ExtractorUnavailableError",
    "FeatureExtractor",
    "PixelFeatures",
    "PCAFeatures",
    "DINOv2Features",
    "dinov2_files",
    "get_extractor",
    "FeatureSet",
    "feature_cache_path",
    "compute_features",
]


class ExtractorUnavailableError(RuntimeError):
    """A feature extractor's weights cannot be had on this machine; the message says what to do.

    Taught in: book/image_classification.
    """


class FeatureExtractor:
    """Base class: ``fit`` on training images (if needed), then call on image batches.

    Taught in: book/image_classification.
    """

    key: str = "base"
    needs_fit: bool = False

    def fit(self, split: ImageSplit, batch_size: int = 256) -> "FeatureExtractor":
        """Learn what the extractor needs from the training images (default: nothing)."""
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to(self, device: torch.device) -> "FeatureExtractor":
        """Move internal tensors to ``device`` (default: nothing to move)."""
        return self


class PixelFeatures(FeatureExtractor):
    """Flattened pixels, standardized with the training set's per-pixel mean and std.

    Pixels that never vary in training (std below ``eps``) are only centered.
    Taught in: book/image_classification.
    """

    needs_fit = True

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = float(eps)
        self.key = "pixels"
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def fit(self, split: ImageSplit, batch_size: int = 256) -> "PixelFeatures":
        total = torch.zeros((), dtype=torch.float64)
        s1: torch.Tensor | None = None
        s2: torch.Tensor | None = None
        for xb in split.batches(batch_size):
            flat = xb.reshape(len(xb), -1).to(torch.float64)
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = (flat**2).sum(0) if s2 is None else s2 + (flat**2).sum(0)
            total += len(xb)
        if s1 is None or s2 is None:
            raise ValueError("cannot fit features on an empty split")
        mean = s1 / total
        var = (s2 / total - mean**2).clamp(min=0)
        std = var.sqrt()
        self.mean = mean.to(torch.float32)
        self.std = torch.where(std < self.eps, torch.ones_like(std), std).to(torch.float32)
        return self

    def _check_fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(train_split) first")
        return self.mean, self.std

    def to(self, device: torch.device) -> "PixelFeatures":
        if self.mean is not None and self.std is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._check_fitted()
        flat = images.reshape(len(images), -1)
        if flat.shape[1] != mean.numel():
            raise ValueError(f"images have {flat.shape[1]} pixels but the extractor was fitted on {mean.numel()}")
        return (flat - mean) / std


class PCAFeatures(FeatureExtractor):
    """Standardized pixels projected on the top ``n_components`` principal components of the training set.

    The covariance is accumulated batch by batch (float64), so any dataset size fits in memory.
    Taught in: book/image_classification.
    """

    needs_fit = True

    def __init__(self, n_components: int = 32, whiten: bool = False) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
        self.n_components = n_components
        self.whiten = bool(whiten)
        self.key = f"pca{n_components}" + ("w" if whiten else "")
        self.pixels = PixelFeatures()
        self.components: torch.Tensor | None = None  # [D, k]
        self.scale: torch.Tensor | None = None  # [k]
        self.explained_variance_ratio: torch.Tensor | None = None

    def fit(self, split: ImageSplit, batch_size: int = 256) -> "PCAFeatures":
        self.pixels.fit(split, batch_size)
        gram: torch.Tensor | None = None
        for xb in split.batches(batch_size):
            z = self.pixels(xb).to(torch.float64)
            gram = z.T @ z if gram is None else gram + z.T @ z
        assert gram is not None  # pixels.fit refused an empty split
        dim = gram.shape[0]
        if self.n_components > dim:
            raise ValueError(f"n_components={self.n_components} exceeds the {dim} pixel features; lower it")
        evals, evecs = torch.linalg.eigh(gram / len(split))  # ascending
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
        comps = evecs[:, : self.n_components]
        sign = torch.sign(comps[comps.abs().argmax(0), torch.arange(self.n_components)])  # deterministic signs
        self.components = (comps * sign).to(torch.float32)
        top = evals[: self.n_components]
        self.scale = (top.sqrt().clamp(min=1e-6) if self.whiten else torch.ones_like(top)).to(torch.float32)
        self.explained_variance_ratio = (top / evals.sum().clamp(min=1e-12)).to(torch.float32)
        return self

    def to(self, device: torch.device) -> "PCAFeatures":
        self.pixels.to(device)
        if self.components is not None and self.scale is not None:
            self.components, self.scale = self.components.to(device), self.scale.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.components is None or self.scale is None:
            raise RuntimeError("PCAFeatures is not fitted: call .fit(train_split) first")
        return (self.pixels(images) @ self.components) / self.scale


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_REPO = "facebookresearch/dinov2"


def dinov2_files(model: str = "dinov2_vits14") -> tuple[Path, Path]:
    """Where ``torch.hub`` keeps DINOv2's code and ``model``'s weights: ``(code folder, weights file)``.

    Taught in: book/image_classification.
    """
    hub = Path(torch.hub.get_dir())
    return hub / "facebookresearch_dinov2_main", hub / "checkpoints" / f"{model}_pretrain.pth"


class DINOv2Features(FeatureExtractor):
    """A frozen DINOv2 backbone from ``torch.hub`` (Oquab et al. 2023): the class-token embedding.

    Images are resized (bicubic) to ``image_size``, a multiple of the 14-pixel patch, gray images are
    repeated to three channels, and the ImageNet mean/std are applied, as in DINOv2's linear
    evaluation. When the code folder of :func:`dinov2_files` exists it is loaded from there
    (``source="local"``, no network); otherwise ``torch.hub`` fetches code and weights. Where neither
    works this raises :class:`ExtractorUnavailableError` naming both files and where they go.
    Taught in: book/image_classification.
    """

    def __init__(self, model: str = "dinov2_vits14", image_size: int = 224, device: torch.device | str | None = None) -> None:
        if image_size % 14:
            raise ValueError(f"image_size must be a multiple of DINOv2's 14-pixel patches, got {image_size}")
        self.model_name = model
        self.image_size = int(image_size)
        self.key = f"{model}-{image_size}"
        self.device = torch.device(device) if device is not None else get_device()
        code, weights = dinov2_files(model)
        try:
            if (code / "hubconf.py").is_file():
                net = torch.hub.load(str(code), model, source="local")
            else:
                net = torch.hub.load(DINOV2_REPO, model, trust_repo=True)
        except Exception as exc:  # network errors, missing cache, unknown model name, ...
            raise ExtractorUnavailableError(
                f"could not load DINOv2 {model!r} through torch.hub ({type(exc).__name__}: {exc}). To fix it, run "
                f"torch.hub.load({DINOV2_REPO!r}, {model!r}) once on a machine with internet and copy what it "
                f"writes here: the code to {str(code)!r} and the weights to {str(weights)!r} (set $TORCH_HOME to "
                "move both). Offline, choose another extractor explicitly: PixelFeatures() or PCAFeatures(k)."
            ) from exc
        self.net = net.eval().to(self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def to(self, device: torch.device) -> "DINOv2Features":
        self.device = torch.device(device)
        self.net = self.net.to(self.device)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"DINOv2 takes 1- or 3-channel images, got {x.shape[1]} channels")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.net((x - self._mean) / self._std).float()


def get_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build an extractor by name: ``"pixels"``, ``"pca"`` (``n_components=``) or ``"dinov2"`` (``model=``).

    Taught in: book/image_classification.
    """
    makers = {"pixels": PixelFeatures, "pca": PCAFeatures, "dinov2": DINOv2Features}
    try:
        return makers[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown feature extractor {name!r}: choose one of {sorted(makers)}") from None


@dataclass
class FeatureSet:
    """Features ``[N, d]`` (float32, CPU) and labels ``[N]`` of both splits.

    ``seconds`` is the measured wall time of fitting and extracting (0 when both splits came from
    the cache), ``images`` how many images were extracted in that time. Taught in: book/image_classification.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    dataset: str
    extractor: str
    cached: bool  # True when both splits came from the cache
    seconds: float = 0.0
    images: int = 0

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def feature_cache_path(cache_dir: str | os.PathLike[str], dataset_tag: str, extractor_key: str, split: str) -> Path:
    """``<cache_dir>/<dataset tag>__<extractor key>__<split>.safetensors``. Taught in: book/image_classification."""
    for what, value in [("dataset tag", dataset_tag), ("extractor key", extractor_key), ("split", split)]:
        if not value or any(c in value for c in "/\\\0") or value.startswith("."):
            raise ValueError(f"{what} {value!r} cannot be part of a file name")
    return Path(cache_dir) / f"{dataset_tag}__{extractor_key}__{split}.safetensors"


def _read_cache(path: Path, split: ImageSplit, meta_want: dict[str, str]) -> torch.Tensor | None:
    """Cached features for ``split``, or None when absent, corrupted or not for these images."""
    if not path.is_file():
        return None
    try:
        tensors, meta = load_expert_file(path)
    except StoreError:
        return None  # corrupted or interrupted: recompute and overwrite
    feats, labels = tensors.get("features"), tensors.get("labels")
    if meta != meta_want or feats is None or labels is None or not torch.equal(labels, split.labels.cpu()):
        return None
    return feats


@torch.no_grad()
def _extract(extractor: FeatureExtractor, split: ImageSplit, batch_size: int, device: torch.device, desc: str,
             progress: bool, num_workers: int) -> torch.Tensor:
    out = []
    total = -(-len(split) // batch_size)
    for xb in tqdm(split.batches(batch_size, num_workers), total=total, desc=desc, disable=not progress, leave=False):
        out.append(extractor(xb.to(device)).to("cpu", torch.float32))
    return torch.cat(out)


def compute_features(
    data: ImageData,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None | bool = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> FeatureSet:
    """Features of both splits of ``data``, from the cache when there, else computed once and cached.

    Parameters
    ----------
    cache_dir : path, None or False
        Where cached features live (default ``data_root() / "features"``); ``False`` disables caching.
        A cache file that is corrupted, truncated or belongs to other images is recomputed and replaced.
    device : device, optional
        Where the extractor runs (default :func:`momlp_lite.runtime.get_device`); results are on CPU.
    num_workers : int
        Processes decoding lazily read images (Food-101's JPEGs); 0 decodes in this process.

    Taught in: book/image_classification.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else get_device()
    folder = None if cache_dir is False else Path(data_root() / "features" if cache_dir in (None, True) else cache_dir)  # type: ignore[arg-type]
    splits = {"train": data.train, "test": data.test}
    feats: dict[str, torch.Tensor | None] = {}
    metas: dict[str, dict[str, str]] = {}
    for name, split in splits.items():
        metas[name] = {"dataset": data.tag, "extractor": extractor.key, "split": name, "count": str(len(split))}
        feats[name] = None if folder is None else _read_cache(feature_cache_path(folder, data.tag, extractor.key, name), split, metas[name])
    cached = all(f is not None for f in feats.values())
    start, extracted = time.perf_counter(), 0
    if not cached:
        if extractor.needs_fit:
            extractor.fit(data.train, batch_size)
        extractor.to(dev)
        for name, split in splits.items():
            if feats[name] is None:
                x = _extract(extractor, split, batch_size, dev, f"{extractor.key} features ({name})", progress,
                             num_workers)
                feats[name], extracted = x, extracted + len(x)
                if folder is not None:
                    save_expert_file(
                        feature_cache_path(folder, data.tag, extractor.key, name),
                        {"features": x, "labels": split.labels.cpu()},
                        metas[name],
                    )
    x_train, x_test = feats["train"], feats["test"]
    assert x_train is not None and x_test is not None
    seconds = time.perf_counter() - start if not cached else 0.0
    return FeatureSet(x_train, data.train.labels.cpu(), x_test, data.test.labels.cpu(), list(data.classes), data.tag,
                      extractor.key, cached, seconds, extracted)
