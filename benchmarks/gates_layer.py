"""Batched top-k learned-gate layer vs a per-expert Python loop, forward + backward, for n in {8, 64} experts.

The layer is ``momlp_lite.moe.gates.TokenChoiceMoE`` (top-2, capacity factor 1.25, experts 64 -> 128 -> 64) on
4,096 tokens. The loop version shares the layer's parameters, routing and capacity decisions, and runs expert ``e``
on its kept tokens one expert at a time (gather, MLP, index_add), as code without stacked experts would. Both give the
same output (checked before timing). Writes ``results/gates_layer.json`` with device, torch version, date and commit.

    python benchmarks/gates_layer.py --threads 1          # CPU (one thread on a shared machine)
    python benchmarks/gates_layer.py --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.moe.gates import TokenChoiceMoE, assign_slots, expert_capacity, top_k_gate  # noqa: E402
from momlp_lite.runtime import best_time, get_device, torch_threads, write_results  # noqa: E402

TOKENS, DIM, WIDTH, K, CF = 4096, 64, 128, 2, 1.25


def loop_forward(layer: TokenChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer with a Python loop over experts (the baseline)."""
    weights, index, _ = top_k_gate(layer.logits(x), layer.k)
    cap = expert_capacity(x.shape[0], layer.num_experts, layer.capacity_factor, layer.k)
    _, keep, _ = assign_slots(index, layer.num_experts, cap)
    ex = layer.experts
    y = x.new_zeros(x.shape[0], ex.n_out)
    for e in range(layer.num_experts):
        tok, choice = torch.nonzero(keep & (index == e), as_tuple=True)
        h = x[tok]
        for j in range(len(ex.weights)):
            h = torch.addmm(ex.biases[j][e], h, ex.weights[j][e])
            if j < len(ex.weights) - 1:
                h = torch.where(h >= 0, h, ex.slopes[e, j] * h)
        y = y.index_add(0, tok, h * weights[tok, choice, None])
    return y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    device = get_device(args.device)
    with torch_threads(args.threads or torch.get_num_threads()):
        rows = []
        print(f"device {device}, {torch.get_num_threads()} threads; {TOKENS} tokens, d={DIM}, width {WIDTH}, "
              f"top-{K}, capacity factor {CF}; best of {args.repeats}")
        for n in args.experts:
            layer = TokenChoiceMoE(DIM, DIM, n, WIDTH, 1, k=K, capacity_factor=CF,
                                   generator=torch.Generator().manual_seed(0)).to(device)
            x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(1)).to(device)
            torch.testing.assert_close(layer(x), loop_forward(layer, x), rtol=1e-4, atol=1e-5)
            batched = best_time(lambda: layer(x).square().mean().backward(), repeats=args.repeats)
            looped = best_time(lambda: loop_forward(layer, x).square().mean().backward(), repeats=args.repeats)
            rows.append(dict(experts=n, batched_ms=1e3 * batched, loop_ms=1e3 * looped, speedup=looped / batched))
            print(f"n = {n:>3}: batched {1e3 * batched:8.2f} ms, loop {1e3 * looped:8.2f} ms, "
                  f"speed-up {looped / batched:5.2f}x")
        path = write_results("gates_layer", dict(
            benchmark="gates_layer",
            description="forward+backward of one top-2 TokenChoiceMoE: batched dispatch (scatter, bmm, index_add) "
                        "vs a Python loop over experts",
            tokens=TOKENS, dim=DIM, width=WIDTH, k=K, capacity_factor=CF, repeats=args.repeats, rows=rows,
        ), device=device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
