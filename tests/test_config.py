"""Profiles, seeding and device choice."""

import pytest
import torch

from momlp_lite.runtime import PROFILES, best_time, choose, get_device, get_profile, seed_everything


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOMLP_PROFILE", "paper")
    assert get_profile().name == "paper"
    assert choose(smoke=1, default=2, paper=3) == 3
    monkeypatch.delenv("MOMLP_PROFILE")
    assert get_profile().name == "default"


def test_unknown_profile_names_the_choices(monkeypatch):
    monkeypatch.setenv("MOMLP_PROFILE", "huge")
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*\['default', 'paper', 'smoke'\]"):
        get_profile()


def test_timeouts_grow_with_the_profile():
    assert PROFILES["smoke"].cell_timeout_s < PROFILES["default"].cell_timeout_s < PROFILES["paper"].cell_timeout_s


def test_seeding_repeats_random_draws():
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        seed_everything(-1)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("MOMLP_DEVICE", raising=False)
    dev = get_device()
    assert dev.type in {"cuda", "mps", "cpu"}
    assert get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


def test_best_time_needs_a_positive_repeat_count():
    calls = []
    assert best_time(lambda: calls.append(1), repeats=2, warmup=1) >= 0.0
    assert len(calls) == 3
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        best_time(lambda: None, repeats=0)
