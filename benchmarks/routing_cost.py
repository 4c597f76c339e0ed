"""Routing cost: tree descent vs flat nearest-leaf-key search, on growing numbers of leaves.

    python benchmarks/routing_cost.py [--points 1000000] [--threads 2]

Prints a table and writes momlp_lite/results/routing_cost.json (with device, torch version, date and commit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite import RoutingTree  # noqa: E402
from momlp_lite.runtime import best_time, torch_threads  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--flat-points", type=int, default=100_000, help="points for the (slow) flat search")
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.points, 2, generator=gen)
    x_flat = x[: args.flat_points]
    rows = []
    with torch_threads(args.threads):
        for depth in range(1, args.max_depth + 1):
            tree = RoutingTree.regular(2, depth, 2)
            tree_s = best_time(lambda: tree.route(x), repeats=3)
            flat_s = best_time(lambda: tree.route_flat(x_flat), repeats=3) * len(x) / len(x_flat)
            rows.append(
                dict(leaves=tree.num_leaves, depth=depth, tree_s=tree_s, flat_s_scaled=flat_s, speedup=flat_s / tree_s)
            )
            print(
                f"{tree.num_leaves:>6} leaves  tree {tree_s:7.3f} s  flat {flat_s:8.3f} s "
                f"(scaled from {len(x_flat):,} points)  flat/tree {flat_s / tree_s:7.1f}x",
                flush=True,
            )
    path = write_results(
        "routing_cost", dict(points=args.points, flat_points=args.flat_points, threads=args.threads, rows=rows)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
