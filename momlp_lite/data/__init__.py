"""Data: grid targets on [a, b]^n, image datasets, frozen features."""

from .grid import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
