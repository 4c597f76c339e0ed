"""Frozen image features (pixels, PCA, DINOv2), computed once and cached as checked safetensors files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..runtime import check_positive_int, get_device
from ..store.files import StoreError, load_expert_file, save_expert_file
from .images import ImageData, ImageSplit, data_root

__all__ = ["ExtractorUnavailableError", "PixelFeatures", "PCAFeatures", "DINOv2Features", "dinov2_files",
           "get_extractor", "FeatureSet", "feature_cache_path", "compute_features"]


class ExtractorUnavailableError(RuntimeError):
    """An extractor's weights are not here; the message says what to do. Taught in: book/image_classification."""


class PixelFeatures(nn.Module):
    """Pixels standardized by the training split's per-pixel mean and std. Taught in: book/image_classification."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps, self.key = float(eps), "pixels"
        self.register_buffer("mean", None)
        self.register_buffer("std", None)

    def fit(self, split: ImageSplit, batch_size: int = 256) -> "PixelFeatures":
        if len(split) == 0:
            raise ValueError("cannot fit features on an empty split")
        s1 = s2 = 0.0
        for xb in split.batches(batch_size):
            flat = xb.reshape(len(xb), -1).to(torch.float64)
            s1, s2 = s1 + flat.sum(0), s2 + (flat**2).sum(0)
        mean = s1 / len(split)
        std = (s2 / len(split) - mean**2).clamp(min=0).sqrt()
        self.mean = mean.to(torch.float32)
        self.std = torch.where(std < self.eps, torch.ones_like(std), std).to(torch.float32)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(train_split) first")
        flat = images.reshape(len(images), -1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(f"images have {flat.shape[1]} pixels but the extractor was fitted on {self.mean.numel()}")
        return (flat - self.mean) / self.std


class PCAFeatures(nn.Module):
    """Standardized pixels on the training split's top principal components. Taught in: book/image_classification."""

    def __init__(self, n_components: int = 32, whiten: bool = False) -> None:
        super().__init__()
        self.n_components, self.whiten = check_positive_int("n_components", n_components), bool(whiten)
        self.key = f"pca{n_components}" + ("w" if whiten else "")
        self.pixels = PixelFeatures()
        self.register_buffer("components", None)  # [D, k]
        self.register_buffer("scale", None)  # [k]
        self.register_buffer("explained_variance_ratio", None)

    def fit(self, split: ImageSplit, batch_size: int = 256) -> "PCAFeatures":
        self.pixels.fit(split, batch_size)
        gram = 0.0
        for xb in split.batches(batch_size):
            z = self.pixels(xb).to(torch.float64)
            gram = gram + z.T @ z
        if self.n_components > gram.shape[0]:
            raise ValueError(f"n_components={self.n_components} exceeds the {gram.shape[0]} pixel features; lower it")
        evals, evecs = torch.linalg.eigh(gram / len(split))  # ascending
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
        comps = evecs[:, : self.n_components]
        sign = torch.sign(comps[comps.abs().argmax(0), torch.arange(self.n_components)])  # deterministic signs
        self.components = (comps * sign).to(torch.float32)
        top = evals[: self.n_components]
        self.scale = (top.sqrt().clamp(min=1e-6) if self.whiten else torch.ones_like(top)).to(torch.float32)
        self.explained_variance_ratio = (top / evals.sum().clamp(min=1e-12)).to(torch.float32)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.components is None or self.scale is None:
            raise RuntimeError("PCAFeatures is not fitted: call .fit(train_split) first")
        return (self.pixels(images) @ self.components) / self.scale


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_REPO = "facebookresearch/dinov2"


def dinov2_files(model: str = "dinov2_vits14") -> tuple[Path, Path]:
    """``(code folder, weights file)`` of DINOv2 ``model`` in torch.hub. Taught in: book/image_classification."""
    hub = Path(torch.hub.get_dir())
    return hub / "facebookresearch_dinov2_main", hub / "checkpoints" / f"{model}_pretrain.pth"


class DINOv2Features(nn.Module):
    """A frozen DINOv2 backbone's class token (Oquab et al. 2023). Taught in: book/image_classification."""

    def __init__(self, model: str = "dinov2_vits14", image_size: int = 224,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if image_size % 14:
            raise ValueError(f"image_size must be a multiple of DINOv2's 14-pixel patches, got {image_size}")
        self.model_name, self.image_size, self.key = model, int(image_size), f"{model}-{image_size}"
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
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.to(torch.device(device) if device is not None else get_device())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self._mean.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"DINOv2 takes 1- or 3-channel images, got {x.shape[1]} channels")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.net((x - self._mean) / self._std).float()


def get_extractor(name: str, **kwargs: Any) -> nn.Module:
    """Extractor ``"pixels"``, ``"pca"`` or ``"dinov2"`` made with ``kwargs``. Taught in: book/image_classification."""
    makers = {"pixels": PixelFeatures, "pca": PCAFeatures, "dinov2": DINOv2Features}
    try:
        return makers[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown feature extractor {name!r}: choose one of {sorted(makers)}") from None


@dataclass
class FeatureSet:
    """Features ``[N, d]`` and labels of both splits, with the time taken. Taught in: book/image_classification."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
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
    try:
        tensors, meta = load_expert_file(path)
    except StoreError:
        return None  # absent, corrupted or interrupted: recompute and overwrite
    feats, labels = tensors.get("features"), tensors.get("labels")
    if meta != meta_want or feats is None or labels is None or not torch.equal(labels, split.labels.cpu()):
        return None
    return feats


def compute_features(data: ImageData, extractor: nn.Module,
                     cache_dir: str | os.PathLike[str] | None | bool = None, batch_size: int = 256,
                     device: torch.device | str | None = None, progress: bool = True,
                     num_workers: int = 0) -> FeatureSet:
    """Features of both splits, from the cache (default ``data_root() / "features"``; ``False``: none) or computed
    and cached. Taught in: book/image_classification."""
    check_positive_int("batch_size", batch_size)
    dev = torch.device(device) if device is not None else get_device()
    folder = None if cache_dir is False else Path(data_root() / "features" if cache_dir in (None, True) else cache_dir)
    feats: dict[str, torch.Tensor | None] = {}
    todo = []  # the splits not in the cache
    for name, split in (("train", data.train), ("test", data.test)):
        meta = {"dataset": data.tag, "extractor": extractor.key, "split": name, "count": str(len(split))}
        path = None if folder is None else feature_cache_path(folder, data.tag, extractor.key, name)
        feats[name] = None if path is None else _read_cache(path, split, meta)
        if feats[name] is None:
            todo.append((name, split, path, meta))
    start = time.perf_counter()
    if todo:
        if hasattr(extractor, "fit"):  # fitted on the training split (pixels, PCA); DINOv2 is frozen
            extractor.fit(data.train, batch_size)
        extractor.to(dev)
    for name, split, path, meta in todo:
        batches = tqdm(split.batches(batch_size, num_workers), total=-(-len(split) // batch_size),
                       desc=f"{extractor.key} features ({name})", disable=not progress, leave=False)
        with torch.no_grad():
            feats[name] = x = torch.cat([extractor(xb.to(dev)).to("cpu", torch.float32) for xb in batches])
        if path is not None:
            save_expert_file(path, {"features": x, "labels": split.labels.cpu()}, meta)
    return FeatureSet(feats["train"], data.train.labels.cpu(), feats["test"], data.test.labels.cpu(),
                      list(data.classes), extractor.key, not todo,
                      time.perf_counter() - start if todo else 0.0, sum(len(split) for _, split, _, _ in todo))
