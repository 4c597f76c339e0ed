"""Recorded results (JSON under ``results/``): written atomically with device, date and commit.

Benchmarks and long runs (e.g. a paper-profile GPU run) write here; chapters read the committed
files to plot them beside what they compute live, and say so when none has been recorded.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_bytes

__all__ = ["results_dir", "run_metadata", "write_results", "load_results"]

RESULTS_ENV = "MOMLP_RESULTS_DIR"


def results_dir() -> Path:
    """``$MOMLP_RESULTS_DIR``, else ``results/`` at the repository root next to the package."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "results"


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
    """Who/where/when of a run: device name, torch version, UTC date, git commit, host CPU."""
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
    """Write ``payload`` plus :func:`run_metadata` to ``<results>/<name>.json`` atomically; return the path."""
    folder = Path(directory) if directory is not None else results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    doc = {"meta": run_metadata(device), **payload}
    return atomic_write_bytes(path, (json.dumps(doc, indent=2, default=float) + "\n").encode())


def load_results(name: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The recorded ``<results>/<name>.json``, or ``None`` when none has been recorded."""
    path = (Path(directory) if directory is not None else results_dir()) / f"{name}.json"
    if not path.is_file():
        return None
    with open(path) as fh:
        return json.load(fh)
