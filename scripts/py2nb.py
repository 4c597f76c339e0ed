"""Turn a percent-format script (``# %%`` / ``# %% [markdown]`` cells) into a chapter notebook.

Authoring aid: ``python scripts/py2nb.py chapter.py book/chapter.ipynb``; the reverse,
``python scripts/py2nb.py --to-script book/chapter.ipynb chapter.py``, recovers the editable script
from a committed notebook (the two are exact inverses; a test checks every chapter). Markdown cells are
written as ``# `` comment lines in the script; a cell header may carry JSON options:
``# %% tags=["hide-input"]`` keeps the tags, and
``# %% figure={"name": "fig-x", "caption": "..."}`` numbers the cell's (single) figure with a caption
that ``{numref}`fig-x``` can refer to. Every chapter gets :data:`INSTALL_CELL` as its first cell (Colab installs the package
there); ``scripts/chapter_template.py`` shows the conventions.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat

REPOSITORY = "https://github.com/momlp-book/momlp-book"
INSTALL_CELL = f"""# Colab / a fresh kernel: install momlp_lite (and its book extras) when it is missing.
try:
    import momlp_lite
except ImportError:
    %pip install -q "momlp-lite[book] @ git+{REPOSITORY}"
    import momlp_lite"""
INSTALL_TAGS = ["remove-cell"]

CELL = re.compile(r"^# %%(?P<md> \[markdown\])?(?P<options>(?:\s+\w+=.*)?)$")
OPTION = re.compile(r"\s*(\w+)=")


def parse_options(text: str) -> dict:
    """Parse ``key=<JSON> key=<JSON> ...`` from a cell header."""
    options, decoder, pos = {}, json.JSONDecoder(), 0
    while text[pos:].strip():
        m = OPTION.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse cell options {text!r}")
        value, end = decoder.raw_decode(text, m.end())
        options[m.group(1)] = value
        pos = end
    return options


def convert(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    cells: list[tuple[bool, dict, list[str]]] = [(False, {"tags": INSTALL_TAGS}, INSTALL_CELL.splitlines())]
    for line in text.splitlines():
        m = CELL.match(line)
        if m:
            cells.append((bool(m.group("md")), parse_options(m.group("options")), []))
        elif cells:
            cells[-1][2].append(line)
    for is_md, options, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if is_md:
            src = "\n".join(re.sub(r"^# ?", "", ln) for ln in lines)
            cell = nbformat.v4.new_markdown_cell(src)
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines))
        if options.get("tags"):
            cell.metadata["tags"] = options["tags"]
        if options.get("figure"):
            cell.metadata["mystnb"] = {"figure": options["figure"]}
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def to_script(nb: nbformat.NotebookNode) -> str:
    """The percent-format script that :func:`convert` turns back into ``nb`` (install cell left out)."""
    cells = nb.cells[1:] if nb.cells and nb.cells[0].source == INSTALL_CELL else nb.cells
    parts = []
    for cell in cells:
        options = ""
        if cell.metadata.get("tags"):
            options += " tags=" + json.dumps(cell.metadata["tags"], ensure_ascii=False)
        figure = cell.metadata.get("mystnb", {}).get("figure")
        if figure:
            options += " figure=" + json.dumps(figure, ensure_ascii=False)
        if cell.cell_type == "markdown":
            body = "\n".join(("# " + ln) if ln else "#" for ln in cell.source.split("\n"))
            parts.append(f"# %% [markdown]{options}\n{body}\n")
        else:
            parts.append(f"# %%{options}\n{cell.source}\n")
    return "\n".join(parts)


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--to-script":
        Path(args[2]).write_text(to_script(nbformat.read(args[1], as_version=4)))
        return
    if len(args) != 2:
        sys.exit("usage: python scripts/py2nb.py SOURCE.py TARGET.ipynb | --to-script SOURCE.ipynb TARGET.py")
    nb = convert(Path(args[0]).read_text())
    nbformat.validate(nb)
    Path(args[1]).write_text(nbformat.writes(nb) + "\n")


if __name__ == "__main__":
    main()
