"""The slide rule: which of a chapter's cells go on its reveal.js deck, and the deck loads nothing from the network."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = _load("build_slides")
md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell


def _chapter():
    fig = code("fig.show()", metadata={"figure": {"name": "fig-a", "caption": "The {term}`leaf <leaf>` boxes."}})
    fig.outputs = [nbformat.v4.new_output("display_data", data={"text/html": "<div class='plotly-graph-div'></div>"})]
    plain = code("x = 1")
    plain.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    tagged = md("A tagged remark, kept whole.", metadata={"tags": ["slide"]})
    return nbformat.v4.new_notebook(cells=[
        code("%pip install x", metadata={"tags": ["remove-cell"]}),
        md("# Title\n\nFirst paragraph of the chapter.\n\nSecond paragraph, left out."),
        md("## Section one\n\nIts first paragraph cites {cite}`key`.\n\nNot this one.\n\n$$\na^2 + b^2 = c^2\n$$ (eq-p)\n\n"
           "- a list item, left out"),
        plain, fig,
        md("```{math}\n:label: eq-m\n\\int_0^1 x\\,dx\n```\n\n### Sub\n\nSub paragraph."),
        tagged,
        md("## Exercises\n\n:::{exercise}\nDo it.\n:::"),
        md("## After the exercises"),
    ])


def test_the_rule_picks_headings_first_paragraphs_math_figures_and_tagged_cells():
    deck = bs.deck_notebook(_chapter())
    kinds = [c.metadata["slideshow"]["slide_type"] for c in deck.cells]
    text = "\n".join(c.source for c in deck.cells)
    assert kinds == ["slide", "slide", "subslide", "-", "subslide"], kinds
    assert "First paragraph of the chapter." in text and "Second paragraph" not in text
    assert "Its first paragraph cites [key]." in text and "Not this one." not in text
    assert "a^2 + b^2 = c^2" in text and "(eq-p)" not in text and "a list item" not in text
    assert "$$\n\\int_0^1 x\\,dx\n$$" in text and "Sub paragraph." in text and "A tagged remark" in text
    assert "*The leaf boxes.*" in text
    assert "Exercises" not in text and "After the exercises" not in text and "%pip" not in text
    assert [c.source for c in deck.cells if c.cell_type == "code"] == ["fig.show()"]


def test_exported_deck_hides_code_and_loads_only_local_files(tmp_path):
    path = bs.export_deck(bs.deck_notebook(_chapter()), tmp_path, "demo")
    html = path.read_text()
    assert path == tmp_path / "slides" / "demo.slides.html"
    assert "fig.show()" not in html and "plotly-graph-div" in html
    assert not re.findall(r"""<(?:script|link)[^>]+(?:src|href)=["']https?://""", html)
    for asset in ("../_static/revealjs/dist/reveal.js", "../_static/mathjax/tex-mml-chtml.js",
                  "../_static/plotly.min.js", "../_static/revealjs/dist/theme/white.css"):
        assert asset in html, asset
