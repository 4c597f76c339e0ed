"""Plotly figures for the static book and ipywidgets controls for live exploration."""
