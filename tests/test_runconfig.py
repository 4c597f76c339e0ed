"""Run configs: YAML/TOML loading, per-profile values, and validation that names the bad key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from momlp_lite.distributed.config import ConfigError, load_run_config, parse_run_config

GOOD = {
    "seed": 3,
    "data": {"kind": "grid", "target": "sine", "n": 2, "s": 8},
    "routing": {"kind": "regular", "depth": 1, "branching": 2},
    "experts": {"width": 4, "hidden_layers": 2, "prelu": True},
    "train": {"optimizer": "adam", "lr": 1e-3, "max_epochs": 2, "batch_size": 8},
    "run": {"output_dir": "out", "experts_per_step": 2},
}


def _with(section: str, **changes):
    raw = json.loads(json.dumps(GOOD))
    raw[section].update(changes)
    return raw


def test_yaml_and_toml_give_the_same_config(tmp_path: Path) -> None:
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        "seed: 3\n"
        "data: {kind: grid, target: sine, n: 2, s: 8}\n"
        "routing: {kind: regular, depth: 1, branching: 2}\n"
        "experts: {width: 4, hidden_layers: 2, prelu: true}\n"
        "train: {optimizer: adam, lr: 1.0e-3, max_epochs: 2, batch_size: 8}\n"
        "run: {output_dir: out, experts_per_step: 2}\n"
    )
    toml_path = tmp_path / "run.toml"
    toml_path.write_text(
        "seed = 3\n"
        '[data]\nkind = "grid"\ntarget = "sine"\nn = 2\ns = 8\n'
        '[routing]\nkind = "regular"\ndepth = 1\nbranching = 2\n'
        "[experts]\nwidth = 4\nhidden_layers = 2\nprelu = true\n"
        '[train]\noptimizer = "adam"\nlr = 1e-3\nmax_epochs = 2\nbatch_size = 8\n'
        '[run]\noutput_dir = "out"\nexperts_per_step = 2\n'
    )
    a = load_run_config(yaml_path, profile="smoke")
    b = load_run_config(toml_path, profile="smoke")
    assert a == b == parse_run_config(GOOD, profile="smoke")
    assert a.experts.width == 4 and a.train.lr == pytest.approx(1e-3) and a.seed == 3


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: {target: sine, n: 2, s: 8}\ntrain: {lr: 1e-3}\n")  # YAML 1.1: a string
    assert load_run_config(path).train.lr == pytest.approx(1e-3)
    path.write_text("data: {target: sine, n: 2, s: 8}\ntrain: {lr: fast}\n")
    with pytest.raises(ConfigError, match="train.lr must be a finite number, got 'fast'"):
        load_run_config(path)


def test_per_profile_values_follow_the_profile() -> None:
    raw = _with("experts", width={"smoke": 4, "default": 64, "paper": 1000})
    assert parse_run_config(raw, profile="smoke").experts.width == 4
    assert parse_run_config(raw, profile="paper").experts.width == 1000
    raw["profile"] = "default"
    assert parse_run_config(raw).experts.width == 64  # the file's profile key
    assert parse_run_config(raw, profile="smoke").experts.width == 4  # the argument wins


def test_profile_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _with("experts", width={"smoke": 4, "default": 64, "paper": 1000})
    monkeypatch.setenv("MOMLP_PROFILE", "paper")
    assert parse_run_config(raw).experts.width == 1000


def test_fingerprint_tracks_weights_not_placement() -> None:
    base = parse_run_config(GOOD, profile="smoke")
    moved = parse_run_config(_with("run", output_dir="elsewhere", experts_per_step=5), profile="smoke")
    wider = parse_run_config(_with("experts", width=5), profile="smoke")
    assert base.fingerprint() == moved.fingerprint()
    assert base.fingerprint() != wider.fingerprint()
    assert base.fingerprint() != parse_run_config({**GOOD, "seed": 4}, profile="smoke").fingerprint()


def test_overrides_replace_dotted_keys() -> None:
    cfg = parse_run_config(GOOD, profile="smoke", overrides={"experts.width": 9, "run.output_dir": "/x"})
    assert cfg.experts.width == 9 and cfg.run.output_dir == "/x"


@pytest.mark.parametrize(
    "raw, message",
    [
        (_with("experts", width=-3), "experts.width must be an integer >= 1, got -3"),
        (_with("experts", hidden_layers=0), "experts.hidden_layers must be an integer >= 1, got 0"),
        (_with("train", batch_size=-1), "train.batch_size must be an integer >= 1, got -1"),
        (_with("train", lr=0), "train.lr must be a finite number in (0, inf), got 0"),
        (_with("train", lr=float("inf")), "train.lr must be a finite number, got inf"),
        (_with("train", max_epochs=-2.5), "train.max_epochs must be a finite number in (0, inf), got -2.5"),
        (_with("train", patience=0), "train.patience must be an integer >= 1, got 0"),
        (_with("train", batch_size=True), "train.batch_size must be an integer, got True"),
        (_with("train", loss="cross_entropy"), "train.loss must be 'mse' for grid regression data"),
        (_with("train", val_fraction=1.0), "train.val_fraction must be a finite number in [0, 1), got 1.0"),
        (_with("experts", prelu="yes"), "experts.prelu must be true or false"),
        (_with("experts", widht=4), "unknown key 'experts.widht'; did you mean 'experts.width'?"),
        ({**GOOD, "expert": {}}, "unknown key 'expert'; did you mean 'experts'?"),
        ({**GOOD, "learning_rate": 1}, "unknown key 'learning_rate'"),
        (_with("train", optimizer="sgd"), "train.optimizer must be one of ('adam', 'adamw'), got 'sgd'"),
        (_with("train", seed=1), "train.seed is set by the top-level 'seed'"),
        ({**GOOD, "optimiser": {"name": "adam"}}, "the table is now 'train'"),
        (_with("data", target="cosine"), "data.target must be one of"),
        (_with("data", s=1), "data.s must be an integer >= 2, got 1"),
        (_with("data", test_fraction=1.0), "data.test_fraction must be a number > 0 and < 1"),
        (_with("data", a=1.0, b=0.0), "data.a must be < data.b"),
        (_with("data", n=None), "data.n is required when data.kind is 'grid'"),
        (_with("routing", depth=-1), "routing.depth must be an integer >= 1, got -1"),
        (_with("routing", branching=1), "routing.branching must be an integer >= 2, got 1"),
        (_with("routing", kind="flat"), "routing.kind must be one of"),
        (_with("run", experts_per_step=0), "run.experts_per_step must be an integer >= 1, got 0"),
        ({k: v for k, v in GOOD.items() if k != "data"}, "data: missing table"),
        ({**GOOD, "seed": -1}, "seed must be an integer >= 0, got -1"),
        ({**GOOD, "profile": "huge"}, "profile must be one of"),
        (_with("experts", width={"smoke": 4}), "experts.width: a per-profile value needs exactly the keys"),
        ({**GOOD, "data": {"kind": "file", "path": "does-not-exist.safetensors"}, "routing": {"kind": "kmeans"}},
         "data.path: file"),
        ({**GOOD, "data": {"kind": "file"}, "routing": {"kind": "kmeans"}}, "data.path is required"),
        (_with("data", path="x.safetensors"), "data.path is only used when data.kind is 'file'; remove it"),
        ({**GOOD, "data": {"kind": "file", "path": "x.safetensors", "n": 2}, "routing": {"kind": "kmeans"}},
         "data.n is only used when data.kind is 'grid'; remove it"),
    ],
)
def test_bad_configs_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw, profile="smoke")
    assert message in str(err.value)


def test_file_data_is_found_relative_to_the_config(tmp_path: Path) -> None:
    save_file({"x_train": torch.rand(20, 3), "y_train": torch.rand(20, 1)}, str(tmp_path / "feats.safetensors"))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        "data: {kind: file, path: feats.safetensors}\nrouting: {kind: kmeans, depth: 1, branching: 2}\n"
    )
    cfg = load_run_config(cfg_path, profile="smoke")
    assert Path(cfg.data.path) == tmp_path / "feats.safetensors"
    regular = cfg_path.with_name("regular.yaml")
    regular.write_text("data: {kind: file, path: feats.safetensors}\nrouting: {kind: regular}\n")
    with pytest.raises(ConfigError, match="routing.kind 'regular' needs the box of a grid"):
        load_run_config(regular, profile="smoke")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("run.json", "{}", "must end in .yaml, .yml or .toml"),
        ("run.yaml", "data: [1, 2", "not valid YAML"),
        ("run.toml", "data = ", "not valid TOML"),
        ("run.yaml", "- 1\n- 2\n", "the top level must be a table"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("profile", ["smoke", "default", "paper"])
def test_shipped_example_config_is_valid(profile: str) -> None:
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "grid_sine.yaml", profile=profile)
    assert cfg.profile == profile and cfg.data.target == "sine"
    assert cfg.experts.width == {"smoke": 16, "default": 64, "paper": 1000}[profile]
