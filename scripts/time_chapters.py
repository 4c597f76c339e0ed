"""Time every chapter under a profile: ``python scripts/time_chapters.py --profile default``.

Executes each notebook of ``_toc.yml`` top to bottom with nbclient (as the book build does) and writes
``results/chapter_times_<profile>.json`` with the device, torch version, date and commit. The course
guide quotes these numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.results import load_results, write_results  # noqa: E402
from momlp_lite.config import get_device, get_profile  # noqa: E402


def chapters() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc.get("parts", []) for c in part["chapters"]]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--only", nargs="*", help="chapter stems to time (default: all)")
    args = parser.parse_args()
    profile = get_profile(args.profile)
    os.environ["MOMLP_PROFILE"] = profile.name
    name = f"chapter_times_{profile.name}"
    times = (load_results(name) or {}).get("chapters", {})
    for path in chapters():
        if args.only and path.stem not in args.only:
            continue
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        nbclient.NotebookClient(
            nb, timeout=profile.cell_timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
        seconds = time.perf_counter() - t0
        times[path.stem] = round(seconds, 1)
        print(f"{path.stem:32s} {seconds:8.1f} s", flush=True)
    print("wrote", write_results(name, {"profile": profile.name, "chapters": times}, device=get_device()))


if __name__ == "__main__":
    main()
