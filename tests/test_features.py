"""Feature extractors and the on-disk feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from momlp_lite.data import features as fm
from momlp_lite.data import ImageData, ImageSplit, load_image_data
from momlp_lite.data.features import (
    DINOv2Features,
    ExtractorUnavailableError,
    PCAFeatures,
    PixelFeatures,
    compute_features,
    feature_cache_path,
    get_extractor,
)


def _toy_data(n_train: int = 60, n_test: int = 20, tag: str = "toy") -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 1, 4, 4), generator=g, dtype=torch.uint8)
    x[:, :, 0, 0] = 7  # a constant pixel
    y = torch.randint(0, 3, (n_train + n_test,), generator=g)
    return ImageData("toy", ImageSplit(x[:n_train], y[:n_train]), ImageSplit(x[n_train:], y[n_train:]), ["a", "b", "c"], tag)


class CountingPixels(PixelFeatures):
    """PixelFeatures that counts the image batches it is called on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().__call__(images)


# ---------------------------------------------------------------------------- extractors
def test_pixel_features_are_standardized() -> None:
    d = _toy_data()
    f = PixelFeatures().fit(d.train, batch_size=7)
    z = f(next(d.train.batches(1000)))
    assert z.shape == (60, 16)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(z[:, 1:].std(0, unbiased=False), torch.ones(15), atol=1e-4)
    assert torch.all(z[:, 0] == 0)  # the constant pixel is centered, not blown up
    with pytest.raises(ValueError, match="fitted on 16"):
        f(torch.zeros(2, 1, 5, 5))
    with pytest.raises(RuntimeError, match="not fitted"):
        PixelFeatures()(torch.zeros(1, 1, 4, 4))


def test_pca_matches_an_svd_of_the_standardized_pixels() -> None:
    d = load_image_data("digits")
    pca = PCAFeatures(5).fit(d.train, batch_size=100)
    z = PixelFeatures().fit(d.train)(next(d.train.batches(10_000))).double()
    z = z - z.mean(0)
    _, s, vt = torch.linalg.svd(z, full_matrices=False)
    proj = pca(next(d.train.batches(10_000))).double()
    ref = z @ vt[:5].T
    # same subspace and variances up to the sign of each component
    assert torch.allclose(proj.abs(), ref.abs(), atol=1e-3)
    assert torch.allclose(proj.var(0, unbiased=False), (s[:5] ** 2 / len(z)), rtol=1e-3)
    assert pca.explained_variance_ratio is not None and 0 < float(pca.explained_variance_ratio.sum()) < 1
    white = PCAFeatures(5, whiten=True).fit(d.train)
    assert torch.allclose(white(next(d.train.batches(10_000))).var(0, unbiased=False), torch.ones(5), atol=1e-3)
    with pytest.raises(ValueError, match="exceeds the 64"):
        PCAFeatures(65).fit(d.train)


def test_get_extractor() -> None:
    assert get_extractor("pca", n_components=3).key == "pca3"
    assert get_extractor("pixels").key == "pixels"
    with pytest.raises(ValueError, match="unknown feature extractor 'vit'"):
        get_extractor("vit")


def test_dinov2_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(ExtractorUnavailableError, match="could not load DINOv2 'dinov2_vits14'") as err:
        DINOv2Features(device="cpu")
    assert "PCAFeatures" in str(err.value) and "name resolution" in str(err.value)


def test_dinov2_preprocessing_with_a_stand_in_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub model is replaced by a probe that records what it is fed."""
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.mean((2, 3)) * self.w

    calls = []
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kw: calls.append((repo, model)) or Probe())
    ext = DINOv2Features("dinov2_vitb14", image_size=28, device="cpu")
    assert calls == [("facebookresearch/dinov2", "dinov2_vitb14")] and ext.key == "dinov2_vitb14-28"
    gray = torch.full((2, 1, 8, 8), 0.5)
    out = ext(gray)
    assert seen[-1].shape == (2, 3, 28, 28)
    expected = (0.5 - torch.tensor(fm._IMAGENET_MEAN)) / torch.tensor(fm._IMAGENET_STD)
    assert torch.allclose(out, expected.expand(2, 3), atol=1e-5)
    assert not any(p.requires_grad for p in ext.net.parameters())
    with pytest.raises(ValueError, match="multiple of"):
        DINOv2Features(image_size=30, device="cpu")


# ---------------------------------------------------------------------------- caching
def test_features_are_computed_once_then_read_from_the_cache(tmp_path: Path) -> None:
    d = _toy_data()
    ext = CountingPixels()
    first = compute_features(d, ext, cache_dir=tmp_path, batch_size=16, device="cpu", progress=False)
    assert not first.cached and ext.calls == 4 + 2  # ceil(60/16) + ceil(20/16) batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy__pixels__test.safetensors", "toy__pixels__train.safetensors"]
    ext2 = CountingPixels()
    second = compute_features(d, ext2, cache_dir=tmp_path, batch_size=16, device="cpu", progress=False)
    assert second.cached and ext2.calls == 0 and ext2.mean is None  # not even fitted
    assert torch.equal(second.x_train, first.x_train) and torch.equal(second.y_test, d.test.labels)
    assert first.dim == 16 and first.num_classes == 3


def test_cache_is_keyed_by_dataset_extractor_and_split(tmp_path: Path) -> None:
    a, b = _toy_data(tag="toy-a"), _toy_data(tag="toy-b")
    compute_features(a, PixelFeatures(), cache_dir=tmp_path, progress=False, device="cpu")
    compute_features(a, PCAFeatures(3), cache_dir=tmp_path, progress=False, device="cpu")
    ext = CountingPixels()
    compute_features(b, ext, cache_dir=tmp_path, progress=False, device="cpu")
    assert ext.calls > 0  # another dataset tag: not a cache hit
    assert len(list(tmp_path.iterdir())) == 6
    with pytest.raises(ValueError, match="cannot be part of a file name"):
        feature_cache_path(tmp_path, "../x", "pixels", "train")


def test_corrupted_or_stale_cache_is_recomputed(tmp_path: Path) -> None:
    d = _toy_data()
    good = compute_features(d, PixelFeatures(), cache_dir=tmp_path, progress=False, device="cpu")
    path = feature_cache_path(tmp_path, "toy", "pixels", "test")
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    ext = CountingPixels()
    again = compute_features(d, ext, cache_dir=tmp_path, batch_size=100, progress=False, device="cpu")
    assert ext.calls == 1 and not again.cached  # only the damaged split is recomputed
    assert torch.allclose(again.x_test, good.x_test)
    # same tag but other images (e.g. a changed dataset on disk): labels differ -> recompute
    other = _toy_data()
    other.test.labels[:] = (other.test.labels + 1) % 3
    ext = CountingPixels()
    compute_features(other, ext, cache_dir=tmp_path, batch_size=100, progress=False, device="cpu")
    assert ext.calls == 1


def test_interrupted_cache_write_leaves_no_half_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _toy_data()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        compute_features(d, PixelFeatures(), cache_dir=tmp_path, progress=False, device="cpu")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert not compute_features(d, PixelFeatures(), cache_dir=tmp_path, progress=False, device="cpu").cached


def test_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOMLP_DATA", str(tmp_path))
    compute_features(_toy_data(), PixelFeatures(), cache_dir=False, progress=False, device="cpu")
    assert list(tmp_path.iterdir()) == []
    compute_features(_toy_data(), PixelFeatures(), progress=False, device="cpu")  # default: $MOMLP_DATA/features
    assert len(list((tmp_path / "features").iterdir())) == 2


# ---------------------------------------------------------------------------- DINOv2 through torch.hub's files
STAND_IN_HUBCONF = '''
"""RANDOM-WEIGHT STAND-IN for DINOv2, written by a test: NOT the DINOv2 backbone.

It has DINOv2's interface (a hub entry point per model, 14-pixel patches, a 384-d output for ViT-S/14)
so that the real loading code runs offline; its features mean nothing.
"""
import torch

dependencies = ["torch"]


class StandIn(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patch = torch.nn.Conv2d(3, dim, 14, stride=14)
        with torch.no_grad():
            self.patch.weight.copy_(torch.randn(self.patch.weight.shape, generator=g) * 0.05)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        assert x.shape[-1] % 14 == 0 and x.shape[-2] % 14 == 0
        return self.patch(x).mean((2, 3))


def dinov2_vits14(**kwargs):
    return StandIn(384)
'''


def install_stand_in_dinov2(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a random-weight stand-in where torch.hub keeps DINOv2's code (``$TORCH_HOME/hub``); tests only."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    code, _ = fm.dinov2_files("dinov2_vits14")
    code.mkdir(parents=True, exist_ok=True)
    (code / "hubconf.py").write_text(STAND_IN_HUBCONF)
    return code


def test_dinov2_offline_error_names_the_code_and_the_weights_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(ExtractorUnavailableError) as err:
        DINOv2Features(device="cpu")
    msg = str(err.value)
    code, weights = fm.dinov2_files("dinov2_vits14")
    assert code == tmp_path / "hub" / "facebookresearch_dinov2_main"
    assert weights == tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert repr(str(code)) in msg and repr(str(weights)) in msg and "facebookresearch/dinov2" in msg
    assert "TORCH_HOME" in msg and "PixelFeatures()" in msg


def test_dinov2_is_loaded_from_the_local_hub_folder_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_stand_in_dinov2(tmp_path, monkeypatch)
    real_load = torch.hub.load
    sources = []
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kw: sources.append(kw.get("source")) or real_load(repo, model, **kw))
    ext = DINOv2Features(device="cpu", image_size=28)
    assert sources == ["local"] and type(ext.net).__name__ == "StandIn"
    out = ext(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 384) and ext.net.calls == 1


def test_feature_cache_through_the_real_loader_is_hit_on_the_second_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny CIFAR-10 in torchvision's own format -> load_image_data -> DINOv2Features (random stand-in) -> cache."""
    from test_image_data import write_cifar10

    write_cifar10(tmp_path / "data", monkeypatch)
    install_stand_in_dinov2(tmp_path / "torch", monkeypatch)
    monkeypatch.setenv("MOMLP_DATA", str(tmp_path / "data"))
    d = load_image_data("cifar10", download=False)
    first_ext = DINOv2Features(device="cpu", image_size=28)
    first = compute_features(d, first_ext, batch_size=8, device="cpu", progress=False)
    assert not first.cached and first_ext.net.calls == 3 + 1 and first.images == 23 and first.seconds > 0
    names = sorted(p.name for p in (tmp_path / "data" / "features").iterdir())
    assert names == ["cifar10__dinov2_vits14-28__test.safetensors", "cifar10__dinov2_vits14-28__train.safetensors"]
    second_ext = DINOv2Features(device="cpu", image_size=28)
    second = compute_features(load_image_data("cifar10", download=False), second_ext, batch_size=8, device="cpu",
                              progress=False)
    assert second.cached and second_ext.net.calls == 0 and second.images == 0 and second.seconds == 0.0
    assert torch.equal(second.x_train, first.x_train) and torch.equal(second.x_test, first.x_test)
    other = compute_features(d, DINOv2Features(device="cpu", image_size=42), batch_size=8, device="cpu", progress=False)
    assert not other.cached  # another resolution is another backbone key: not a cache hit
