"""Grid-regression helpers, recorded results, and the two benchmark scripts (run tiny, no timing claims)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from momlp_lite.data import make_grid_data
from momlp_lite.regression import (
    GridTask,
    compare_on_task,
    dense_config,
    evaluate_routed,
    fit_momlp,
    grid_setup,
    leaf_moments,
)
from momlp_lite.runtime import load_results, run_metadata, write_results
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.moe.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]



def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_leaf_moments():
    v = torch.tensor([[1.0], [3.0], [5.0], [7.0], [2.0]])
    leaf = torch.tensor([0, 0, 1, 1, 3])
    mean, std = leaf_moments(v, leaf, 4)
    assert mean[:, 0].tolist() == [2.0, 6.0, 0.0, 2.0]
    assert std[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0]  # empty leaf and single sample: std 1
    mean, std = leaf_moments(torch.tensor([[0.0], [4.0]]), torch.tensor([0, 0]), 1)
    assert float(std) == 2.0


def test_fit_momlp_reports_consistent_errors():
    data = make_grid_data("sine", 2, 12, seed=0)
    tree = RoutingTree.regular(2, 1, 2)
    cfg = TrainConfig(lr=3e-3, batch_size=8, max_steps=60, eval_every=20, progress=False, device="cpu")
    rep = fit_momlp(data, tree, 8, 2, cfg)
    assert rep.num_experts == 4 and rep.params_active == rep.model.parameters_per_expert + tree.path_parameter_count
    # the per-leaf RMSEs combine into the overall RMSE
    leaf = tree.route(data.x_test)
    counts = torch.bincount(leaf, minlength=4).numpy()
    combined = np.sqrt(np.nansum(rep.per_leaf_rmse**2 * counts) / counts.sum())
    assert combined == pytest.approx(rep.rmse, rel=1e-5)
    rmse, max_err, _ = evaluate_routed(rep.model, data.x_test, data.y_test, leaf)
    assert rmse == pytest.approx(rep.rmse) and max_err >= rmse
    # trained on standardised data, folded back: better than predicting the mean
    assert rep.rmse < 0.8 * float(data.y_test.std())


def test_dense_baseline_has_the_budget():
    task = GridTask("distance", 1, 64, 2)
    cfg = TrainConfig(lr=3e-3, batch_size=8, max_steps=20, eval_every=10, progress=False, device="cpu")
    moe, dense = compare_on_task(task, 8, 2, cfg)
    assert dense.params_total <= moe.params_total
    assert moe.params_active < dense.params_active
    assert dense.train.batch_size == 8 * 4 and dense.train.steps_run <= 20
    assert dense_config(cfg, 100, 50).batch_size == 50  # capped at the training set


def test_paper_profile_is_the_papers_setting():
    paper = grid_setup("paper")
    assert (paper.width, paper.hidden_layers) == (1000, 3)
    assert (paper.train.optimizer, paper.train.lr) == ("adam", 1e-4)
    smoke = grid_setup("smoke")
    assert {t.n for t in smoke.tasks} == {1, 2, 3} and smoke.width < 100


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
                      "--repeats", "1", "--serial-experts", "2", "--device", "cpu", "--name", "bench"])
    modes = {r["mode"] for r in out["rows"]}
    assert {"serial", "batched", "dense", "summary"} <= modes
    assert all(r["samples_per_s"] > 0 for r in out["rows"] if r["mode"] != "summary")
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["device_type"] == "cpu"


def test_paper_run_script_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MOMLP_RESULTS_DIR", str(tmp_path))
    script = load_script("grid_paper_run")
    path = script.main(["--profile", "smoke", "--targets", "sine", "--dims", "1", "--max-steps", "10",
                        "--no-sweep", "--device", "cpu", "--name", "grid"])
    doc = json.loads(Path(path).read_text())
    assert doc["profile"] == "smoke" and len(doc["comparison"]) == 2
    assert {r["model"] for r in doc["comparison"]} == {"MoMLP", "dense MLP"}
