"""Run profiles, seeding and device choice.

A *profile* sizes every experiment in the book:

``smoke``
    what CI and nbval run: tiny sizes, seconds per chapter, offline data only.
``default``
    what the rendered book shows and a reader runs on a laptop or Colab.
``paper``
    the papers' hyperparameters, meant for a GPU.

The profile is read from the ``MOMLP_PROFILE`` environment variable (default ``default``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "PROFILES",
    "Profile",
    "get_profile",
    "choose",
    "seed_everything",
    "get_device",
    "describe_run",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """A named run profile.

    Attributes
    ----------
    name : str
        ``smoke``, ``default`` or ``paper``.
    cell_timeout_s : int
        Longest a single notebook cell may run when the book is built under this profile.
    description : str
        One line for humans.
    """

    name: str
    cell_timeout_s: int
    description: str


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 120, "tiny sizes for CI: seconds per chapter, offline data only"),
    "default": Profile("default", 900, "laptop/Colab sizes: minutes per chapter on a CPU"),
    "paper": Profile("paper", 7200, "the papers' hyperparameters: meant for a GPU"),
}

PROFILE_ENV = "MOMLP_PROFILE"
DEVICE_ENV = "MOMLP_DEVICE"


def get_profile(name: str | None = None) -> Profile:
    """Return the profile called ``name``, or the one named by ``$MOMLP_PROFILE`` (default ``default``).

    Raises
    ------
    ValueError
        If the name is not one of ``smoke``, ``default``, ``paper``.
    """
    if name is None:
        name = os.environ.get(PROFILE_ENV, "default").strip() or "default"
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}: set {PROFILE_ENV} to one of {sorted(PROFILES)}"
        ) from None


def choose(*, smoke: T, default: T, paper: T, profile: str | Profile | None = None) -> T:
    """Pick the value that belongs to the current profile.

    Examples
    --------
    >>> choose(smoke=8, default=64, paper=1000, profile="smoke")
    8
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return {"smoke": smoke, "default": default, "paper": paper}[prof.name]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a fresh seeded ``torch.Generator``."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def get_device(prefer: str | None = None) -> torch.device:
    """Choose a device: ``prefer`` or ``$MOMLP_DEVICE`` if given, else cuda → mps → cpu.

    Raises
    ------
    ValueError
        If the requested device is not available on this machine.
    """
    prefer = prefer or os.environ.get(DEVICE_ENV) or None
    if prefer is not None:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} requested but CUDA is not available; use 'cpu'")
        if dev.type == "mps" and not _mps_available():
            raise ValueError(f"device {prefer!r} requested but MPS is not available; use 'cpu'")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    backend: Any = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_run(device: torch.device | None = None) -> str:
    """One line naming the profile, device and library versions, for the top of a chapter."""
    prof = get_profile()
    dev = device or get_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    if dev.type == "cpu":
        name += f" ({torch.get_num_threads()} torch threads)"
    return (
        f"profile={prof.name} ({prof.description}); device={name}; "
        f"torch {torch.__version__}; numpy {np.__version__}"
    )
