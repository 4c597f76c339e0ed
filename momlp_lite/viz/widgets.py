"""Live controls for chapters: ipywidgets wired to a drawing function, for Jupyter, JupyterLab and Colab."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .figures import BOOK_BUILD_ENV

__all__ = ["live_controls"]


def live_controls(rows: Sequence[Sequence[Any]], update: Callable[[], None], draw_now: bool = True) -> Any:
    """Show rows of ipywidgets above an output area and rerun ``update`` into it on every change; return the area.
    ``draw_now`` fills it at once, except in a book build (``$MOMLP_BOOK_BUILD=1``). Taught in: book/routing_trees."""
    import ipywidgets as widgets
    from IPython.display import display

    if not rows or not all(rows):
        raise ValueError("live_controls needs at least one row of at least one control")
    out = widgets.Output()

    def refresh(_: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            update()

    for row in rows:
        for control in row:
            if isinstance(control, widgets.Button):
                control.on_click(refresh)
            else:
                control.observe(refresh, names="value")
    display(widgets.VBox([widgets.HBox(list(row)) for row in rows] + [out]))
    if draw_now and os.environ.get(BOOK_BUILD_ENV) != "1":
        refresh()
    return out
