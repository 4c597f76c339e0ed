"""Static checks of the chapters: in the table of contents, Colab-ready, with exercises and hidden solutions.

(nbval executes every notebook — coding solutions included — in the same test run.)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
# Pages that are not chapters and need no exercises.
NO_EXERCISES = {"intro"}


def _py2nb():
    spec = importlib.util.spec_from_file_location("py2nb", ROOT / "scripts" / "py2nb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_every_notebook_is_in_the_toc_and_every_toc_entry_exists():
    toc = _toc_files()
    assert sorted(f"book/{p.stem}" for p in NOTEBOOKS) == sorted(f for f in toc if (ROOT / f"{f}.ipynb").exists())
    for f in toc:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".ipynb", ".md")), f"{f} is in _toc.yml but missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_installs_the_package_when_missing(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and first.source == _py2nb().INSTALL_CELL
    assert "remove-cell" in first.metadata.get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in NO_EXERCISES], ids=lambda p: p.stem)
def test_chapter_ends_with_exercises_and_hidden_solutions(path):
    text = _markdown(nbformat.read(path, as_version=4))
    assert re.search(r"^## Exercises", text, re.M), f"{path.name} has no Exercises section"
    exercises = re.findall(r"\{exercise\}", text)
    solutions = re.findall(r"\{solution(?:-start)?\}[^\n]*\n:class: dropdown", text)
    assert len(exercises) >= 2, f"{path.name}: {len(exercises)} exercises"
    assert len(solutions) == len(exercises), f"{path.name}: {len(exercises)} exercises, {len(solutions)} hidden solutions"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in NO_EXERCISES], ids=lambda p: p.stem)
def test_coding_solutions_are_executed_code_cells(path):
    nb = nbformat.read(path, as_version=4)
    inside, coding = False, 0
    for cell in nb.cells:
        src = cell.source
        if inside and cell.cell_type == "code":
            code_cells += 1
        # A markdown cell may close one solution and open the next: handle the end first.
        if cell.cell_type == "markdown" and "{solution-end}" in src:
            assert inside and code_cells >= 1, f"{path.name}: a gated solution without code"
            inside, coding = False, coding + 1
        if cell.cell_type == "markdown" and "{solution-start}" in src:
            assert not inside, f"{path.name}: nested solution-start"
            inside, code_cells = True, 0
    assert not inside, f"{path.name}: solution-start without solution-end"
    assert coding >= 1, f"{path.name} has no coding exercise with a runnable solution"


FORBIDDEN_READS = [
    (r"\.\./", "a path outside the notebook's folder"),
    (r"['\"](?:tests|benchmarks|results|scripts|book)/", "a repository folder the pip install does not provide"),
    (r"read_csv\(|np\.load\(|open\(\s*['\"]", "a data file next to the notebook"),
]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_only_read_what_the_install_provides(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells[1:]:
        if cell.cell_type != "code":
            continue
        for pattern, why in FORBIDDEN_READS:
            assert not re.search(pattern, cell.source), f"{path.name} reads {why}: {cell.source[:120]!r}"


def test_course_guide_quotes_a_measured_time_for_every_chapter():
    import json

    times = json.loads((ROOT / "momlp_lite" / "results" / "chapter_times_default.json").read_text())
    assert times["meta"]["device"] and times["meta"]["commit"]
    chapters = [f.split("/")[-1] for f in _toc_files() if (ROOT / f"{f}.ipynb").exists()]
    assert sorted(times["chapters"]) == sorted(chapters)
    assert all(0 < t < 3600 for t in times["chapters"].values())
    table = (BOOK / "_course_times.md").read_text()
    assert table.count("\n| ") == len(chapters) + 1  # one row per chapter below the header
    assert "{include} _course_times.md" in (BOOK / "course_guide.md").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_and_its_percent_script_round_trip(path):
    py2nb = _py2nb()
    nb = nbformat.read(path, as_version=4)
    again = py2nb.convert(py2nb.to_script(nb))
    assert [(c.cell_type, c.source, dict(c.metadata)) for c in again.cells] == [
        (c.cell_type, c.source, dict(c.metadata)) for c in nb.cells
    ]


def test_bibliography_parses_and_every_cited_key_exists():
    """A broken .bib (e.g. an entry left open by a merge) stops the whole book build: catch it in a second."""
    import pybtex.database

    keys = set(pybtex.database.parse_file(str(BOOK / "references.bib")).entries)
    pages = [nbformat.read(p, as_version=4) for p in NOTEBOOKS]
    text = "\n".join(_markdown(nb) for nb in pages) + "\n".join(p.read_text() for p in BOOK.glob("*.md"))
    cited = {k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text) for k in group.split(",")}
    assert cited and not cited - keys, f"cited but not in references.bib: {sorted(cited - keys)}"
