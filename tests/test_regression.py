"""The grid chapter's primitives (per-leaf standardization, the one-leaf dense baseline), its paper profile,
recorded results, and the two benchmark scripts (run tiny, no timing claims)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import torch

from momlp_lite.data.grid import leaf_moments, make_grid_data
from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.moe.trainer import TrainConfig, train_experts
from momlp_lite.runtime import load_results, run_metadata, write_results

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "book" / "momlp_grid_regression.ipynb"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_standardized_experts_fold_back_to_raw_inputs():
    """What the grid chapter's fit() does: train on per-leaf standardized data, fold the maps into the weights;
    the folded experts on raw inputs predict what the trained experts predict on standardized inputs."""
    data = make_grid_data("sine", 2, 12, seed=0)
    tree = RoutingTree.regular(2, 1, 2)
    leaf = tree.route(data.x_train)
    mx, sx = leaf_moments(data.x_train, leaf, 4)
    my, sy = leaf_moments(data.y_train, leaf, 4)
    model = StackedMLP(4, 2, 8, 2, 1, seed=0)
    cfg = TrainConfig(lr=3e-3, batch_size=8, max_steps=60, eval_every=20, progress=False, device="cpu")
    train_experts(model, (data.x_train - mx[leaf]) / sx[leaf], (data.y_train - my[leaf]) / sy[leaf], leaf, cfg)
    model.eval()
    test_leaf = tree.route(data.x_test)
    with torch.no_grad():
        standardized = model.forward_routed((data.x_test - mx[test_leaf]) / sx[test_leaf], test_leaf)
        folded = model.fold_affine_(mx, sx, my, sy).forward_routed(data.x_test, test_leaf)
    torch.testing.assert_close(folded, standardized * sy[test_leaf] + my[test_leaf], rtol=1e-4, atol=1e-5)
    rmse = float((folded - data.y_test).pow(2).mean().sqrt())
    assert rmse < 0.8 * float(data.y_test.std())  # better than predicting the mean


def test_dense_baseline_is_a_one_leaf_momlp_with_the_budget():
    experts = StackedMLP(4, 1, 8, 2, 1)
    dense = StackedMLP.dense_with_budget(4 * experts.parameters_per_expert, 1, 2, 1)
    single = RoutingTree.single(1)
    assert dense.num_experts == 1 and single.parameter_count == 0 and single.path_parameter_count == 0
    assert dense.parameters_per_expert <= 4 * experts.parameters_per_expert
    assert experts.parameters_per_expert < dense.parameters_per_expert
    assert torch.equal(single.route(torch.rand(9, 1)), torch.zeros(9, dtype=torch.long))


def chapter_sizes(profile: str, monkeypatch) -> dict:
    """Execute the grid chapter's sizes cell (its ml.choose cell) under ``profile``."""
    monkeypatch.setenv("MOMLP_PROFILE", profile)
    nb = nbformat.read(CHAPTER, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "sizes = ml.choose(" in c.source)
    names: dict = {}
    exec(compile(cell, "sizes-cell", "exec"), names)
    return names


def test_paper_profile_is_the_papers_setting(monkeypatch):
    paper = chapter_sizes("paper", monkeypatch)
    assert (paper["sizes"]["width"], paper["hidden_layers"]) == (1000, 3)
    assert (paper["train"].optimizer, paper["train"].lr) == ("adam", 1e-4)
    smoke = chapter_sizes("smoke", monkeypatch)
    assert {t[1] for t in smoke["sizes"]["tasks"]} == {1, 2, 3} and smoke["sizes"]["width"] < 100


def test_results_roundtrip(tmp_path):
    path = write_results("demo", {"rows": [1, 2]}, "cpu", directory=tmp_path)
    doc = load_results("demo", directory=tmp_path)
    assert doc["rows"] == [1, 2] and doc["meta"]["device_type"] == "cpu"
    assert {"device", "torch", "date_utc", "commit"} <= set(doc["meta"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
    assert load_results("missing", directory=tmp_path) is None
    assert run_metadata()["torch"] == torch.__version__


def test_benchmark_script_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MOMLP_RESULTS_DIR", str(tmp_path))
    bench = load_script("experts_training")
    out = bench.main(["--width", "8", "--experts", "2", "--batches", "4", "--steps", "2", "--warmup", "1",
                      "--repeats", "1", "--serial-experts", "2", "--device", "cpu", "--name", "bench", "--trainers",
                      "--trainer-steps", "4"])
    modes = {r["mode"] for r in out["rows"]}
    assert {"serial", "batched", "dense", "summary", "trainers"} <= modes
    assert all(r["samples_per_s"] > 0 for r in out["rows"] if r["mode"] not in ("summary", "trainers"))
    trainers = [r for r in out["rows"] if r["mode"] == "trainers"][0]
    assert trainers["ratio_lockstep_over_serial"] > 0 and trainers["steps"] == 4
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["device_type"] == "cpu"


def test_paper_run_script_executes_the_chapter_itself():
    plan = load_script("grid_paper_run").main(["--dry-run"])
    assert plan["chapter"] == "book/momlp_grid_regression.ipynb" and plan["profile"] == "paper"
    assert plan["writes"] == "momlp_lite/results/grid_paper_run.json"
    source = (ROOT / "benchmarks" / "grid_paper_run.py").read_text()
    assert "train_experts" not in source and "momlp_lite.moe" not in source  # no experiment driver of its own
    nb = nbformat.read(CHAPTER, as_version=4)
    assert any('write_results("grid_paper_run"' in c.source for c in nb.cells if c.cell_type == "code")
