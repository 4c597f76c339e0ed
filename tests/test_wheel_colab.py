"""Colab-like run: a wheel built from the checkout, a fresh venv with torch 2.13.0 CPU, every chapter from an empty folder.

Takes minutes (it installs torch from local disk and executes each chapter once, smoke profile); the per-chapter
times land in ``_build/colab/times.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.colab


def test_every_chapter_runs_from_a_wheel_in_a_fresh_venv_with_another_torch(tmp_path):
    out = tmp_path / "times.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "colab_run.py"), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    keep = ROOT / "_build" / "colab" / "times.json"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text(out.read_text())
    assert summary["torch"] == "torch==2.13.0"
    assert not summary["problems"], "\n".join(summary["problems"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    toc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts');"
                          "from build_course import toc_chapters; print(' '.join(p.stem for p in toc_chapters()))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(summary["chapters"]) == sorted(toc)
    assert all(t is not None and t > 0 for t in summary["chapters"].values())
