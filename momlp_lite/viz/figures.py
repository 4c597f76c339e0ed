"""Plotly figures that keep working in the static book: sliders are plotly ``restyle`` steps, run without a kernel.
A book build's renderer emits one ``<div>`` per figure; the page loads plotly.js once from the book's ``_static``."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

from ..moe.routing import RoutingTree

__all__ = ["BOOK_BUILD_ENV", "use_book_renderer", "slider_figure", "partition_figure", "loglog_figure"]

BOOK_BUILD_ENV = "MOMLP_BOOK_BUILD"
_GOLDEN = 0.6180339887498949  # leaf id * golden ratio mod 1: neighboring leaves get clearly different colors


class _BookRenderer(MimetypeRenderer):
    def to_mimebundle(self, fig_dict: dict) -> dict:  # noqa: D102 - plotly API
        config = {"responsive": True, "displaylogo": False}
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False, config=config)
        return {"text/html": html}


pio.renderers["momlp_book"] = _BookRenderer()


def use_book_renderer() -> None:
    """Switch plotly to the book renderer in a book build (``$MOMLP_BOOK_BUILD=1``). Taught in: book/routing_trees."""
    if os.environ.get(BOOK_BUILD_ENV) == "1":
        pio.renderers.default = "momlp_book"


def slider_figure(steps: Sequence[tuple[str, Sequence[go.BaseTraceType]]], slider_label: str, active: int = 0,
                  **layout: Any) -> go.Figure:
    """A figure whose slider shows one ``(label, traces)`` step at a time, in static HTML too.
    Taught in: book/momlp_grid_regression."""
    if not steps:
        raise ValueError("slider_figure needs at least one step, got none")
    if not 0 <= active < len(steps):
        raise ValueError(f"active must index a step (0..{len(steps) - 1}), got {active}")
    fig = go.Figure()
    owner: list[int] = []
    for i, (_, traces) in enumerate(steps):
        for tr in traces:
            tr.visible = i == active
            fig.add_trace(tr)
            owner.append(i)
    slider_steps = [
        dict(label=str(label), method="restyle", args=[{"visible": [o == i for o in owner]}])
        for i, (label, _) in enumerate(steps)
    ]
    slider = dict(active=active, currentvalue=dict(prefix=f"{slider_label}: "), steps=slider_steps, pad=dict(t=40))
    fig.update_layout(sliders=[slider], **layout)
    return fig


def _partition_traces(tree: RoutingTree, resolution: int, show_keys: bool) -> list[go.BaseTraceType]:
    xs, ys, ids = tree.leaf_map(resolution)
    ids_np = ids.cpu().numpy()
    traces: list[go.BaseTraceType] = [go.Heatmap(
        x=xs.numpy(), y=ys.numpy(), z=np.mod(ids_np.astype(np.float64) * _GOLDEN, 1.0), customdata=ids_np,
        colorscale="Turbo", showscale=False, opacity=0.85,
        hovertemplate="x=%{x:.3f}<br>y=%{y:.3f}<br>leaf %{customdata}<extra></extra>",
    )]
    if show_keys:
        keys = tree.leaf_keys.cpu().numpy()
        traces.append(go.Scatter(
            x=keys[:, 0], y=keys[:, 1], mode="markers", marker=dict(size=5, color="black", symbol="x"),
            name="leaf keys", hovertemplate="leaf key (%{x:.3f}, %{y:.3f})<extra></extra>",
        ))
    return traces


def partition_figure(trees: Sequence[RoutingTree], labels: Sequence[str] | None = None, resolution: int = 200,
                     max_keys_shown: int = 1024, title: str = "Leaves of the routing tree") -> go.Figure:
    """Partition of a 2-D box by each tree, with a slider to move between them. Taught in: book/routing_trees."""
    if not trees:
        raise ValueError("partition_figure needs at least one tree, got none")
    labels = list(labels) if labels is not None else [str(t.depth) for t in trees]
    if len(labels) != len(trees):
        raise ValueError(f"got {len(labels)} labels for {len(trees)} trees; give one label per tree")
    steps = [(lab, _partition_traces(t, resolution, t.num_leaves <= max_keys_shown)) for lab, t in zip(labels, trees)]
    return slider_figure(
        steps, slider_label="depth", title=title, xaxis=dict(title="x₁", constrain="domain"),
        yaxis=dict(title="x₂", scaleanchor="x", scaleratio=1), width=620, height=680, showlegend=False,
        margin=dict(l=40, r=20, t=60, b=40),
    )


def loglog_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]], x_title: str, y_title: str,
                  title: str = "") -> go.Figure:
    """Lines + markers on log-log axes, one per ``name -> (x, y)``. Taught in: book/momlp_grid_regression."""
    fig = go.Figure()
    for name, (x, y) in series.items():
        fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis=dict(title=x_title, type="log"), yaxis=dict(title=y_title, type="log"))
    return fig
