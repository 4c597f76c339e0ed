"""The package stays light: line budgets, a short top-level ``__all__``, and docstrings that name their chapter."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import momlp_lite

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "momlp_lite"
CHAPTERS = {p.stem for p in (ROOT / "book").glob("*.ipynb")}
MAX_MODULE_LINES = 400
MAX_PACKAGE_LINES = 4500
MAX_TOP_LEVEL_NAMES = 15


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="momlp_lite.") if m.name[-8:] != "__main__")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_line_budget():
    long = {str(p.relative_to(ROOT)): _lines(p) for p in PACKAGE.rglob("*.py") if _lines(p) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_whole_package_is_within_its_line_budget():
    per_part: dict[str, int] = {}
    for p in PACKAGE.rglob("*.py"):
        part = p.relative_to(PACKAGE).parts[0].removesuffix(".py")
        per_part[part] = per_part.get(part, 0) + _lines(p)
    total = sum(per_part.values())
    assert total <= MAX_PACKAGE_LINES, f"{total} package lines (budget {MAX_PACKAGE_LINES}): {per_part}"


def test_top_level_names_are_few_and_all_used_by_a_chapter():
    names = momlp_lite.__all__
    assert len(names) <= MAX_TOP_LEVEL_NAMES, f"{len(names)} names in momlp_lite.__all__: {names}"
    text = "\n".join(p.read_text() for p in (ROOT / "book").glob("*.ipynb"))
    unused = [n for n in names if not re.search(rf"\bml\.{n}\b|\b{n}\b", text)]
    assert not unused, f"top-level names no chapter uses: {unused}"


def test_every_public_item_names_the_chapter_that_teaches_it():
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != name:
                continue  # constants and re-exports are documented where they are defined
            if not any(stem in (inspect.getdoc(obj) or "") for stem in CHAPTERS):
                missing.append(f"{name}.{attr}")
    assert not missing, f"public items whose docstring names no chapter: {missing}"
