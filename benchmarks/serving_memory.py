"""Serving a MoMLP one expert at a time: peak memory and throughput against the number of experts.

A micro-benchmark on Gaussian inputs (memory and speed do not depend on their values), written as its own loop over
the store's primitives, like section 5 of book/serving_one_expert (the chapter, run under the paper profile, records
the same measurement on real features). For each tree shape it saves a MoMLP as an expert store and a dense MLP with
the same total parameters, then predicts one batch three ways: one expert at a time, all experts loaded, dense.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the peak bytes of live torch tensors elsewhere.
Writes ``momlp_lite/results/serving_memory_bench.json``.

    MOMLP_PROFILE=paper python benchmarks/serving_memory.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.moe.experts import StackedMLP  # noqa: E402
from momlp_lite.moe.routing import RoutingTree  # noqa: E402
from momlp_lite.runtime import choose, get_device, get_profile, seed_everything, write_results  # noqa: E402
from momlp_lite.store.experts import ExpertStore  # noqa: E402

SIZES = choose(smoke=dict(shapes=[(1, 4), (2, 4)], width=32, dim=8, rows=200),
               default=dict(shapes=[(1, 4), (2, 4), (3, 4)], width=256, dim=48, rows=1000),
               paper=dict(shapes=[(1, 4), (2, 4), (3, 4), (4, 4)], width=1000, dim=384, rows=10_000))


def main() -> None:
    gen = seed_everything(0)
    profile, device = get_profile(), get_device()
    x_fit = torch.randn(max(4 * SIZES["rows"], 4**6), SIZES["dim"], generator=gen)
    x = torch.randn(SIZES["rows"], SIZES["dim"], generator=gen)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth, branching in SIZES["shapes"]:
            tree = RoutingTree.from_data(x_fit, depth=depth, branching=branching, seed=0)
            num = tree.num_leaves
            moe = StackedMLP(num, x.shape[1], SIZES["width"], 4, 10, batchnorm=True, generator=gen).eval()
            dense = StackedMLP.dense_with_budget(num * moe.parameters_per_expert, x.shape[1], 4, 10, batchnorm=True,
                                                 generator=gen).eval()
            stores = {"moe": ExpertStore.save(Path(tmp) / f"m{num}", moe, tree),
                      "dense": ExpertStore.save(Path(tmp) / f"d{num}", dense, RoutingTree.single(dense.n_in))}
            del moe, dense
            row = {"experts": num, "params_per_expert": stores["moe"].parameters_per_expert}
            for way, serve in [("one_at_a_time", stores["moe"].predict), ("all_loaded", stores["moe"].predict_all_loaded),
                               ("dense", stores["dense"].predict)]:
                row[f"peak_{way}"] = serve(x, device).peak_bytes
                row[f"rows_per_s_{way}"] = len(x) / serve(x, device, measure_memory=False).seconds
            rows.append(row)
            print({k: (round(v) if isinstance(v, float) else v) for k, v in row.items()})
    path = write_results("serving_memory_bench", dict(profile=profile.name, rows_per_batch=len(x), input_dim=x.shape[1],
                                                      width=SIZES["width"], hidden_layers=4, rows=rows), device=device)
    print("wrote", path)


if __name__ == "__main__":
    main()
