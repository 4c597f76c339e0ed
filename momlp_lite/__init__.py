"""momlp_lite: Mixture-of-Experts MLPs for the momlp-book.

Modules
-------
config         run profiles, seeding, device choice
chapter        start_chapter(): what every chapter runs first
data           grid data on [a, b]^n, Lipschitz targets, image datasets
routing        routing trees (regular and recursive k-means)
sizes          parameter counts and equal-parameter widths
experts        many MLP experts as stacked weights, run with batched matmuls
train          Algorithm 2: experts trained independently in lockstep; serial reference; dense baseline
regression     MoMLP vs dense MLP on grid regression
theory         approximation-rate constructions and VC-dimension bounds
softmoe        Soft MoE layer and best-expert-subset selection
softmoe_tasks  the Soft MoE papers' tasks (the norm task, MNIST patches)
plots          plotly figures that render in the static book
live           ipywidgets controls for live exploration (Jupyter, Colab)
features       frozen feature extractors (pixels, PCA, DINOv2) with an on-disk cache
classify       linear probe, MoMLP and dense classifiers on features
store          one file per expert; inference that loads one expert at a time
runconfig      config files for training runs (validated before any training)
distributed    train a MoMLP's experts on many processes/machines (torchrun), resumable
bench          timing helpers; results: recorded results (JSON with device, date, commit)
"""

from .chapter import Chapter, start_chapter
from .config import choose, describe_run, get_device, get_profile, seed_everything
from .data import DatasetUnavailableError, load_image_data
from .experts import StackedMLP
from .features import compute_features, get_extractor
from .routing import RoutingTree
from .runconfig import ConfigError, RunConfig, load_run_config
from .softmoe import SoftMoE, expert_subset, set_expert_subset
from .store import ExpertStore, StoreError
from .theory import build_interpolating_momlp, dense_vc_lower, dense_vc_upper, momlp_vc_bound, plan_construction
from .train import TrainConfig, TrainResult, train_dense, train_experts, train_experts_serial

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
