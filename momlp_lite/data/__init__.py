"""Data: grid targets on [a, b]^n, image datasets (one loader, one split rule, one container), frozen features."""

from .grid import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
