"""Checked tensor files live in :mod:`momlp_lite.store.files`; this module keeps their old import path."""

from .files import CHECKSUM_KEY, expert_file_ok, load_expert_file, read_checked, save_expert_file  # noqa: F401
