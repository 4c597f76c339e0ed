"""The adversarial suite for the store, the run config and the CLI (issue 15, items 5 and 7).

Every case asserts the error's type and that its message names the bad value (or entry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from momlp_lite.distributed.cli import main
from momlp_lite.distributed.config import ConfigError, parse_run_config
from momlp_lite.moe.experts import StackedMLP
from momlp_lite.moe.routing import RoutingTree
from momlp_lite.store.experts import MANIFEST_NAME, ExpertStore, write_manifest
from momlp_lite.store.files import StoreError, save_expert_file

GOOD = {
    "seed": 3,
    "data": {"kind": "grid", "target": "sine", "n": 2, "s": 8},
    "routing": {"kind": "regular", "depth": 1, "branching": 2},
    "experts": {"width": 4, "hidden_layers": 2},
    "train": {"optimizer": "adam", "lr": 1e-3, "max_epochs": 2, "batch_size": 8},
    "run": {"output_dir": "out", "experts_per_step": 2},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store") / "s"
    ExpertStore.save(folder, StackedMLP(4, 3, 8, 2, 2, seed=0), RoutingTree.from_data(
        torch.randn(100, 3, generator=torch.Generator().manual_seed(0)), depth=1, branching=4))
    return folder


def _copy(saved: Path, tmp_path: Path, edit) -> Path:
    """A copy of the store whose manifest ``edit(doc)`` changed."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved, folder, ignore=shutil.ignore_patterns(".store.lock", ".writers"))
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    edit(doc)
    (folder / MANIFEST_NAME).write_text(json.dumps(doc))
    return folder


# ---------------------------------------------------------------------------- predict: 8 cases
@pytest.mark.parametrize("x, kind, named", [
    (np.zeros((5, 3), dtype=np.float32), TypeError, "numpy.ndarray"),
    ([[0.0, 0.0, 0.0]], TypeError, "builtins.list"),
    (torch.zeros(5, 4), ValueError, "(5, 4)"),
    (torch.zeros(5), ValueError, "(5,)"),
    (torch.zeros(5, 3, dtype=torch.int64), ValueError, "torch.int64"),
    (torch.tensor([[0.0, float("nan"), 0.0]]), ValueError, "NaN"),
    (torch.tensor([[0.0, float("inf"), 0.0]] * 2), ValueError, "2 rows"),
])
def test_predict_refuses_bad_inputs(saved: Path, x, kind: type, named: str) -> None:
    with pytest.raises(kind) as err:
        ExpertStore(saved).predict(x, device="cpu")
    assert named in str(err.value)


def test_expert_path_names_the_missing_id(saved: Path) -> None:
    with pytest.raises(ValueError, match="expert 99 is not in this store"):
        ExpertStore(saved).expert_path(99)


# ---------------------------------------------------------------------------- the manifest: 14 cases
def _set_file(value):
    def edit(doc):
        doc["experts"]["0"]["file"] = value
    return edit


def _swap(doc):
    doc["experts"]["0"], doc["experts"]["1"] = doc["experts"]["1"], doc["experts"]["0"]


@pytest.mark.parametrize("edit, named", [
    (_set_file("../outside.safetensors"), "'../outside.safetensors'"),
    (_set_file("/etc/passwd"), "'/etc/passwd'"),
    (_set_file("experts/../../x.safetensors"), "'experts/../../x.safetensors'"),
    (_set_file("..\\x.safetensors"), "'..\\\\x.safetensors'"),
    (_set_file(7), "experts[0] names file 7"),
    (lambda d: d["routing_tree"].update(file="../tree.safetensors"), "routing_tree names file '../tree.safetensors'"),
    (lambda d: d["routing_tree"].update(levels=3), "says 3 levels"),
    (lambda d: d["routing_tree"].update(num_leaves=16), "16 leaves"),
    (lambda d: d.pop("routing_tree"), "names no routing tree"),
    (lambda d: d["experts"].pop("3"), "lists experts [0, 1, 2]"),
    (lambda d: d.update(num_experts=5), "num_experts 5"),
    (lambda d: d["experts"].update({"2": "expert_2.safetensors"}), "experts[2]"),
    (lambda d: d.update(version=1), "store version 1"),
    (lambda d: d.pop("config"), "'config'"),
])
def test_inconsistent_manifests_are_store_errors(saved: Path, tmp_path: Path, edit, named: str) -> None:
    folder = _copy(saved, tmp_path, edit)
    with pytest.raises(StoreError) as err:
        ExpertStore(folder).predict(torch.zeros(4, 3), device="cpu")
    assert named in str(err.value)


def test_swapped_entries_name_the_expert_id(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path, _swap)
    with pytest.raises(StoreError, match=r"expert_id '1'\) is not the expert 0 the manifest entry experts\[0\]"):
        ExpertStore(folder).load_expert(0)


# ---------------------------------------------------------------------------- writing: 7 cases
@pytest.mark.parametrize("tensors, metadata, named", [
    ({}, None, "tensors is empty"),
    ({"w": [1.0]}, None, "tensors['w'] must be a torch.Tensor, got list"),
    ({"": torch.zeros(1)}, None, "got ''"),
    ({"w": torch.zeros(1, dtype=torch.complex64)}, None, "torch.complex64"),
    ({"w": torch.zeros(1)}, {"n": 3}, "'n': 3"),
    ({"w": torch.zeros(1)}, {"momlp_sha256": "x"}, "'momlp_sha256'"),
])
def test_bad_payloads_name_the_value(tmp_path: Path, tensors, metadata, named: str) -> None:
    with pytest.raises(ValueError) as err:
        save_expert_file(tmp_path / "f.safetensors", tensors, metadata)
    assert named in str(err.value)


def test_a_store_needs_one_expert_per_leaf(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ids 0..3 for this tree, got \[0, 1, 2\]"):
        ExpertStore.save(tmp_path / "s", StackedMLP(3, 2, 4, 1, 1), RoutingTree.regular(2, 1, 2))
    with pytest.raises(ValueError, match="JSON-serializable"):
        write_manifest(tmp_path / "m", {"x": float("inf")}, RoutingTree.single(2))


# ---------------------------------------------------------------------------- run config: 16 cases + 2 properties
def _with(section: str, **changes):
    raw = json.loads(json.dumps(GOOD))
    raw[section].update(changes)
    return raw


@pytest.mark.parametrize("raw, named", [
    (_with("train", lr=float("inf")), "train.lr must be a finite number, got inf"),
    (_with("train", lr=float("nan")), "got nan"),
    (_with("train", lr=-1.0), "train.lr must be a finite number in (0, inf), got -1.0"),
    (_with("train", batch_size=2.5), "train.batch_size must be an integer, got 2.5"),
    (_with("train", max_epochs=0), "train.max_epochs must be a finite number in (0, inf), got 0"),
    (_with("train", val_fraction=-0.1), "train.val_fraction must be a finite number in [0, 1), got -0.1"),
    (_with("train", optimizer="sgd"), "got 'sgd'"),
    (_with("train", device="cuda"), "train.device is set by --device"),
    (_with("train", progress=False), "train.progress is set by --no-progress"),
    (_with("train", lr="fast"), "train.lr must be a finite number, got 'fast'"),
    (_with("routing", depth="2"), "routing.depth must be an integer >= 1, got '2'"),
    (_with("experts", width=[4]), "experts.width must be an integer >= 1, got [4]"),
    (_with("run", output_dir=3), "run.output_dir must be a string, got 3"),
    ({**GOOD, "train": "adam"}, "train must be a table of keys, got 'adam'"),
    ({**GOOD, "optimiser": {"name": "adam"}}, "'optimiser'"),
    (_with("train", lr={"smoke": 1e-3, "paper": 1e-4}), "missing ['default']"),
])
def test_bad_run_configs_name_the_value(raw: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw, profile="smoke")
    assert named in str(err.value)


@settings(max_examples=30, deadline=None)
@given(width=st.integers(max_value=0))
def test_any_non_positive_width_is_named(width: int) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(_with("experts", width=width), profile="smoke")
    assert f"experts.width must be an integer >= 1, got {width}" in str(err.value)


@settings(max_examples=30, deadline=None)
@given(lr=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from([float("inf"), float("-inf")])))
def test_any_unusable_learning_rate_is_named(lr: float) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(_with("train", lr=lr), profile="smoke")
    assert "train.lr" in str(err.value) and repr(lr) in str(err.value)


# ---------------------------------------------------------------------------- the CLI: 16 cases
@pytest.fixture()
def config(tmp_path: Path) -> Path:
    raw = json.loads(json.dumps(GOOD))
    raw["run"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _data_config(tmp_path: Path, x, y, **routing) -> Path:
    save_file({"x_train": x, "y_train": y}, str(tmp_path / "d.safetensors"))
    raw = {**GOOD, "data": {"kind": "file", "path": "d.safetensors"},
           "routing": {"kind": "kmeans", "depth": 1, "branching": 2, **routing},
           "run": {"output_dir": str(tmp_path / "out")}}
    path = tmp_path / "file.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails(args: list[str], capsys: pytest.CaptureFixture, named: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err  # one line
    assert named in err, err


@pytest.mark.parametrize("extra, named", [
    (["--set", "experts.width"], "got 'experts.width'"),
    (["--set", "=3"], "got '=3'"),
    (["--set", "experts.width=[1,"], "the value '[1,' is not valid YAML"),
    (["--set", "experts..width=3"], "'experts..width'"),
    (["--set", "experts.wdth=3"], "'experts.wdth'"),
    (["--set", "train.lr=.inf"], "got inf"),
    (["--device", "gpu"], "got 'gpu'"),
    (["--device", "cuda:x"], "got 'cuda:x'"),
    (["--device", "cpu:0"], "got 'cpu:0'"),
    (["--device", ""], "--device must be cpu, cuda, cuda:<index> or mps, got ''"),
    (["--output", ""], "got ''"),
    (["--output", "   "], "got '   '"),
    (["--shard", "3"], "got '3'"),
])
def test_cli_arguments_fail_in_one_line(config: Path, capsys: pytest.CaptureFixture, extra: list[str],
                                        named: str) -> None:
    _fails([str(config), "--check", *extra], capsys, named)


def test_cli_output_under_a_file(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    _fails([str(config), "--check", "--output", str(tmp_path / "afile" / "run")], capsys, "afile")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_cli_output_in_a_read_only_folder(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _fails([str(config), "--check", "--output", str(locked / "run")], capsys, "is not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("make, named", [
    (lambda: (torch.rand(6, 2), torch.rand(6, 1)), "has 8 leaves but the data has only 6 training points"),
    (lambda: (torch.tensor([[0.0, float("inf")]] * 20), torch.rand(20, 1)), "x_train has NaN or inf"),
    (lambda: (torch.rand(20, 2, 2), torch.rand(20, 1)), "(20, 2, 2)"),
    (lambda: (torch.rand(20, 2), torch.rand(19, 1)), "[20, k], got torch.float32 (19, 1)"),
    (lambda: (torch.rand(20, 2), torch.full((20, 1), 1e39, dtype=torch.float64)), "beyond float32"),
])
def test_cli_check_reads_the_data(tmp_path: Path, capsys: pytest.CaptureFixture, make, named: str) -> None:
    x, y = make()
    _fails([str(_data_config(tmp_path, x, y, depth=3)), "--check"], capsys, named)


def test_cli_cross_entropy_needs_class_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _data_config(tmp_path, torch.rand(20, 2), torch.rand(20))
    _fails([str(path), "--check", "--set", "train.loss=cross_entropy"], capsys, "got torch.float32 (20,)")
