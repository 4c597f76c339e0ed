"""Training throughput: serial loop vs batched (stacked) experts vs the equal-parameter dense MLP.

One optimizer step = forward + backward + Adam update, on random data. For every number of
experts L, per-expert batch B and precision it prints samples/s, achieved TFLOP/s (counted as
6 x multiply-adds per sample, optimizer included in the time) and the ratios, and writes JSON to
``momlp_lite/results/<name>.json`` with device, torch version, date and commit.

Modes
-----
serial   one ``nn.Sequential`` + one optimizer per expert, stepped one after another (the loop the
         lockstep trainer replaces). Timed on ``--serial-experts`` experts and scaled to L.
batched  ``StackedMLP`` + :class:`momlp_lite.moe.fast.FastStep` (fused Adam on CUDA).
graph    batched, with the whole step captured in a CUDA graph (CUDA only).
compile  batched, with ``torch.compile`` of forward+loss (CUDA only, opt-in: ``--modes ... compile``).
dense    one MLP with as many parameters as all L experts, batch L*B (capped by ``--dense-max-batch``).

With ``--trainers`` it also times the whole trainers end to end (``train_experts``, the lockstep loop, against
``train_experts_serial``, the plain reference loop) on the same work and reports expert-steps per second.

Examples
--------
GPU (the issue's table)::

    python benchmarks/experts_training.py

CPU, small sizes (what CI-class machines can run)::

    python benchmarks/experts_training.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.runtime import get_device  # noqa: E402
from momlp_lite.moe.experts import StackedMLP  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402
from momlp_lite.moe.fast import FastOptions, FastStep  # noqa: E402
from momlp_lite.moe.reference import train_experts_serial  # noqa: E402
from momlp_lite.moe.trainer import TrainConfig, train_experts  # noqa: E402


def macs_per_sample(model: StackedMLP) -> int:
    """Multiply-adds of one sample through one expert (biases and activations not counted)."""
    w, h = model.width, model.hidden_layers
    return model.n_in * w + (h - 1) * w * w + w * model.n_out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device, repeats: int) -> float:
    """Median seconds per call over ``repeats`` runs of ``steps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        runs.append((time.perf_counter() - t0) / steps)
    return statistics.median(runs)


def make_step(net: torch.nn.Module, precision: str, mode: str, lr: float, device: torch.device) -> FastStep:
    opts = FastOptions(bf16=precision == "bf16", cuda_graph=mode == "graph", compile=mode == "compile")
    return FastStep(net, TrainConfig(lr=lr, progress=False), opts, device)


def bench_batched(L: int, B: int, args: argparse.Namespace, precision: str, mode: str,
                  device: torch.device) -> dict[str, float]:
    model = StackedMLP(L, args.n_in, args.width, args.hidden_layers, 1, device=device)
    step = make_step(model, precision, mode, args.lr, device)
    x = torch.randn(L, B, args.n_in, device=device)
    y = torch.randn(L, B, 1, device=device)
    sec = time_steps(lambda: step(x, y), args.steps, args.warmup, device, args.repeats)
    samples = L * B
    return dict(seconds_per_step=sec, samples_per_s=samples / sec,
                tflops=6 * macs_per_sample(model) * samples / sec / 1e12)


def bench_serial(L: int, B: int, args: argparse.Namespace, precision: str, device: torch.device) -> dict[str, float]:
    timed = min(L, args.serial_experts)
    stack = StackedMLP(timed, args.n_in, args.width, args.hidden_layers, 1, device=device)
    experts = [stack.expert_module(i) for i in range(timed)]
    steps = [make_step(m, precision, "serial", args.lr, device) for m in experts]  # nn.Sequential on [1, B, in]
    x = torch.randn(1, B, args.n_in, device=device)
    y = torch.randn(1, B, 1, device=device)

    def one_round() -> None:
        for s in steps:  # the serial loop over experts this benchmark exists to measure
            s(x, y)

    per_round = time_steps(one_round, max(1, args.steps // 4), 1, device, args.repeats)
    sec = per_round / timed * L  # scaled to L experts
    return dict(seconds_per_step=sec, samples_per_s=L * B / sec,
                tflops=6 * macs_per_sample(stack) * L * B / sec / 1e12, timed_experts=timed)


def bench_dense(L: int, B: int, args: argparse.Namespace, precision: str, device: torch.device) -> dict[str, float]:
    experts = StackedMLP(1, args.n_in, args.width, args.hidden_layers, 1)
    model = StackedMLP.dense_with_budget(L * experts.parameters_per_expert, args.n_in, args.hidden_layers, 1,
                                         device=device)
    batch = min(L * B, args.dense_max_batch)
    step = make_step(model, precision, "dense", args.lr, device)
    x = torch.randn(1, batch, args.n_in, device=device)
    y = torch.randn(1, batch, 1, device=device)
    sec = time_steps(lambda: step(x, y), max(1, args.steps // 2), args.warmup, device, args.repeats)
    return dict(seconds_per_step=sec, samples_per_s=batch / sec, dense_batch=batch, width=model.width,
                tflops=6 * macs_per_sample(model) * batch / sec / 1e12)


def bench_trainers(L: int, B: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Whole trainers on the same work: expert-steps per second of the lockstep loop and of the serial loop."""
    g = torch.Generator().manual_seed(0)
    n = L * B * 4
    x = torch.rand(n, args.n_in, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    leaf = torch.arange(n) % L
    cfg = TrainConfig(lr=1e-3, batch_size=B, max_steps=args.trainer_steps, eval_every=max(1, args.trainer_steps // 2),
                      patience=None, progress=False, device=str(device))
    out = {}
    for name, train in (("lockstep", train_experts), ("serial", train_experts_serial)):
        best = float("inf")
        for _ in range(args.repeats):
            model = StackedMLP(L, args.n_in, args.width, args.hidden_layers, 1, seed=0, device=device)
            t0 = time.perf_counter()
            train(model, x, y, leaf, cfg)
            best = min(best, time.perf_counter() - t0)
        out[name] = L * cfg.max_steps / best
    return dict(lockstep_expert_steps_per_s=out["lockstep"], serial_expert_steps_per_s=out["serial"],
                ratio_lockstep_over_serial=out["lockstep"] / out["serial"], steps=cfg.max_steps)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU: width 64, L in {4,16}, B in {32,128}")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--hidden-layers", type=int, default=3)
    p.add_argument("--n-in", type=int, default=3)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--precisions", nargs="+", default=None, help="fp32 (TF32 matmuls on CUDA) and/or bf16")
    p.add_argument("--modes", nargs="+", default=None, help="serial batched graph compile dense")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serial-experts", type=int, default=16, help="experts the serial loop is timed on")
    p.add_argument("--dense-max-batch", type=int, default=65536)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--trainers", action="store_true", help="also time train_experts against train_experts_serial")
    p.add_argument("--trainer-steps", type=int, default=40, help="steps per trainer run with --trainers")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default=None)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--name", default=None, help="momlp_lite/results/<name>.json (default: experts_training[_quick_<device>])")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.experts, args.batches = 64, [4, 16], [32, 128]
        args.steps, args.warmup, args.serial_experts, args.dense_max_batch = 10, 2, 4, 4096
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" on a GPU means TF32 tensor-core matmuls
        torch.backends.cudnn.allow_tf32 = True
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    modes = args.modes or (["serial", "batched", "graph", "dense"] if cuda else ["serial", "batched", "dense"])
    modes = [m for m in modes if cuda or m not in ("graph", "compile")]  # CUDA-only levers are skipped on a CPU
    rows = []
    header = f"{'L':>4} {'B':>5} {'prec':>5} {'mode':>8} {'samples/s':>12} {'TFLOP/s':>8} {'ms/step':>9}  notes"
    print(header)
    print("-" * len(header))
    for L in args.experts:
        for B in args.batches:
            for prec in precisions:
                found: dict[str, dict[str, float]] = {}
                for mode in modes:
                    try:
                        if mode == "serial":
                            r = bench_serial(L, B, args, prec, device)
                        elif mode == "dense":
                            r = bench_dense(L, B, args, prec, device)
                        else:
                            r = bench_batched(L, B, args, prec, mode, device)
                    except torch.OutOfMemoryError:
                        print(f"{L:>4} {B:>5} {prec:>5} {mode:>8}  out of memory")
                        if cuda:
                            torch.cuda.empty_cache()
                        continue
                    found[mode] = r
                    note = ""
                    if mode == "serial":
                        note = f"timed on {int(r['timed_experts'])} experts"
                    elif mode == "dense":
                        note = f"width {int(r['width'])}, batch {int(r['dense_batch'])}"
                    elif "serial" in found:
                        note = f"{r['samples_per_s'] / found['serial']['samples_per_s']:.1f}x serial"
                    print(f"{L:>4} {B:>5} {prec:>5} {mode:>8} {r['samples_per_s']:>12.4g} {r['tflops']:>8.3g} "
                          f"{r['seconds_per_step'] * 1e3:>9.3f}  {note}")
                    rows.append(dict(experts=L, batch=B, precision=prec, mode=mode, **r))
                    if cuda:
                        torch.cuda.empty_cache()
                best = max((found[m]["samples_per_s"], m) for m in found if m not in ("serial", "dense")) if any(
                    m not in ("serial", "dense") for m in found) else None
                if best and "serial" in found:
                    ratio = best[0] / found["serial"]["samples_per_s"]
                    dense = (f", {best[0] / found['dense']['samples_per_s']:.1f}x dense samples/s"
                             if "dense" in found else "")
                    print(f"{'':>4} {'':>5} {'':>5} {'best':>8}  {best[1]}: {ratio:.1f}x the serial loop{dense}")
                    rows.append(dict(experts=L, batch=B, precision=prec, mode="summary", best_mode=best[1],
                                     speedup_vs_serial=ratio,
                                     samples_ratio_vs_dense=(best[0] / found["dense"]["samples_per_s"]
                                                             if "dense" in found else None)))
    if args.trainers:
        for L in args.experts:
            for B in args.batches:
                r = bench_trainers(L, B, args, device)
                print(f"{L:>4} {B:>5}  trainers: lockstep {r['lockstep_expert_steps_per_s']:.4g} expert-steps/s, "
                      f"serial {r['serial_expert_steps_per_s']:.4g}: {r['ratio_lockstep_over_serial']:.1f}x")
                rows.append(dict(experts=L, batch=B, precision="fp32", mode="trainers", **r))
    name = args.name or ("experts_training" + ("" if not args.quick else f"_quick_{device.type}"))
    payload = dict(
        benchmark="experts_training",
        note=args.note,
        flop_count="6 x multiply-adds per sample (forward 2, backward 4), optimizer step included in the time",
        settings=dict(width=args.width, hidden_layers=args.hidden_layers, n_in=args.n_in, steps=args.steps,
                      warmup=args.warmup, repeats=args.repeats, serial_experts=args.serial_experts,
                      dense_max_batch=args.dense_max_batch, quick=args.quick, threads=torch.get_num_threads()),
        rows=rows,
    )
    path = write_results(name, payload, device)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
