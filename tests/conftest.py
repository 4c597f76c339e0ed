"""Shared pytest setup: smoke profile, one torch thread, quick hypothesis runs."""

import os

import pytest
from hypothesis import settings

from momlp_lite.runtime import torch_threads

os.environ.setdefault("MOMLP_PROFILE", "smoke")
# Progress bars redraw at most every 10 s in tested notebooks: fewer widget messages per long cell. (The nbval
# "waiting for output" failure of vc_dimension was fixed in the chapter and the trainer, not by this.)
os.environ.setdefault("TQDM_MININTERVAL", "10")
settings.register_profile("momlp", max_examples=60, deadline=None)
settings.load_profile("momlp")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is fastest and avoids stalls on a shared CPU."""
    with torch_threads(1):
        yield
