"""Execute the grid-regression chapter under a profile (default: paper) so that it records what it measured.

A paper-profile run *is* the chapter: ``book/momlp_grid_regression.ipynb`` executed with ``MOMLP_PROFILE=paper``
(width 1000, 3 hidden layers, learnable PReLU, Adam lr 1e-4) trains every task and the sweep and, in its
"paper profile" cell, writes ``momlp_lite/results/grid_paper_run.json`` with ``momlp_lite.runtime.write_results`` (device,
date, commit). No experiment code lives here. Meant for a GPU::

    python -m benchmarks.grid_paper_run                  # the paper profile
    python -m benchmarks.grid_paper_run --dry-run        # what would run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "book" / "momlp_grid_regression.ipynb"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="paper", choices=["smoke", "default", "paper"])
    p.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: the profile's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, execute nothing")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from momlp_lite.runtime import get_profile

    timeout = args.timeout or get_profile(args.profile).cell_timeout_s
    plan = dict(chapter=str(CHAPTER.relative_to(ROOT)), profile=args.profile, cell_timeout_s=timeout,
                writes="momlp_lite/results/grid_paper_run.json" if args.profile == "paper" else None)
    print(plan)
    if args.dry_run:
        return plan
    import nbclient
    import nbformat

    os.environ["MOMLP_PROFILE"] = args.profile
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    nb = nbformat.read(CHAPTER, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(CHAPTER.parent)}}).execute()
    plan["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"executed in {plan['seconds']} s")
    return plan


if __name__ == "__main__":
    main()
