"""Shared pytest setup: tests run on CPU with deterministic seeds; hypothesis kept quick."""

import os

from hypothesis import settings

os.environ.setdefault("MOMLP_PROFILE", "smoke")
settings.register_profile("momlp", max_examples=60, deadline=None)
settings.load_profile("momlp")
