"""momlp_lite: Mixture-of-Experts MLPs for the momlp-book.

Modules
-------
config   run profiles, seeding, device choice
data     grid data on [a, b]^n and Lipschitz targets
routing  routing trees (regular and recursive k-means)
plots    plotly figures that render in the static book
chapter  start_chapter(): what every chapter runs first
"""

from .chapter import Chapter, start_chapter
from .config import choose, describe_run, get_device, get_profile, seed_everything
from .routing import RoutingTree

__version__ = "0.1.0"

__all__ = [
    "Chapter",
    "RoutingTree",
    "choose",
    "describe_run",
    "get_device",
    "get_profile",
    "seed_everything",
    "start_chapter",
]
