"""Serving a MoMLP one expert at a time: peak memory and throughput against the number of experts.

For each tree shape of the profile (``MOMLP_PROFILE``; paper: 4 to 256 experts of width 1000 with
4 hidden layers on 384-d inputs, the size of DINOv2 ViT-S/14 features) it saves a MoMLP as an
expert store plus a dense MLP with the same total parameters, then predicts a batch three ways:
one expert at a time, all experts loaded, and dense. Inputs are Gaussian vectors — memory and speed
do not depend on their values. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the
peak bytes of live torch tensors elsewhere. Writes ``momlp_lite/results/serving_memory.json`` (device, torch
version, date, commit); the chapter *Serving a mixture one expert at a time* plots it.

    MOMLP_PROFILE=paper python benchmarks/serving_memory.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.runtime import get_device, get_profile, seed_everything  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402
from momlp_lite.store.experts import memory_vs_experts, serving_setup  # noqa: E402


def main() -> None:
    gen = seed_everything(0)
    profile, device, sizes = get_profile(), get_device(), serving_setup()
    x_fit = torch.randn(max(4 * sizes["sweep_rows"], 4**6), sizes["sweep_dim"], generator=gen)
    x = torch.randn(sizes["sweep_rows"], sizes["sweep_dim"], generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        rows = memory_vs_experts(x_fit, x, sizes["sweep"], sizes["sweep_width"], 4, 10, tmp, device)
    print(f"{profile.name} on {device}: {len(x)} rows of dimension {x.shape[1]}, experts of width {sizes['sweep_width']}")
    print(f"{'experts':>8}{'used':>6}{'peak one (MB)':>15}{'peak all (MB)':>15}{'peak dense (MB)':>17}"
          f"{'rows/s one':>12}{'rows/s all':>12}{'rows/s dense':>14}{'same':>6}")
    for r in rows:
        print(f"{r['experts']:>8}{r['experts_used']:>6}{r['peak_one_at_a_time'] / 1e6:>15.2f}"
              f"{r['peak_all_loaded'] / 1e6:>15.2f}{r['peak_dense'] / 1e6:>17.2f}{r['rows_per_s_one_at_a_time']:>12,.0f}"
              f"{r['rows_per_s_all_loaded']:>12,.0f}{r['rows_per_s_dense']:>14,.0f}{str(r['same_predictions']):>6}")
    path = write_results("serving_memory", dict(
        profile=profile.name, rows_per_batch=len(x), input_dim=x.shape[1], width=sizes["sweep_width"],
        hidden_layers=4, memory_measure=rows[0]["memory_measure"], rows=rows,
    ), device=device)
    print("wrote", path)


if __name__ == "__main__":
    main()
