"""Run the grid-regression chapter's experiment in the paper profile and record it.

Kratsios et al.'s setting (width 1000, 3 hidden layers, learnable PReLU, Adam lr 1e-4): MoMLP vs the
equal-parameter dense MLP on every task of :func:`momlp_lite.regression.grid_setup`, plus the
error-vs-number-of-experts sweep. Writes ``momlp_lite/results/grid_paper_run.json`` (device, date, commit), which
the chapter ``book/momlp_grid_regression.ipynb`` plots beside its live run. Meant for a GPU::

    python benchmarks/grid_paper_run.py                 # everything (paper profile)
    python benchmarks/grid_paper_run.py --targets sine --dims 2 --max-steps 500   # a slice
    python benchmarks/grid_paper_run.py --profile smoke --name grid_smoke_run      # a quick check on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.runtime import get_device, seed_everything  # noqa: E402
from momlp_lite.regression import compare_on_task, comparison_rows, grid_setup, sweep_experts  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="paper", choices=["smoke", "default", "paper"])
    p.add_argument("--targets", nargs="+", default=None, help="subset of targets")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="subset of n")
    p.add_argument("--max-steps", type=int, default=None, help="override the profile's step budget")
    p.add_argument("--no-sweep", action="store_true", help="skip the error-vs-experts sweep")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the paper profile is fp32/TF32 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--name", default="grid_paper_run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    seed_everything(args.seed)
    device = get_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    setup = grid_setup(args.profile)
    over: dict[str, Any] = dict(device=str(device), bf16=args.bf16)
    if args.max_steps:
        over["max_steps"] = args.max_steps
    train, sweep_train = replace(setup.train, **over), replace(setup.sweep_train, **over)
    tasks = [t for t in setup.tasks
             if (args.targets is None or t.target in args.targets) and (args.dims is None or t.n in args.dims)]
    if not tasks:
        raise SystemExit(f"no task matches --targets {args.targets} --dims {args.dims}")
    rows = []
    t0 = time.perf_counter()
    for task in tasks:
        moe, dense = compare_on_task(task, setup.width, setup.hidden_layers, train, seed=args.seed)
        for r in comparison_rows(task, moe, dense):
            rows.append(r)
            print(f"{r['target']:>11} n={r['n']} {r['model']:>9}: RMSE {r['test_rmse']:.4g}  max {r['max_error']:.4g}  "
                  f"{r['train_seconds']:.1f} s  active {r['params_active']:,}")
    sweep_rows = []
    if not args.no_sweep:
        for _, rep in sweep_experts(setup.sweep_task, setup.sweep_depths, setup.sweep_width, setup.hidden_layers,
                                    sweep_train, seed=args.seed):
            sweep_rows.append(rep.row())
            print(f"sweep: {rep.num_experts:>4} experts: RMSE {rep.rmse:.4g}")
    payload = dict(
        profile=args.profile,
        setup=dict(width=setup.width, hidden_layers=setup.hidden_layers, lr=train.lr, optimizer=train.optimizer,
                   batch_size=train.batch_size, max_steps=train.max_steps, patience=train.patience,
                   eval_every=train.eval_every, bf16=train.bf16,
                   sweep=dict(target=setup.sweep_task.target, n=setup.sweep_task.n, s=setup.sweep_task.s,
                              depths=list(setup.sweep_depths), width=setup.sweep_width)),
        comparison=rows,
        sweep=sweep_rows,
        wall_seconds=time.perf_counter() - t0,
    )
    path = write_results(args.name, payload, device)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
