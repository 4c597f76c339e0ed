"""Image classification on frozen features: MoMLP vs equal-parameter dense MLP vs linear probe.

Runs the sweep of the chapter *Classifying images with MoMLPs* under the current profile
(``MOMLP_PROFILE``; the paper profile is CIFAR-10 + DINOv2 ViT-S/14 features, experts of width
1000 with 4 hidden layers, BatchNorm + PReLU, AdamW 1e-3 — meant for a GPU with internet access for
the dataset and the backbone), prints a table and writes ``momlp_lite/results/image_classification.json``
with device, torch version, date and commit. The chapter plots that file when it exists.

    MOMLP_PROFILE=paper python benchmarks/image_classification.py
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momlp_lite.classify import (  # noqa: E402
    IMAGE_TRAIN_CONFIG,
    accuracy,
    accuracy_vs_experts,
    image_setup,
    train_linear_probe,
)
from momlp_lite.runtime import get_device, get_profile, seed_everything  # noqa: E402
from momlp_lite.data import load_image_data  # noqa: E402
from momlp_lite.data.features import compute_features, get_extractor  # noqa: E402
from momlp_lite.runtime import write_results  # noqa: E402


def main() -> None:
    seed_everything(0)
    profile, device, sizes = get_profile(), get_device(), image_setup()
    data = load_image_data(sizes["dataset"], seed=0, max_train=sizes["limits"][0], max_test=sizes["limits"][1])
    name, kwargs = sizes["extractor"]
    feats = compute_features(data, get_extractor(name, **kwargs), device=device)
    config = replace(IMAGE_TRAIN_CONFIG, batch_size=sizes["batch"], max_steps=sizes["steps"], patience=None,
                     device=str(device))
    probe = train_linear_probe(feats.x_train, feats.y_train, feats.num_classes, epochs=sizes["probe_epochs"],
                               lr=1e-2, batch_size=min(len(feats.x_train), 8192), device=device)
    probe_acc = accuracy(probe(feats.x_test), feats.y_test)
    rows = accuracy_vs_experts(feats.x_train, feats.y_train, feats.x_test, feats.y_test, feats.num_classes,
                               sizes["sweep"], sizes["width"], config=config, dense=True)
    print(f"{profile.name}: {data.name} + {feats.extractor} on {device}; linear probe accuracy {probe_acc:.4f} "
          f"({probe.parameter_count:,} params, {probe.seconds:.1f} s)")
    print(f"{'model':<11}{'experts':>8}{'width':>7}{'accuracy':>10}{'params':>13}{'active':>11}{'train s':>9}")
    for r in rows:
        print(f"{r['model']:<11}{r['experts']:>8}{r['width']:>7}{r['accuracy']:>10.4f}{r['params_total']:>13,}"
              f"{r['params_active']:>11,}{r['train_seconds']:>9.1f}")
    path = write_results("image_classification", dict(
        profile=profile.name, dataset=data.name, extractor=feats.extractor, sizes={k: str(v) for k, v in sizes.items()},
        linear_probe_accuracy=probe_acc, linear_probe_params=probe.parameter_count, linear_probe_seconds=probe.seconds,
        rows=rows,
    ), device=device)
    print("wrote", path)


if __name__ == "__main__":
    main()
