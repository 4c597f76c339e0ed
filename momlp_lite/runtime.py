"""Runtime: profiles (``smoke``, ``default``, ``paper``; from ``$MOMLP_PROFILE``), seeding, device, the chapter start,
timing, and recorded results (JSON with device, date and commit)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from .store.files import atomic_write_bytes

__all__ = [
    "PROFILES", "Profile", "get_profile", "choose", "seed_everything", "get_device", "Chapter", "start_chapter",
    "best_time", "torch_threads", "results_dir", "run_metadata", "write_results", "load_results",
    "paper_profile_hint", "check_positive_int", "check_positive_ints",
]

T = TypeVar("T")
PROFILE_ENV = "MOMLP_PROFILE"
RESULTS_ENV = "MOMLP_RESULTS_DIR"


@dataclass(frozen=True)
class Profile:
    """A named run profile; ``cell_timeout_s`` bounds one notebook cell in a book build. Taught in: book/intro."""

    name: str
    cell_timeout_s: int
    description: str


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 120, "tiny sizes for CI: seconds per chapter, offline data only"),
    "default": Profile("default", 900, "laptop/Colab sizes: minutes per chapter on a CPU"),
    "paper": Profile("paper", 7200, "the papers' hyperparameters: meant for a GPU"),
}


def get_profile(name: str | None = None) -> Profile:
    """The profile ``name``, else the one ``$MOMLP_PROFILE`` names (default ``default``). Taught in: book/intro."""
    if name is None:
        name = os.environ.get(PROFILE_ENV, "default").strip() or "default"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: set {PROFILE_ENV} to one of {sorted(PROFILES)}")
    return PROFILES[name]


def choose(*, smoke: T, default: T, paper: T, profile: str | Profile | None = None) -> T:
    """The value for the current profile: ``choose(smoke=8, default=64, paper=1000)``. Taught in: book/intro."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return {"smoke": smoke, "default": default, "paper": paper}[prof.name]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh seeded ``torch.Generator``. Taught in: book/intro."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def get_device(prefer: str | None = None) -> torch.device:
    """``prefer`` or ``$MOMLP_DEVICE`` (must be available), else cuda, then mps, then cpu. Taught in: book/intro."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    prefer = prefer or os.environ.get("MOMLP_DEVICE")
    if not prefer:
        return torch.device(next(kind for kind, ok in available.items() if ok))
    dev = torch.device(prefer)
    if not available.get(dev.type, True):
        raise ValueError(f"device {prefer!r} requested but {dev.type.upper()} is not available; use 'cpu'")
    return dev


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` >= 1 (numpy integers allowed, bools refused). Taught in: book/routing_trees."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_positive_ints(**values: object) -> None:
    """:func:`check_positive_int` for each ``name=value``, in order. Taught in: book/routing_trees."""
    for name, value in values.items():
        check_positive_int(name, value)


@dataclass(frozen=True)
class Chapter:
    """The run settings a chapter reads once, near its top. Taught in: book/intro."""

    profile: Profile
    device: torch.device
    seed: int
    generator: torch.Generator


def start_chapter(seed: int = 0, cpu_threads: int | None = None) -> Chapter:
    """Read the profile, seed everything, pick the device, set up plotly, and print what ran.
    On a CPU outside the ``paper`` profile torch gets one thread (or ``cpu_threads``). Taught in: book/intro."""
    profile, generator, device = get_profile(), seed_everything(seed), get_device()
    if cpu_threads is None and device.type == "cpu" and profile.name != "paper":
        cpu_threads = 1
    if cpu_threads is not None:
        torch.set_num_threads(check_positive_int("cpu_threads", cpu_threads))
    from .viz.figures import use_book_renderer

    use_book_renderer()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if device.type == "cpu":
        where += f" ({torch.get_num_threads()} torch threads)"
    print(f"This page ran with profile={profile.name} ({profile.description}); device={where}; "
          f"torch {torch.__version__}; numpy {np.__version__}")
    hint = paper_profile_hint(device, profile)
    if hint:
        print(hint)
    return Chapter(profile, device, seed, generator)


def _notebook_name() -> str | None:
    """The running notebook's stem when the front end says it (Jupyter Server, VS Code), else ``None``."""
    path = os.environ.get("JPY_SESSION_NAME")
    with contextlib.suppress(ImportError):
        from IPython import get_ipython  # type: ignore[import-not-found]

        ns = getattr(get_ipython(), "user_ns", {}) or {}
        path = path or ns.get("__session__") or ns.get("__vsc_ipynb_file__")
    return Path(str(path)).stem if path else None


def paper_profile_hint(device: torch.device, profile: Profile, chapter: str | None = None) -> str | None:
    """On a GPU outside ``paper``: how to switch, and the recorded time it took there. Taught in: book/intro."""
    if device.type != "cuda" or profile.name == "paper":
        return None
    how = (f"A GPU is here: for the papers' sizes run `import os; os.environ['{PROFILE_ENV}'] = 'paper'` "
           "before the first code cell (or restart with that variable set); ")
    rec = load_results("chapter_times_paper") or {}
    times, where = rec.get("chapters", {}), rec.get("meta", {}).get("device", "a GPU")
    chapter = chapter or _notebook_name()
    if chapter and chapter in times:
        return how + f"this chapter took {times[chapter] / 60:.1f} min there on {where} (measured)."
    if times:
        lo, hi = min(times.values()) / 60, max(times.values()) / 60
        return how + f"a chapter took {lo:.1f}-{hi:.1f} min there on {where} (measured)."
    return how + "its time on a GPU has not been measured yet."


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (1 keeps CPU timings stable). Taught in: book/routing_trees."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time (s) of ``fn()`` in ``repeats`` runs after ``warmup`` (CUDA synced). Taught in: book/intro."""
    check_positive_int("repeats", repeats)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def results_dir() -> Path:
    """``$MOMLP_RESULTS_DIR``, else ``momlp_lite/results/`` (shipped as package data). Taught in: book/intro."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    return "unknown"


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device | str | None = None) -> dict[str, Any]:
    """Who/where/when of a run: device name, torch version, UTC date, git commit, CPU threads. Taught in: book/intro."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({_cpu_name()}, {os.cpu_count()} cores)"
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"device": name, "device_type": dev.type, "torch": torch.__version__, "date_utc": date,
            "commit": _git_commit(), "cpu_threads": torch.get_num_threads()}


def _results_path(name: str, directory: Path | None) -> Path:
    if not name or "/" in name or "\\" in name or name.endswith(".json"):
        raise ValueError(f"name must be a bare result name like 'routing_cost', got {name!r}")
    return (Path(directory) if directory is not None else results_dir()) / f"{name}.json"


def write_results(name: str, payload: dict[str, Any], device: torch.device | str | None = None,
                  directory: Path | None = None) -> Path:
    """Write ``{"meta": run_metadata(device), **payload}`` to ``<results_dir()>/<name>.json``. Taught in: book/intro."""
    path = _results_path(name, directory)
    doc = {"meta": run_metadata(device), **payload}
    return atomic_write_bytes(path, (json.dumps(doc, indent=2, default=float) + "\n").encode())


def load_results(name: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The recorded ``<results_dir()>/<name>.json`` (``name`` bare), or ``None``. Taught in: book/intro."""
    path = _results_path(name, directory)
    return json.loads(path.read_text()) if path.is_file() else None
