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


def start_chapter(seed: int = 0, cpu_threads: int | None = None) -> Chapter:
    """Read the profile, seed everything, pick the device, set up plotly, and print what ran.

    On a CPU outside the ``paper`` profile, torch runs with one thread (or ``cpu_threads``): the
    chapters' tensors are small, and on a shared machine extra threads mostly wait on each other.
    """
    profile = get_profile()
    generator = seed_everything(seed)
    device = get_device()
    if cpu_threads is None and device.type == "cpu" and profile.name != "paper":
        cpu_threads = 1
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
        torch.set_num_threads(cpu_threads)
    use_book_renderer()
    print("This page ran with", describe_run(device))
    return Chapter(profile, device, seed, generator)
