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
bench          timing helpers; results: recorded results (JSON with device, date, commit)
"""

from .chapter import Chapter, start_chapter
from .config import choose, describe_run, get_device, get_profile, seed_everything
from .experts import StackedMLP
from .routing import RoutingTree
from .softmoe import SoftMoE, expert_subset, set_expert_subset
from .theory import build_interpolating_momlp, dense_vc_lower, dense_vc_upper, momlp_vc_bound, plan_construction
from .train import TrainConfig, TrainResult, train_dense, train_experts, train_experts_serial

__version__ = "0.1.0"

__all__ = [
    "Chapter",
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
