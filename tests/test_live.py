"""live_controls: widgets rerun the update on change; no initial draw during a book build."""

import ipywidgets as widgets
import pytest

from momlp_lite.viz.widgets import live_controls
from momlp_lite.viz.figures import BOOK_BUILD_ENV


def test_controls_rerun_update_and_draw_once_when_live(monkeypatch):
    monkeypatch.delenv(BOOK_BUILD_ENV, raising=False)
    calls = []
    slider, button = widgets.IntSlider(value=1), widgets.Button()
    live_controls([[slider], [button]], lambda: calls.append(slider.value))
    assert calls == [1]  # drawn once right away
    slider.value = 3
    button.click()
    assert calls == [1, 3, 3]


def test_no_initial_draw_in_a_book_build_or_when_asked(monkeypatch):
    calls = []
    monkeypatch.setenv(BOOK_BUILD_ENV, "1")
    live_controls([[widgets.IntSlider()]], lambda: calls.append(1))
    monkeypatch.delenv(BOOK_BUILD_ENV)
    live_controls([[widgets.Button()]], lambda: calls.append(2), draw_now=False)
    assert calls == []


def test_empty_rows_are_an_error():
    with pytest.raises(ValueError, match="at least one row of at least one control"):
        live_controls([], lambda: None)
    with pytest.raises(ValueError, match="at least one row"):
        live_controls([[]], lambda: None)
