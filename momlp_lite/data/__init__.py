"""Data: grid targets on [a, b]^n, image datasets (one loader, one split rule, one container), frozen features.

Taught in: book/momlp_grid_regression (grid), book/image_classification (images, features).
"""

from .grid import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
