"""momlp_lite: Mixture-of-Experts MLPs for the momlp-book. Subpackages follow the book's parts: runtime, moe,
softmoe, data, store, distributed, theory, viz (README's Layout section says what each holds)."""

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
