"""Runtime: profiles, seeding, device, the chapter start, timing and recorded results.

A *profile* sizes every experiment in the book:

``smoke``
    what CI and nbval run: tiny sizes, seconds per chapter, offline data only.
``default``
    what the rendered book shows and a reader runs on a laptop or Colab.
``paper``
    the papers' hyperparameters, meant for a GPU.

The profile is read from the ``MOMLP_PROFILE`` environment variable (default ``default``).
Recorded results are JSON files written atomically with device, date and commit; chapters read
them to show what a longer run measured.
"""

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
    "PROFILES", "Profile", "get_profile", "choose", "seed_everything", "get_device", "describe_run",
    "Chapter", "start_chapter", "best_time", "torch_threads",
    "results_dir", "run_metadata", "write_results", "load_results", "paper_profile_hint", "check_positive_int",
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
    Taught in: book/intro (used by every chapter).
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
    Taught in: book/intro (used by every chapter).
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
    Taught in: book/intro (used by every chapter).
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return {"smoke": smoke, "default": default, "paper": paper}[prof.name]


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a fresh seeded ``torch.Generator``.
    Taught in: book/intro (used by every chapter).
    """
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
    Taught in: book/intro (used by every chapter).
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
    """One line naming the profile, device and library versions, for the top of a chapter.
    Taught in: book/intro (used by every chapter).
    """
    prof = get_profile()
    dev = device or get_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    if dev.type == "cpu":
        name += f" ({torch.get_num_threads()} torch threads)"
    return (
        f"profile={prof.name} ({prof.description}); device={name}; "
        f"torch {torch.__version__}; numpy {np.__version__}"
    )


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer >= 1 (numpy integers allowed, bools refused).

    The package's one positive-integer check (used from book/routing_trees on): ``ValueError: depth must be an
    integer >= 1, got 0``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Chapter:
    """The run settings a chapter reads once, near its top. Taught in: book/intro (used by every chapter)."""

    profile: Profile
    device: torch.device
    seed: int
    generator: torch.Generator


def start_chapter(seed: int = 0, cpu_threads: int | None = None) -> Chapter:
    """Read the profile, seed everything, pick the device, set up plotly, and print what ran.

    On a CPU outside the ``paper`` profile, torch runs with one thread (or ``cpu_threads``): the
    chapters' tensors are small, and on a shared machine extra threads mostly wait on each other.
    Taught in: book/intro.
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
    from .viz.figures import use_book_renderer

    use_book_renderer()
    print("This page ran with", describe_run(device))
    hint = paper_profile_hint(device, profile)
    if hint:
        print(hint)
    return Chapter(profile, device, seed, generator)


def _notebook_name() -> str | None:
    """The running notebook's stem when the front end says it (Jupyter Server, VS Code), else ``None``."""
    path = os.environ.get("JPY_SESSION_NAME")
    if not path:
        try:
            from IPython import get_ipython  # type: ignore[import-not-found]

            ns = getattr(get_ipython(), "user_ns", {}) or {}
            path = ns.get("__session__") or ns.get("__vsc_ipynb_file__")
        except ImportError:
            path = None
    return Path(str(path)).stem if path else None


def paper_profile_hint(device: torch.device, profile: Profile, chapter: str | None = None) -> str | None:
    """On a GPU outside the ``paper`` profile: one line saying how to switch, and how long it took there.

    The time is read from the recorded ``chapter_times_paper`` results (``None`` off a GPU).
    Taught in: book/intro.
    """
    if device.type != "cuda" or profile.name == "paper":
        return None
    how = (f"A GPU is here: for the papers' sizes run `import os; os.environ['{PROFILE_ENV}'] = 'paper'` "
           "before the first code cell (or restart with that variable set); ")
    rec = load_results("chapter_times_paper")
    times = (rec or {}).get("chapters", {})
    chapter = chapter or _notebook_name()
    where = (rec or {}).get("meta", {}).get("device", "a GPU")
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
    """Best wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs (CUDA synchronized).
    Taught in: book/intro (used by every chapter).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
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


RESULTS_ENV = "MOMLP_RESULTS_DIR"


def results_dir() -> Path:
    """``$MOMLP_RESULTS_DIR``, else ``momlp_lite/results/`` inside the package (shipped as package data).

    Recorded results travel with every install (a wheel on Colab included), so chapters show them anywhere.
    Taught in: book/intro.
    """
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device | str | None = None) -> dict[str, Any]:
    """Who/where/when of a run: device name, torch version, UTC date, git commit, host CPU.
    Taught in: book/intro (used by every chapter).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({_cpu_name()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "device_type": dev.type,
        "torch": torch.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }


def write_results(name: str, payload: dict[str, Any], device: torch.device | str | None = None,
                  directory: Path | None = None) -> Path:
    """Write ``payload`` plus :func:`run_metadata` to ``<results_dir()>/<name>.json`` atomically; return the path.

    ``<results_dir()>`` is ``momlp_lite/results/`` in a checkout: commit the file there and it ships with the package.
    Taught in: book/intro (used by every chapter).
    """
    folder = Path(directory) if directory is not None else results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    doc = {"meta": run_metadata(device), **payload}
    return atomic_write_bytes(path, (json.dumps(doc, indent=2, default=float) + "\n").encode())


def load_results(name: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The recorded ``<results_dir()>/<name>.json``, or ``None`` when none has been recorded.

    Raises
    ------
    ValueError
        If ``name`` is empty or holds a path separator (pass the bare name, e.g. ``"routing_cost"``).
    Taught in: book/intro (used by every chapter).
    """
    if not name or "/" in name or "\\" in name or name.endswith(".json"):
        raise ValueError(f"name must be a bare result name like 'routing_cost', got {name!r}")
    path = (Path(directory) if directory is not None else results_dir()) / f"{name}.json"
    if not path.is_file():
        return None
    with open(path) as fh:
        return json.load(fh)
