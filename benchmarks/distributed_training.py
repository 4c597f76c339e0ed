"""Wall time of training one MoMLP on 1, 2, 4, … processes (torchrun), and what each rank spent training.

For each process count W the whole command is timed (``python -m momlp_lite.distributed`` for
W = 1, ``torchrun --standalone --nproc-per-node=W`` otherwise: start-up, tree, training, manifest),
and the per-rank training seconds are read from the run summary. Every run starts from an empty
output directory, and every store is checked bit for bit against the W = 1 store. The table and
JSON (``momlp_lite/results/<name>.json`` with device, torch version, date and commit) show the speed-up over
W = 1 and the parallel efficiency.

Examples
--------
CPU, small sizes (what CI-class machines can run)::

    python benchmarks/distributed_training.py --quick --nproc 1 2

A GPU machine with 8 GPUs (one process per GPU)::

    python benchmarks/distributed_training.py --nproc 1 2 4 8 --device cuda --width 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.distributed.train import compare_stores  # noqa: E402
from momlp_lite.distributed.workers import torchrun_command  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402


def make_config(args: argparse.Namespace) -> dict:
    return {
        "seed": 0,
        "data": {"kind": "grid", "target": "sine", "n": 2, "s": args.s},
        "routing": {"kind": "regular", "depth": args.depth, "branching": 2},
        "experts": {"width": args.width, "hidden_layers": args.hidden_layers, "prelu": True},
        "train": {"optimizer": "adam", "lr": 1e-3, "max_epochs": args.epochs, "batch_size": args.batch_size,
                      "val_fraction": 0.1, "patience": None},
        "run": {"output_dir": "unused", "experts_per_step": args.experts_per_step},
    }


def launch(config: Path, out: Path, nproc: int, device: str) -> tuple[float, dict]:
    extra = ["--output", str(out), "--device", device, "--no-progress"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "momlp_lite.distributed", str(config), *extra]
    else:
        cmd = torchrun_command(config, nproc, extra_args=extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=config.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"W={nproc} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--s", type=int, default=64, help="grid points per axis (n = 2)")
    p.add_argument("--depth", type=int, default=3, help="tree depth: 4**depth experts")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--hidden-layers", type=int, default=3)
    p.add_argument("--epochs", type=float, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--experts-per-step", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU (s=32, width 32, 40 epochs)")
    p.add_argument("--name", default=None, help="results file name (default distributed_training[_quick]_<device>)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared 2-core VM')")
    args = p.parse_args()
    if args.quick:
        args.s, args.width, args.epochs = 32, 32, 40
    if 1 not in args.nproc:
        args.nproc = [1, *args.nproc]
    work = Path(tempfile.mkdtemp(prefix="momlp-bench-"))
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(make_config(args)))
    rows = []
    try:
        for w in sorted(set(args.nproc)):
            wall, summary = launch(config, work / f"w{w}", w, args.device)
            train_s = [r["seconds"] for r in summary["ranks"]]
            same = compare_stores(work / "w1", work / f"w{w}") == []
            rows.append({"processes": w, "wall_s": round(wall, 3), "rank_train_s_max": max(train_s),
                         "rank_train_s_mean": round(sum(train_s) / len(train_s), 3), "same_store_as_w1": same,
                         "backend": summary["backend"], "experts": summary["num_experts"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    print(f"{'W':>3} {'wall s':>8} {'speed-up':>9} {'efficiency':>10} {'max rank train s':>17} {'same store':>10}")
    for r in rows:
        r["speedup"] = round(base["wall_s"] / r["wall_s"], 3)
        r["efficiency"] = round(r["speedup"] / r["processes"], 3)
        print(f"{r['processes']:>3} {r['wall_s']:>8.2f} {r['speedup']:>9.2f} {r['efficiency']:>10.2f} "
              f"{r['rank_train_s_max']:>17.2f} {str(r['same_store_as_w1']):>10}")
    name = args.name or f"distributed_training{'_quick' if args.quick else ''}_{args.device.split(':')[0]}"
    cfg = {k: v for k, v in vars(args).items() if k not in ("name",)}
    path = write_results(name, {"config": cfg, "rows": rows, "note": args.note}, device=args.device)
    print("wrote", path)


if __name__ == "__main__":
    main()
