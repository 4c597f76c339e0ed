"""Batched Soft MoE layer vs a per-expert Python loop, forward + backward, for n in {8, 64, 512} experts.

The layer is the MNIST one of Chung et al.: 4 tokens of dimension 196, experts 196 → 784/n → 196, so the experts
hold the same ~307K weights for every n. Both versions share the same parameters and give the same output (checked
before timing). Writes ``results/softmoe_layer.json`` with the device name, torch version, date and git commit.

    python benchmarks/softmoe_layer.py            # batch 256, 20 repeats
    python benchmarks/softmoe_layer.py --quick    # batch 64, 3 repeats (CPU smoke run)
    python benchmarks/softmoe_layer.py --quick --threads 1   # on a shared CPU: avoids oversubscription
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from momlp_lite.config import get_device
from momlp_lite.softmoe import SoftMoE, softmoe_forward_expert_loop

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(fn, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Best wall time (s) of ``fn(x).sum().backward()`` over ``repeats`` runs after ``warmup`` runs."""
    best = float("inf")
    for i in range(warmup + repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        fn(x).square().mean().backward()
        _sync(x.device)
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch and few repeats (CPU smoke run)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: momlp_lite.config.get_device())")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "softmoe_layer.json")
    args = parser.parse_args()
    batch = args.batch or (64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3
    device = get_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens, dim = 4, 196

    rows = []
    print(f"device: {device_name(device)}; batch {batch}, {tokens} tokens of dim {dim}; best of {repeats}")
    print(f"{'n':>5} {'hidden':>6} | {'batched (ms)':>12} {'python loop (ms)':>16} | {'speed-up':>8}")
    for n in args.experts:
        hidden = max(1, dim * 4 // n)
        gen = torch.Generator().manual_seed(0)
        layer = SoftMoE(dim, n, hidden, phi_init="uniform", generator=gen).to(device)
        x = torch.randn(batch, tokens, dim, generator=gen).to(device)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), softmoe_forward_expert_loop(layer, x), rtol=1e-4, atol=1e-5)
        t_batched = time_step(layer, x, repeats, warmup)
        t_loop = time_step(lambda inp: softmoe_forward_expert_loop(layer, inp), x, repeats, warmup)
        rows.append(dict(experts=n, hidden=hidden, batched_ms=1e3 * t_batched, loop_ms=1e3 * t_loop,
                         speedup=t_loop / t_batched))
        print(f"{n:>5} {hidden:>6} | {1e3 * t_batched:12.2f} {1e3 * t_loop:16.2f} | {t_loop / t_batched:7.1f}×")

    payload = dict(
        benchmark="softmoe_layer",
        description="forward+backward of one Soft MoE layer: batched experts (bmm) vs a Python loop over experts",
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        quick=args.quick,
        batch=batch,
        tokens=tokens,
        dim=dim,
        repeats=repeats,
        rows=rows,
    )
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
