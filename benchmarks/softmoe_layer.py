"""Batched Soft MoE layer vs a per-expert Python loop, forward + backward, for n in {8, 64, 512} experts.

The layer is the MNIST one of Chung et al.: 4 tokens of dimension 196, experts 196 → 784/n → 196, so the experts
hold the same ~307K weights for every n. Both versions share the same parameters and give the same output (checked
before timing). Writes ``momlp_lite/results/softmoe_layer.json`` with the device name, torch version, date and git commit
(``momlp_lite.runtime.write_results``).

    python benchmarks/softmoe_layer.py            # batch 256, 20 repeats
    python benchmarks/softmoe_layer.py --quick    # batch 64, 3 repeats (CPU smoke run)
    python benchmarks/softmoe_layer.py --quick --threads 1   # on a shared CPU: avoids oversubscription
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.runtime import best_time, torch_threads  # noqa: E402
from momlp_lite.runtime import get_device  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402
from momlp_lite.softmoe.layer import SoftMoE  # noqa: E402

TOKENS, DIM = 4, 196  # the MNIST layer: 4 patches of 14 × 14 pixels


def forward_expert_loop(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer with a Python loop over experts, as many public implementations do (the baseline)."""
    tokens, dispatch, combine = layer.route(x)
    slots = dispatch.transpose(1, 2) @ tokens  # [B, n·p, d]
    p, act = layer.slots_per_expert, torch.relu
    outs = []
    for j in range(layer.num_experts):
        h = slots[:, j * p : (j + 1) * p] @ layer.w1[j]
        if layer.b1 is not None:
            h = h + layer.b1[j]
        o = act(h) @ layer.w2[j]
        if layer.b2 is not None:
            o = o + layer.b2[j]
        outs.append(o)
    return combine @ torch.cat(outs, dim=1)


def step_time(fn, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Best wall time (s) of one forward + backward of ``fn(x)``."""
    return best_time(lambda: fn(x).square().mean().backward(), repeats=repeats, warmup=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch and few repeats (CPU smoke run)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: momlp_lite.config.get_device())")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    batch = args.batch or (64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3
    device = get_device(args.device)
    threads = torch_threads(args.threads) if args.threads is not None else contextlib.nullcontext()
    with threads:  # written inside, so the recorded metadata names the thread count that ran
        rows = run(args.experts, batch, repeats, warmup, device)
        path = write_results(
            "softmoe_layer",
            dict(
                benchmark="softmoe_layer",
                description="forward+backward of one Soft MoE layer: batched experts (bmm) vs a Python loop over experts",
                quick=args.quick,
                batch=batch,
                tokens=TOKENS,
                dim=DIM,
                repeats=repeats,
                rows=rows,
            ),
            device=device,
        )
    print(f"wrote {path}")


def run(experts: list[int], batch: int, repeats: int, warmup: int, device: torch.device) -> list[dict]:
    """Time the batched layer and the per-expert loop for each number of experts; print a table."""
    tokens, dim = TOKENS, DIM
    rows = []
    print(f"device: {device}, {torch.get_num_threads()} threads; batch {batch}, {tokens} tokens of dim {dim}; best of {repeats}")
    print(f"{'n':>5} {'hidden':>6} | {'batched (ms)':>12} {'python loop (ms)':>16} | {'speed-up':>8}")
    for n in experts:
        hidden = max(1, dim * 4 // n)
        gen = torch.Generator().manual_seed(0)
        layer = SoftMoE(dim, n, hidden, phi_init="uniform", generator=gen).to(device)
        x = torch.randn(batch, tokens, dim, generator=gen).to(device)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), forward_expert_loop(layer, x), rtol=1e-4, atol=1e-5)
        t_batched = step_time(layer, x, repeats, warmup)
        t_loop = step_time(lambda inp: forward_expert_loop(layer, inp), x, repeats, warmup)
        rows.append(dict(experts=n, hidden=hidden, batched_ms=1e3 * t_batched, loop_ms=1e3 * t_loop,
                         speedup=t_loop / t_batched))
        print(f"{n:>5} {hidden:>6} | {1e3 * t_batched:12.2f} {1e3 * t_loop:16.2f} | {t_loop / t_batched:7.1f}×")

    return rows


if __name__ == "__main__":
    main()
