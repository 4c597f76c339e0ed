"""The image chapter's paper profile, end to end, on tiny datasets in torchvision's own formats.

``MOMLP_DATA`` points at tiny CIFAR-10, CIFAR-100 and Food-101 files; ``TORCH_HOME`` at a
**random-weight stand-in for DINOv2** (used only here, labeled in its own file: it makes the real
``torch.hub`` loading path run offline, its features mean nothing). The chapter is run as the GPU
script runs it — its sizes cell amended with one line naming the datasets — plus one line that
shrinks the heads to CPU-test size. Its code cells run in this process so that the test's patch
of torchvision's MD5 lists (tiny files have other checksums) applies.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from momlp_lite.data import PAPER_DATASETS

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torchvision")
pytest.importorskip("nbformat")

SHRINK = (
    'sizes.update(width=8, steps=3, batch=4, probe_epochs=2, workers=0, tree=(2, 2), sweep=[(0, 1), (2, 2)])'
    '  # CPU-test sizes\n'
    'config = replace(config, batch_size=sizes["batch"], max_steps=sizes["steps"], progress=False)\n'
)


def _gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_image_paper", ROOT / "benchmarks" / "gpu_image_paper.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _tiny_paper_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from test_features import install_stand_in_dinov2
    from test_image_data import write_cifar10, write_cifar100, write_food101

    data = tmp_path / "data"
    write_cifar10(data, monkeypatch, n_per_batch=6)
    write_cifar100(data, monkeypatch)
    write_food101(data, per_class=(5, 3))
    install_stand_in_dinov2(tmp_path / "torch", monkeypatch)
    _, weights = __import__("momlp_lite.data.features", fromlist=["dinov2_files"]).dinov2_files("dinov2_vits14")
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"stand-in: not DINOv2 weights")  # the GPU script checks the file is there
    monkeypatch.setenv("MOMLP_DATA", str(data))
    monkeypatch.setenv("MOMLP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MOMLP_PROFILE", "paper")
    monkeypatch.setenv("MOMLP_DEVICE", "cpu")
    return {"cifar10": 30 + 3, "cifar100": 6 + 2, "food101": 9 + 6}


def test_the_gpu_script_skips_datasets_without_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    gpu = _gpu_script()
    monkeypatch.setenv("MOMLP_DATA", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert gpu.run(["cifar10", "food101"]) == []
    out = capsys.readouterr().out
    assert "skip cifar10: " in out and "cifar-10-batches-py" in out and "skip food101: " in out
    assert "nothing run" in out
    _tiny_paper_data(tmp_path, monkeypatch)
    assert all(gpu.missing_files(name) is None for name in PAPER_DATASETS)
    (tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth").unlink()
    assert "DINOv2 ViT-S/14 is missing" in gpu.missing_files("cifar100")


def test_paper_profile_runs_end_to_end_on_tiny_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _tiny_paper_data(tmp_path, monkeypatch)
    nb = _gpu_script().paper_notebook(list(PAPER_DATASETS), extra=SHRINK)
    namespace: dict = {"__name__": "__chapter__"}
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():
        for cell in nb.cells[1:]:  # cell 0 installs the package in Colab (a %pip line)
            if cell.cell_type == "code":
                exec(compile(cell.source, "image_classification", "exec"), namespace)
    assert namespace["chapter"].profile.name == "paper" and namespace["sizes"]["datasets"] == list(PAPER_DATASETS)
    assert type(namespace["features"]["cifar10"]).__name__ == "FeatureSet"
    for name in PAPER_DATASETS:
        rec = json.loads((tmp_path / "results" / f"image_paper_{name}.json").read_text())
        assert rec["status"] == "measured" and rec["dataset"] == name and rec["extractor"] == "dinov2_vits14-224"
        assert rec["feature_images"] == images[name] and rec["feature_seconds"] > 0 and not rec["feature_cache_hit"]
        models = sorted((r["model"], r["experts"]) for r in rec["rows"])
        assert models == [("MoMLP", 1), ("MoMLP", 4), ("dense MLP", 1), ("dense MLP", 4), ("linear probe", 1)]
        assert all(0 <= r["accuracy"] <= 1 and r["params_active"] <= r["params_total"] for r in rec["rows"])
        assert rec["meta"]["device_type"] == "cpu"
    cache = sorted(p.name for p in (tmp_path / "data" / "features").iterdir())
    assert "food101-px224__dinov2_vits14-224__train.safetensors" in cache and len(cache) == 6
