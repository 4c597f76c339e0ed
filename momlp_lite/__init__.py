"""momlp_lite: Mixture-of-Experts MLPs for the momlp-book.

Subpackages and modules, by the book's parts
--------------------------------------------
runtime      profiles, ``choose``, seeding, device, ``start_chapter``, timing, recorded results
moe          routing trees, stacked experts, Algorithm 2 trainer and its plain reference, parameter counts
softmoe      the Soft MoE layer, best-expert-subset selection, the papers' tasks
data         grid targets on [a, b]^n, image datasets, frozen features
store        checked files, the expert store (one file per expert, loaded one at a time)
distributed  run configs, training experts on many processes (torchrun), the ``momlp-train`` CLI
theory       approximation-rate constructions and VC-dimension bounds
viz          plotly figures for the static book, ipywidgets controls
"""

from .data import DatasetUnavailableError, load_image_data
from .data.features import compute_features, get_extractor
from .distributed.config import ConfigError, RunConfig, load_run_config
from .moe.experts import StackedMLP
from .moe.routing import RoutingTree
from .moe.trainer import TrainConfig, TrainResult, train_dense, train_experts, train_experts_serial
from .runtime import Chapter, choose, describe_run, get_device, get_profile, seed_everything, start_chapter
from .softmoe.layer import SoftMoE, expert_subset, set_expert_subset
from .store.experts import ExpertStore, StoreError
from .theory import build_interpolating_momlp, dense_vc_lower, dense_vc_upper, momlp_vc_bound, plan_construction

__version__ = "0.1.0"

__all__ = [
    "Chapter",
    "ConfigError",
    "DatasetUnavailableError",
    "ExpertStore",
    "RunConfig",
    "StoreError",
    "compute_features",
    "get_extractor",
    "load_image_data",
    "load_run_config",
    "RoutingTree",
    "SoftMoE",
    "StackedMLP",
    "TrainConfig",
    "TrainResult",
    "build_interpolating_momlp",
    "choose",
    "dense_vc_lower",
    "dense_vc_upper",
    "describe_run",
    "expert_subset",
    "get_device",
    "get_profile",
    "momlp_vc_bound",
    "plan_construction",
    "seed_everything",
    "set_expert_subset",
    "start_chapter",
    "train_dense",
    "train_experts",
    "train_experts_serial",
]
