"""momlp_lite: Mixture-of-Experts MLPs for the momlp-book.

Subpackages and modules, by the book's parts
--------------------------------------------
runtime      profiles, ``choose``, seeding, device, ``start_chapter``, timing, recorded results
moe          routing trees, stacked experts, the Algorithm 2 trainer (order, trainer, reference, fast path),
             parameter counts, learned gates (top-k, expert choice), a tiny ViT with MoE FFNs, the learned soft tree
softmoe      the Soft MoE layer, best-expert-subset selection, the papers' tasks
data         grid targets on [a, b]^n, image datasets, frozen features
store        checked files, the expert store (one file per expert, loaded one at a time)
distributed  run configs, training experts on many processes (torchrun), the ``momlp-train`` CLI
theory       approximation-rate constructions and VC-dimension bounds
viz          plotly figures for the static book, ipywidgets controls
"""

from .data import load_image_data
from .data.features import compute_features
from .moe.experts import StackedMLP
from .moe.gates import TokenChoiceMoE
from .moe.reference import train_experts_serial
from .moe.routing import RoutingTree
from .moe.trainer import TrainConfig, train_experts
from .runtime import choose, load_results, start_chapter, write_results
from .softmoe.layer import SoftMoE
from .store.experts import ExpertStore

__version__ = "0.1.0"

# Only what the chapters use; everything else is imported from its subpackage (e.g. momlp_lite.store.experts).
__all__ = [
    "start_chapter", "choose", "load_results", "write_results",
    "RoutingTree", "StackedMLP", "TrainConfig", "train_experts", "train_experts_serial", "TokenChoiceMoE",
    "SoftMoE", "ExpertStore", "load_image_data", "compute_features",
]
