"""Recorded results ship inside the package, and a GPU reader is told how to switch to the paper profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from momlp_lite import runtime
from momlp_lite.runtime import PROFILES, load_results, paper_profile_hint, results_dir, write_results

ROOT = Path(__file__).resolve().parents[1]


def test_results_live_in_the_package_and_every_file_loads(monkeypatch):
    monkeypatch.delenv(runtime.RESULTS_ENV, raising=False)
    folder = results_dir()
    assert folder == Path(runtime.__file__).resolve().parent / "results"
    files = sorted(folder.glob("*.json"))
    assert files, "no recorded results in momlp_lite/results/"
    for f in files:
        doc = load_results(f.stem)
        assert doc is not None and doc["meta"]["device"], f.name
    assert not (ROOT / "results").is_dir() or not list((ROOT / "results").glob("*.json")), (
        "recorded results belong in momlp_lite/results/ (they ship with the package): move results/*.json there"
    )


def test_the_package_data_rule_ships_the_results():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'momlp_lite = ["results/*.json"]' in text


def test_environment_variable_still_redirects_results(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.RESULTS_ENV, str(tmp_path))
    assert results_dir() == tmp_path
    path = write_results("demo", {"x": 1})
    assert path.parent == tmp_path and load_results("demo")["x"] == 1


@pytest.mark.parametrize("bad", ["", "results/routing_cost", "routing_cost.json", "a\\b"])
def test_load_and_write_want_a_bare_name(bad, tmp_path):
    with pytest.raises(ValueError, match="bare result name"):
        load_results(bad)
    with pytest.raises(ValueError, match="bare result name"):
        write_results(bad, {"x": 1}, directory=tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_paper_hint_only_on_a_gpu_outside_the_paper_profile(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.RESULTS_ENV, str(tmp_path))
    cuda = torch.device("cuda")
    assert paper_profile_hint(torch.device("cpu"), PROFILES["default"]) is None
    assert paper_profile_hint(cuda, PROFILES["paper"]) is None
    line = paper_profile_hint(cuda, PROFILES["default"], chapter="routing_trees")
    assert "MOMLP_PROFILE" in line and "'paper'" in line and "not been measured yet" in line
    assert "\n" not in line
    (tmp_path / "chapter_times_paper.json").write_text(json.dumps(
        {"meta": {"device": "NVIDIA H200"}, "chapters": {"routing_trees": 90.0, "vc_dimension": 30.0}}))
    line = paper_profile_hint(cuda, PROFILES["smoke"], chapter="routing_trees")
    assert "1.5 min" in line and "NVIDIA H200" in line and "measured" in line
    line = paper_profile_hint(cuda, PROFILES["smoke"], chapter="unknown_chapter")
    assert "0.5-1.5 min" in line
