"""Build one reveal.js deck per chapter from the chapter's own cells (nbconvert slides, served offline).

    python scripts/build_slides.py --html _build/html --executed _build/jupyter_execute/book

``scripts/build_book.py`` runs this after every book build, so the decks are published with the book at
``_build/html/slides/<chapter>.slides.html``. A deck uses the *executed* chapter (the book build's outputs), so its
figures are the ones the page shows.

The rule that picks a slide's content (no per-cell marks needed, so editing the chapter updates its deck):

* the ``#`` title and its first paragraph make the title slide;
* each ``##`` heading starts a slide and each ``###`` heading a sub-slide; on it go the heading, the first paragraph
  after it (and the list right after it when that paragraph ends with a colon), and every display formula (``$$ ... $$``, ``{math}`` blocks, ``\\begin{...}`` environments);
* each figure (a code cell whose output is a plotly figure or an image, or one with a ``figure`` option) gets a
  slide of its own below its section's slide, with its caption; code is never shown;
* a cell tagged ``slide`` goes on the current slide whole (markdown) or as its output (code);
* the deck stops at ``## Exercises``.

reveal.js, MathJax and plotly.js are loaded from the book's ``_static`` folder (copied there from the npm packages
``reveal.js`` and ``mathjax``), so the decks work with no network.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = ROOT / "scripts" / "slides_template"
SLIDE_TAG = "slide"

_ROLE = re.compile(r"\{([\w:-]+)\}`([^`]*)`")
_MATH_FENCE = re.compile(r"^(?P<f>`{3,}|:{3,})\{math\}[^\n]*\n(?:(?::[\w-]+:[^\n]*)\n)*(?P<body>.*?)^(?P=f)\s*$", re.M | re.S)
_FENCED = re.compile(r"^(`{3,}|:{3,})")


def _clean_myst(text: str) -> str:
    """MyST that Jupyter's markdown does not know: roles become their text, ``{math}`` fences become ``$$``."""

    def role(m: re.Match) -> str:
        name, body = m.group(1), m.group(2)
        if name.startswith("cite"):
            return "[" + body + "]"
        if name == "eq":
            return f"({body})"
        if name in ("math",):
            return f"${body}$"
        shown = re.sub(r"\s*<[^>]*>\s*$", "", body)
        return f"`{shown}`" if name in ("py:func", "func", "class", "mod") else shown

    text = _MATH_FENCE.sub(lambda m: "$$\n" + m.group("body").strip() + "\n$$", text)
    text = re.sub(r"\$\$\s*\(([\w:-]+)\)", "$$", text)  # $$ ... $$ (label)
    return _ROLE.sub(role, text)


def _blocks(markdown: str) -> list[tuple[str, str]]:
    """Split markdown into ``(kind, text)`` blocks: heading1/2/3, math, paragraph, other."""
    lines = _clean_myst(markdown).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s", line)
        if m:
            blocks.append((f"heading{min(len(m.group(1)), 4)}", line))
            i += 1
            continue
        fence = _FENCED.match(line)
        if fence or line.strip().startswith("$$") or line.strip().startswith("\\begin{"):
            if fence:
                end = fence.group(1)
                j = i + 1
                while j < len(lines) and not lines[j].startswith(end):
                    j += 1
                kind = "other"
            elif line.strip().startswith("$$"):
                j = i if (line.strip().count("$$") >= 2 and len(line.strip()) > 2) else i + 1
                while j < len(lines) and "$$" not in (lines[j] if j > i else ""):
                    j += 1
                kind = "math"
            else:
                env = re.match(r"\\begin\{([^}]*)\}", line.strip()).group(1)
                j = i
                while j < len(lines) and f"\\end{{{env}}}" not in lines[j]:
                    j += 1
                kind = "math"
            blocks.append((kind, "\n".join(lines[i:j + 1])))
            i = j + 1
            continue
        j = i
        while j < len(lines) and lines[j].strip() and not re.match(r"^(#{1,6}\s|\$\$|`{3,}|:{3,})", lines[j]) or j == i:
            j += 1
        text = "\n".join(lines[i:j])
        kind = "paragraph" if not re.match(r"^\s*([-*+]|\d+\.|>|\|)\s", text) else "other"
        blocks.append((kind, text))
        i = j
    return blocks


def _is_figure(cell) -> bool:
    if cell.metadata.get("figure"):
        return True
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "image/png" in data or "image/svg+xml" in data or "application/vnd.plotly.v1+json" in data:
            return True
        if "plotly-graph-div" in str(data.get("text/html", "")):
            return True
    return False


def deck_notebook(nb) -> nbformat.NotebookNode:
    """The chapter's cells the rule picks, with reveal.js slide types set (see the module docstring)."""
    out = nbformat.v4.new_notebook(metadata=dict(nb.metadata))
    state = {"paragraph_taken": True}

    def add_markdown(text: str, slide_type: str) -> None:
        out.cells.append(nbformat.v4.new_markdown_cell(text, metadata={"slideshow": {"slide_type": slide_type}}))

    def extend_current(text: str) -> None:
        if out.cells and out.cells[-1].cell_type == "markdown":
            out.cells[-1].source += "\n\n" + text
        else:
            add_markdown(text, "slide" if not out.cells else "-")

    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "remove-cell" in tags:
            continue
        if cell.cell_type == "markdown":
            stop_at = re.search(r"^##\s+(Exercises|Solutions)\b", cell.source, re.M | re.I)
            stop = stop_at is not None
            if stop:
                head = cell.source[:stop_at.start()]
                if not head.strip():
                    break
                cell = nbformat.v4.new_markdown_cell(head, metadata=cell.metadata)
            if SLIDE_TAG in tags:
                extend_current(_clean_myst(cell.source))
            else:
                for kind, text in _blocks(cell.source):
                    if kind in ("heading1", "heading2", "heading3"):
                        add_markdown(text, "subslide" if kind == "heading3" else "slide")
                        state["paragraph_taken"] = False
                    elif kind == "paragraph" and not state["paragraph_taken"]:
                        extend_current(text)
                        state["paragraph_taken"] = True
                        state["list_follows"] = text.rstrip().endswith(":")
                    elif kind == "other" and state.get("list_follows") and re.match(r"^\s*([-*+]|\d+\.)\s", text):
                        extend_current(text)  # the list a first paragraph announces with its colon
                        state["list_follows"] = False
                    elif kind == "math":
                        extend_current(text)
                    if kind not in ("paragraph", "other"):
                        state["list_follows"] = False
            if stop:
                break
        elif cell.cell_type == "code" and (SLIDE_TAG in tags or _is_figure(cell)):
            if not cell.get("outputs"):
                continue  # an unexecuted chapter: nothing to show
            keep = nbformat.v4.new_code_cell(cell.source, metadata={"slideshow": {"slide_type": "subslide"}})
            keep.outputs = cell.outputs
            out.cells.append(keep)
            caption = (cell.metadata.get("figure") or {}).get("caption")
            if caption:
                out.cells.append(nbformat.v4.new_markdown_cell(
                    f"*{_clean_myst(caption)}*", metadata={"slideshow": {"slide_type": "-"}}))
    if out.cells:
        out.cells[0].metadata["slideshow"] = {"slide_type": "slide"}
    return out


def export_deck(nb, html_dir: Path, name: str) -> Path:
    """Write ``<html_dir>/slides/<name>.slides.html`` with nbconvert's slides exporter and the book's template."""
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    c = Config()
    c.TemplateExporter.extra_template_basedirs = [str(TEMPLATE_DIR)]
    c.SlidesExporter.template_name = "momlp_reveal"
    c.SlidesExporter.reveal_url_prefix = "../_static/revealjs"
    c.SlidesExporter.reveal_theme = "white"  # its fonts ship inside reveal.js (no web fonts)
    c.TemplateExporter.exclude_input = True
    c.TemplateExporter.exclude_input_prompt = True
    c.TemplateExporter.exclude_output_prompt = True
    exporter = SlidesExporter(config=c)
    body, _ = exporter.from_notebook_node(nb, resources={"static_prefix": "../_static",
                                                         "metadata": {"name": name}})
    # Links a reader may follow are fine; a script, style sheet or font fetched from the network is not.
    external = sorted(set(re.findall(r"""<(?:script|link|img|iframe)[^>]+(?:src|href)=["'](https?://[^"']+)""", body)))
    if external:
        raise RuntimeError(f"deck {name} would load files from the network: {external[:5]}")
    path = html_dir / "slides" / f"{name}.slides.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def build_decks(chapters: list[Path], html_dir: Path, executed: Path | None) -> dict[str, int]:
    """A deck per chapter; returns the number of slides (horizontal + vertical) of each deck."""
    counts = {}
    for path in chapters:
        done = executed / f"{path.stem}.ipynb" if executed else None
        nb = nbformat.read(done if done and done.exists() else path, as_version=4)
        if nb.metadata.get("title") is None:
            title = next((ln[2:].strip() for c in nb.cells if c.cell_type == "markdown"
                          for ln in c.source.splitlines() if ln.startswith("# ")), path.stem)
            nb.metadata["title"] = title
        deck = deck_notebook(nb)
        export_deck(deck, html_dir, path.stem)
        counts[path.stem] = sum(1 for c in deck.cells if c.metadata["slideshow"]["slide_type"] in ("slide", "subslide"))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--executed", type=Path, default=ROOT / "_build" / "jupyter_execute" / "book")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_course import toc_chapters

    counts = build_decks(toc_chapters(), args.html, args.executed)
    for name, n in counts.items():
        print(f"  {name:32s} {n:3d} slides -> {args.html / 'slides' / (name + '.slides.html')}")


if __name__ == "__main__":
    main()
