"""Every GPU measurement of the book in one run, within a 10-minute budget on one GPU.

    python benchmarks/gpu_all.py                 # on a machine with CUDA: all steps, results/ written
    python benchmarks/gpu_all.py --dry-run       # print the plan (works anywhere)
    python benchmarks/gpu_all.py --budget 300    # a shorter total budget, in seconds

Each step is a separate process with its own time limit taken from what is left of the budget, so one slow
step cannot eat the others. The steps: training throughput (stacked experts against the serial loop), the Soft MoE
layer, the learned top-k layer, serving memory, the paper-profile image run on the datasets present, then the
paper-profile chapters that fit, executed as notebooks by ``scripts/time_chapters.py`` (each chapter writes its own
results). A summary with every step's status, time and the device goes to ``results/gpu_all.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.runtime import write_results  # noqa: E402

PY = sys.executable
# (name, command, seconds it may take at most). Ordered by value per second: micro-benchmarks first.
STEPS: list[tuple[str, list[str], int]] = [
    ("training throughput", [PY, "benchmarks/experts_training.py"], 120),
    ("Soft MoE layer", [PY, "benchmarks/softmoe_layer.py", "--device", "cuda"], 45),
    ("top-k gate layer", [PY, "benchmarks/gates_layer.py", "--device", "cuda"], 45),
    ("serving memory", [PY, "benchmarks/serving_memory.py"], 45),
    ("image paper run (datasets present)", [PY, "benchmarks/gpu_image_paper.py"], 120),
    ("paper-profile chapters", [PY, "scripts/time_chapters.py", "--profile", "paper", "--only",
                                "routing_trees", "momlp_grid_regression", "softmoe_one_expert",
                                "softmoe_best_subset", "approximation_rates"], 240),
]


def run(budget_s: float, dry_run: bool) -> list[dict]:
    start, report = time.monotonic(), []
    for name, cmd, limit in STEPS:
        script = ROOT / cmd[1]
        left = budget_s - (time.monotonic() - start)
        row = {"step": name, "command": " ".join(cmd[1:]), "limit_s": min(limit, max(0, int(left)))}
        if not script.exists():
            row["status"] = f"skipped: {cmd[1]} does not exist in this checkout"
        elif left < 20:
            row["status"] = "skipped: the 10-minute budget is spent"
        elif dry_run:
            row["status"] = "planned"
        else:
            t0 = time.monotonic()
            try:
                done = subprocess.run(cmd, cwd=ROOT, timeout=row["limit_s"], capture_output=True, text=True)
                row["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
                row["output_tail"] = (done.stdout + done.stderr)[-1500:]
            except subprocess.TimeoutExpired:
                row["status"] = f"timed out after {row['limit_s']} s"
            row["seconds"] = round(time.monotonic() - t0, 1)
        print(f"{name:40s} {row['status']:40s} {row.get('seconds', '')}", flush=True)
        report.append(row)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=600.0, help="total seconds for all steps (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the plan without running anything")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("No CUDA GPU here: this script measures GPU numbers only (use --dry-run to see the plan).")
        return 2
    report = run(args.budget, args.dry_run)
    if not args.dry_run:
        write_results("gpu_all", {"budget_s": args.budget, "steps": report}, device="cuda")
    return 0 if all(r["status"] in ("ok", "planned") or r["status"].startswith("skipped") for r in report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
