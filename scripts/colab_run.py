"""Run every chapter the way Colab does: from a wheel, in a fresh venv with another torch, from an empty folder.

    python scripts/colab_run.py                      # -> _build/colab/times.json (smoke profile)
    python scripts/colab_run.py --chapters routing_trees --keep

Steps: build a wheel from the checkout's files (``pip wheel``, no repository on the path afterwards); create a fresh
venv; install ``torch==2.13.0`` (the CPU build on local disk) with ``torchvision==0.28.0``, the wheel, and what
Colab already has (ipykernel, nbclient, ipywidgets); then execute each chapter with nbclient inside that venv, each
from its own empty folder, under ``MOMLP_PROFILE=smoke`` (``--profile`` to change), and record its wall time.
The run fails when any chapter fails, when the wheel lacks a recorded result of ``momlp_lite/results/``, or when a
chapter's output names a repository folder (``benchmarks/``, ``results/``, ``python scripts/``) a Colab reader lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["torch==2.13.0", "torchvision==0.28.0"]
COLAB_HAS = ["ipykernel>=6", "nbclient>=0.10", "nbformat>=5", "ipywidgets>=8"]

RUNNER = r'''
import json, os, sys, time
from pathlib import Path
import nbclient, nbformat

src, work, timeout = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
nb = nbformat.read(src, as_version=4)
work.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
error = None
try:
    # shutdown_kernel="immediate": a kernel that lingers on a graceful shutdown would add `timeout` seconds.
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(work)}}).execute()
except Exception as exc:  # report, do not hide: the caller fails the run
    error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
elapsed = time.perf_counter() - t0
text = "\n".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "" for c in nb.cells
                 if c.cell_type == "code" for o in c.get("outputs", []))
import momlp_lite
print(json.dumps({"seconds": round(elapsed, 1), "error": error, "stdout": text[-20000:],
                  "package": str(Path(momlp_lite.__file__).parent)}))
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build_wheel(dest: Path) -> Path:
    """A wheel of the checkout's tracked and new (not ignored) files, built outside the work tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    src = dest / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src)])
    (wheel,) = dest.glob("momlp_lite-*.whl")
    return wheel


def missing_results(wheel: Path) -> list[str]:
    """Recorded results of the checkout (``momlp_lite/results/*.json``) that the wheel does not carry."""
    import zipfile

    shipped = set(zipfile.ZipFile(wheel).namelist())
    return [f"momlp_lite/results/{p.name}" for p in sorted((ROOT / "momlp_lite" / "results").glob("*.json"))
            if f"momlp_lite/results/{p.name}" not in shipped]


def make_venv(where: Path, wheel: Path) -> Path:
    """A fresh venv with torch 2.13.0 CPU, the wheel and Colab's notebook tools; returns its python."""
    _run([sys.executable, "-m", "venv", str(where)])
    py = where / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run(pip + TORCH)
    _run(pip + [f"{wheel}", *COLAB_HAS])
    _run([str(py), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], stdout=subprocess.DEVNULL)
    return py


def run_chapters(py: Path, chapters: list[Path], work: Path, profile: str, timeout: int) -> dict[str, dict]:
    """Execute each chapter in the venv from its own empty folder; its time, error and printed text."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOMLP_RESULTS_DIR", "VIRTUAL_ENV")}
    env.update(MOMLP_PROFILE=profile, PATH=f"{py.parent}{os.pathsep}{env.get('PATH', '')}",
               JUPYTER_PATH=str(py.parent.parent / "share" / "jupyter"))  # the venv's kernel comes first
    work.mkdir(parents=True, exist_ok=True)
    runner = work / "run_one.py"
    runner.write_text(RUNNER)
    out = {}
    for path in chapters:
        folder = work / path.stem
        proc = subprocess.run([str(py), str(runner), str(path), str(folder), str(timeout)], cwd=folder.parent,
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            out[path.stem] = {"seconds": None, "error": proc.stderr[-2000:], "stdout": ""}
        else:
            out[path.stem] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{path.stem:32s} {out[path.stem]['seconds']} s {'FAILED' if out[path.stem]['error'] else ''}",
              flush=True)
    return out


def problems(results: dict[str, dict]) -> list[str]:
    """What a Colab reader would hit: failures, missing recorded results that ship, scripts they do not have."""
    bad = []
    for name, r in results.items():
        if r["error"]:
            bad.append(f"{name}: {r['error'][-600:]}")
        text = r.get("stdout", "")
        for phrase in (r"python scripts/", r"(?<![\w/])benchmarks/", r"(?<![\w/])results/"):
            hit = re.search(r"[^\n]{0,60}" + phrase + r"[^\n]{0,60}", text)
            if hit:
                bad.append(f"{name}: prints {hit.group(0).strip()!r} (a Colab reader has no repository folders)")
        pkg = r.get("package", "")
        if pkg and str(ROOT) in pkg:
            bad.append(f"{name}: imported momlp_lite from the checkout ({pkg}), not from the wheel")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", nargs="*")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (the smoke profile's limit)")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "colab" / "times.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv and folders")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_course import toc_chapters

    chapters = [p for p in toc_chapters() if not args.chapters or p.stem in args.chapters]
    tmp = Path(tempfile.mkdtemp(prefix="momlp-colab-"))
    try:
        t0 = time.perf_counter()
        wheel = build_wheel(tmp / "wheel")
        not_shipped = missing_results(wheel)
        py = make_venv(tmp / "venv", wheel)
        setup_s = time.perf_counter() - t0
        results = run_chapters(py, chapters, tmp / "work", args.profile, args.timeout)
        summary = {
            "profile": args.profile, "torch": TORCH[0], "setup_seconds": round(setup_s, 1),
            "chapters": {k: v["seconds"] for k, v in results.items()},
            "problems": problems(results) + [f"the wheel lacks {f}" for f in not_shipped],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "problems"}, indent=2))
        if summary["problems"]:
            sys.exit("Colab-like run found problems:\n  " + "\n  ".join(summary["problems"]))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("kept", tmp)


if __name__ == "__main__":
    main()
