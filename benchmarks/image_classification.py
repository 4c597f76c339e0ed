"""What a paper-profile image run would cost, estimated from throughput measured here (no GPU needed).

Measures on this machine (1) the images per second of a network with DINOv2 ViT-S/14's exact shape
(patch 14, width 384, 12 blocks, 6 heads, MLP 1536, 224 × 224 input: 257 tokens) — with **random
weights**, since the pretrained ones cannot be downloaded here; the cost of a forward pass does not
depend on the weights — and (2) the seconds per lockstep step of the chapter's paper heads (experts of
width 1000, 4 hidden layers, BatchNorm + PReLU, AdamW, on 384-d features) for each number of
experts, and of their equal-parameter dense twins. Multiplied by the images of each dataset and by the
chapter's 2,000 steps they give the time of a paper run on this machine, written as an **estimate**
to ``momlp_lite/results/image_paper_<dataset>.json`` for every dataset that has no measured (GPU) file yet.
A GPU run of the chapter replaces the file with measured numbers.

    python benchmarks/image_classification.py [--force]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.data import IMAGE_DATASETS, PAPER_DATASETS  # noqa: E402
from momlp_lite.moe.experts import StackedMLP  # noqa: E402
from momlp_lite.moe.trainer import TrainConfig, train_experts  # noqa: E402
from momlp_lite.runtime import load_results, write_results  # noqa: E402

# the chapter's paper sizes (book/image_classification, sizes cell)
WIDTH, HIDDEN, STEPS, BATCH, EXPERTS, FEATURE_DIM = 1000, 4, 2000, 256, (1, 4, 16), 384


class ViTS14Shape(nn.Module):
    """DINOv2 ViT-S/14's architecture with random weights: for timing only, its outputs mean nothing."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, image_size: int = 224) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 14, stride=14)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, (image_size // 14) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.norm(self.blocks(t))[:, 0]


@torch.no_grad()
def backbone_images_per_second(batch: int = 16, repeats: int = 3) -> float:
    net = ViTS14Shape().eval()
    x = torch.rand(batch, 3, 224, 224)
    net(x[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        net(x)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def seconds_per_step(model: StackedMLP, batch: int, classes: int, steps: int = 3) -> float:
    """Seconds per lockstep step of ``model`` (best of ``steps`` one-step runs after a warm-up)."""
    rows = batch * model.num_experts
    x, y = torch.randn(rows, FEATURE_DIM), torch.randint(0, classes, (rows,))
    leaf = torch.arange(rows) % model.num_experts
    cfg = TrainConfig(loss="cross_entropy", optimizer="adamw", lr=1e-3, batch_size=batch, max_steps=1,
                      val_fraction=0.0, patience=None, progress=False, device="cpu")
    train_experts(model, x, y, leaf, cfg)
    return min(train_experts(model, x, y, leaf, cfg).seconds for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite measured (GPU) files too")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    ips = backbone_images_per_second()
    print(f"ViT-S/14-shaped backbone (random weights), 224 px, {threads} threads: {ips:.1f} images/s")
    for name in PAPER_DATASETS:
        old = load_results(f"image_paper_{name}")
        if old is not None and old.get("status") == "measured" and not args.force:
            print(f"{name}: a measured run is recorded; keeping it")
            continue
        classes = IMAGE_DATASETS[name].num_classes
        step, heads = {}, 0.0
        for L in EXPERTS:
            experts = StackedMLP(L, FEATURE_DIM, WIDTH, HIDDEN, classes, batchnorm=True)
            budget = L * experts.parameters_per_expert
            s_mo = seconds_per_step(experts, BATCH, classes, steps=1 if L > 4 else 3)
            if L <= 4:
                dense = StackedMLP.dense_with_budget(budget, FEATURE_DIM, HIDDEN, classes, batchnorm=True)
                s_dense = seconds_per_step(dense, BATCH * L, classes, steps=1)
                scale = ""
            else:  # too slow to time on a CPU: scale the L = 4 twin by parameters x rows per step
                ref = step[4]
                s_dense = ref["dense_s"] * (budget * BATCH * L) / (ref["budget"] * BATCH * 4)
                scale = " (scaled from L=4 by parameters x rows)"
            step[L] = dict(momlp_s=s_mo, dense_s=s_dense, budget=budget)
            heads += STEPS * (s_mo + s_dense)
            print(f"{name}: L={L}: {s_mo:.3f} s per MoMLP step, {s_dense:.3f} s per dense step{scale}")
        images = sum(IMAGE_DATASETS[name].sizes)
        path = write_results(f"image_paper_{name}", dict(
            dataset=name, status="estimate", profile="paper",
            feature_images=images, backbone_images_per_second=ips, feature_seconds_estimate=images / ips,
            head_seconds_per_step={str(k): v for k, v in step.items()}, steps=STEPS,
            train_seconds_estimate=heads, gpu_ratio=None,
            note=("Estimate: a random-weight ViT-S/14-shaped network and the paper heads timed on this CPU, "
                  f"{threads} threads, on a shared machine under load (load average {os.getloadavg()[0]:.1f}); JPEG decoding (Food-101) is not included. "
                  "No GPU run has been recorded, so there is no GPU/CPU ratio to scale by: on a GPU both are "
                  "expected to be far shorter. Running the chapter with MOMLP_PROFILE=paper on a GPU replaces "
                  "this file with measured numbers."),
        ), device="cpu")
        print(f"{name}: features ≈ {images / ips / 3600:.1f} h for {images:,} images, heads ≈ {heads / 3600:.1f} h "
              f"on this CPU; wrote {path}")


if __name__ == "__main__":
    main()
