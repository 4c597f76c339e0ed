"""Checked files and the expert store: one file per expert, loaded one at a time."""
