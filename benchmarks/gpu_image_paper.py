"""The paper-profile image run for the GPU script: book/image_classification under MOMLP_PROFILE=paper.

A paper-profile run *is* the chapter: this script executes the notebook with nbclient, with the
sizes cell amended by one line that names the datasets whose files are present on this machine
(CIFAR-10, CIFAR-100, Food-101 under ``$MOMLP_DATA``, and DINOv2 ViT-S/14 where ``torch.hub``
keeps it). The chapter measures feature extraction and training and writes
``results/image_paper_<dataset>.json`` itself. Datasets without files are skipped with a line
saying what is missing. The lead's GPU script can call :func:`run` (it returns the datasets run).

    MOMLP_DATA=/data python benchmarks/gpu_image_paper.py [--timeout SECONDS] [cifar10 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from momlp_lite.data import IMAGE_DATASETS, PAPER_DATASETS, data_root  # noqa: E402
from momlp_lite.data.features import dinov2_files  # noqa: E402
from momlp_lite.runtime import get_profile  # noqa: E402

CHAPTER = ROOT / "book" / "image_classification.ipynb"
# the file torchvision's loader checks first for each dataset, relative to its folder
MARKERS = {"cifar10": "batches.meta", "cifar100": "meta", "food101": "meta/train.json"}


def missing_files(name: str, root: Path | None = None) -> str | None:
    """Why ``name`` cannot run here (its files or the backbone's are absent), or None when it can."""
    folder = data_root(root) / IMAGE_DATASETS[name].folder
    if not (folder / MARKERS[name]).is_file():
        return f"{folder / MARKERS[name]} is missing (download {IMAGE_DATASETS[name].title} into {folder})"
    code, weights = dinov2_files("dinov2_vits14")
    for path in (code / "hubconf.py", weights):
        if not path.is_file():
            return f"DINOv2 ViT-S/14 is missing: {path} (torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14'))"
    return None


def paper_notebook(datasets: list[str], extra: str = ""):
    """The chapter with its sizes cell amended: ``sizes["datasets"] = [...]`` plus ``extra`` lines."""
    import nbformat

    nb = nbformat.read(CHAPTER, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "sizes = ml.choose(" in c.source]
    cell.source += f"\nsizes[\"datasets\"] = {datasets!r}  # set by benchmarks/gpu_image_paper.py\n" + extra
    return nb


def run(datasets: list[str] | None = None, timeout_s: int | None = None) -> list[str]:
    """Execute the chapter under the paper profile for the datasets present; print a line per skipped one.

    ``timeout_s`` bounds each notebook cell (default: the paper profile's cell timeout).
    """
    todo = []
    for name in datasets or list(PAPER_DATASETS):
        why = missing_files(name)
        if why is None:
            todo.append(name)
        else:
            print(f"skip {name}: {why}")
    if not todo:
        print("image paper run: no dataset has its files here; nothing run")
        return []
    from nbclient import NotebookClient

    os.environ["MOMLP_PROFILE"] = "paper"
    nb = paper_notebook(todo)
    timeout_s = timeout_s or get_profile("paper").cell_timeout_s
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "book")}}).execute()
    print(f"image paper run: {', '.join(todo)} in {time.perf_counter() - start:.0f} s; "
          f"wrote results/image_paper_<dataset>.json for each")
    return todo


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", help=f"some of {PAPER_DATASETS} (default: all)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per notebook cell (default: the profile's)")
    args = parser.parse_args()
    run(args.datasets or None, args.timeout)
