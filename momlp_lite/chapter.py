"""What every chapter runs first: profile, seeds, device and figure renderer in one call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Profile, describe_run, get_device, get_profile, seed_everything
from .plots import use_book_renderer

__all__ = ["Chapter", "start_chapter"]


@dataclass(frozen=True)
class Chapter:
    """The run settings a chapter reads once, near its top."""

    profile: Profile
    device: torch.device
    seed: int
    generator: torch.Generator


def start_chapter(seed: int = 0) -> Chapter:
    """Read the profile, seed everything, pick the device, set up plotly, and print what ran."""
    profile = get_profile()
    generator = seed_everything(seed)
    device = get_device()
    use_book_renderer()
    print("This page ran with", describe_run(device))
    return Chapter(profile, device, seed, generator)
