"""Build the course kit: an instructor and a student version of every chapter, graded with nbgrader.

    python scripts/build_course.py                    # every chapter of _toc.yml -> _build/course
    python scripts/build_course.py --grade            # ... and autograde both versions (what `make test` checks)
    python scripts/build_course.py --chapters routing_trees --out /tmp/course

The output folder is an nbgrader course directory (https://nbgrader.readthedocs.io):

``source/<chapter>/<chapter>.ipynb``
    the instructor version: the chapter with nbgrader marks (solutions kept).
``release/<chapter>/<chapter>.ipynb``
    the student version (``nbgrader generate_assignment``): every solution code cell is replaced by
    ``# YOUR CODE HERE`` / ``raise NotImplementedError()``, written solutions by ``YOUR ANSWER HERE``,
    and each coding exercise keeps its graded, locked check cell.
``student/<chapter>.ipynb``
    the same student notebooks in one flat folder, to hand out on Colab or a learning platform.

How a chapter marks its exercises (the convention every chapter follows): a coding exercise's solution sits between
markdown cells holding ``{solution-start}`` and ``{solution-end}``; inside, the solution's code cells come first, then
ONE code cell tagged ``exercise-check`` that asserts the exercise's conclusion. Written solutions are ``{solution}``
directives in markdown. Nothing else needs marking: this script finds the regions and marks the cells for nbgrader.

``--grade`` submits both versions as two pretend students (``instructor`` and ``blank``), runs
``nbgrader autograde`` on them and prints, per chapter, the checks each one passed. It exits non-zero unless the
instructor passes every check and the blank student version fails every check.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECK_TAG = "exercise-check"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
STUDENTS = {"instructor": "source", "blank": "release"}

_FENCE = r"(?P<fence>:{3,}|`{3,})"
_DIRECTIVE = re.compile(
    _FENCE + r"\{(?P<name>exercise|solution|solution-start|solution-end)\}(?P<arg>[^\n]*)\n"
    r"(?P<opts>(?::[\w-]+:[^\n]*\n)*)(?P<body>.*?)^(?P=fence)[ \t]*$\n?",
    re.M | re.S,
)


@dataclass
class Exercise:
    """One coding exercise found in a chapter: its label, solution cells and check cells (cell indices)."""

    label: str
    solution_cells: list[int] = field(default_factory=list)
    check_cells: list[int] = field(default_factory=list)


def toc_files() -> list[str]:
    """Every document of ``_toc.yml`` (without suffix), root first."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return files


def toc_chapters() -> list[Path]:
    """Every notebook of ``_toc.yml``, in book order."""
    files = toc_files()
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def coding_exercises(nb) -> list[Exercise]:
    """The chapter's coding exercises: code cells between ``{solution-start}`` and ``{solution-end}``.

    Raises
    ------
    ValueError
        If the regions are unbalanced (a start without an end, or nested starts).
    """
    found, current = [], None
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and current is not None:
            tags = cell.metadata.get("tags", [])
            (current.check_cells if CHECK_TAG in tags else current.solution_cells).append(i)
        if cell.cell_type != "markdown":
            continue
        for m in _DIRECTIVE.finditer(cell.source):
            if m.group("name") == "solution-end":
                if current is None:
                    raise ValueError(f"cell {i}: {{solution-end}} without {{solution-start}}")
                found.append(current)
                current = None
            elif m.group("name") == "solution-start":
                if current is not None:
                    raise ValueError(f"cell {i}: nested {{solution-start}} (close the one of {current.label!r})")
                current = Exercise(m.group("arg").strip() or f"exercise-{len(found) + 1}")
    if current is not None:
        raise ValueError(f"{{solution-start}} {current.label!r} has no {{solution-end}}")
    return found


def _meta(grade_id: str, *, solution: bool, grade: bool, locked: bool, points: int = 0) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution}
    if grade:
        meta["points"] = points
    return meta


def _plain_markdown(text: str, counter: list[int]) -> list[tuple[str, str]]:
    """Split one markdown cell into ``(kind, text)`` pieces for Jupyter (no MyST directives left).

    ``kind`` is ``"text"`` or ``"answer"`` (a written solution, which becomes a graded answer cell).
    """
    pieces, pos = [], 0
    buf = ""
    for m in _DIRECTIVE.finditer(text):
        buf += text[pos:m.start()]
        pos = m.end()
        name, body = m.group("name"), m.group("body").strip()
        label = dict(re.findall(r"^:([\w-]+):[ \t]*(.*)$", m.group("opts"), re.M)).get("label", "")
        if name == "exercise":
            counter[0] += 1
            title = m.group("arg").strip()
            head = f"**Exercise {counter[0]}**" + (f" ({title})" if title else "") + ("" if not label else f" `{label}`")
            buf += f"{head}. {body}\n"
        elif name == "solution":
            pieces.append(("text", buf))
            pieces.append(("answer", f"**Answer.** {body}"))
            buf = ""
        elif name == "solution-start":
            buf += "*Write your solution in the code cell(s) below; the locked cell after them checks it.*\n"
        # solution-end: dropped
    buf += text[pos:]
    pieces.append(("text", buf))
    return [(k, t.strip("\n")) for k, t in pieces if t.strip()]


def instructor_version(nb, chapter: str):
    """The chapter with nbgrader marks: solution code cells, locked check cells, graded written answers."""
    nb = copy.deepcopy(nb)
    exercises = coding_exercises(nb)
    role: dict[int, tuple[str, str]] = {}
    for k, ex in enumerate(exercises, 1):
        for j, i in enumerate(ex.solution_cells):
            role[i] = ("solution", f"{chapter}-ex{k}-solution{j + 1}")
        for j, i in enumerate(ex.check_cells):
            role[i] = ("check", f"{chapter}-ex{k}-check{j + 1 if j else ''}")
    cells, counter, n_answers = [], [0], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for kind, text in _plain_markdown(cell.source, counter):
                new = nbformat.v4.new_markdown_cell(text)
                if kind == "answer":
                    n_answers += 1
                    new.metadata["nbgrader"] = _meta(f"{chapter}-answer{n_answers}", solution=True, grade=True,
                                                     locked=False, points=1)
                cells.append(new)
            continue
        kind, grade_id = role.get(i, (None, None))
        if kind == "solution":
            cell.metadata["nbgrader"] = _meta(grade_id, solution=True, grade=False, locked=False)
        elif kind == "check":
            cell.metadata["nbgrader"] = _meta(grade_id, solution=False, grade=True, locked=True, points=1)
        cells.append(cell)
    nb.cells = cells
    return nb


def nbgrader_config(course: Path, timeout: int):
    """The traitlets config nbgrader runs with: this course folder, its gradebook, the stub, the cell timeout."""
    from traitlets.config import Config

    # nbgrader runs `alembic` (its gradebook migrations) as a command: find it beside this Python.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    c = Config()
    c.CourseDirectory.root = str(course)
    c.CourseDirectory.db_url = f"sqlite:///{course / 'gradebook.db'}"
    c.ClearSolutions.code_stub = {"python": CODE_STUB}
    c.Execute.timeout = timeout
    return c


def build(chapters: list[Path], out: Path) -> dict[str, int]:
    """Write the instructor and student versions into the course folder ``out``; return checks per chapter."""
    from nbgrader.apps import NbGraderAPI
    from momlp_lite.runtime import get_profile

    if out.exists():
        shutil.rmtree(out)
    (out / "student").mkdir(parents=True)
    (out / "nbgrader_config.py").write_text(
        "c = get_config()  # noqa: F821  (nbgrader's course config: run nbgrader commands from this folder)\n"
        f"c.CourseDirectory.db_url = 'sqlite:///gradebook.db'\n"
        f"c.ClearSolutions.code_stub = {{'python': {CODE_STUB!r}}}\n"
        f"c.Execute.timeout = {get_profile().cell_timeout_s}\n"
    )
    checks = {}
    for path in chapters:
        name = path.stem
        nb = nbformat.read(path, as_version=4)
        src = out / "source" / name / f"{name}.ipynb"
        src.parent.mkdir(parents=True)
        inst = instructor_version(nb, name)
        nbformat.write(inst, src)
        checks[name] = sum(1 for c in inst.cells if c.get("metadata", {}).get("nbgrader", {}).get("locked")
                           and c.cell_type == "code")
    api = NbGraderAPI(config=nbgrader_config(out, get_profile().cell_timeout_s))
    res = api.generate_assignment("*", force=True, create=True)  # every chapter in one nbgrader run
    if not res["success"]:
        raise RuntimeError(f"nbgrader generate_assignment failed:\n{res['log']}\n{res.get('error', '')}")
    for name in checks:
        shutil.copyfile(out / "release" / name / f"{name}.ipynb", out / "student" / f"{name}.ipynb")
    return checks


def grade(out: Path, chapters: list[str], students: tuple[str, ...] = tuple(STUDENTS)
          ) -> dict[str, dict[str, dict[str, float]]]:
    """Autograde the given versions (default: instructor and blank student) of each chapter; scores per check cell.

    Returns ``{chapter: {student: {grade_id: score}}}`` (max score 1 each), student being "instructor" or "blank".
    """
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI
    from momlp_lite.runtime import get_profile

    api = NbGraderAPI(config=nbgrader_config(out, get_profile().cell_timeout_s))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    unknown = sorted(set(students) - set(STUDENTS))
    if unknown:
        raise ValueError(f"students must be among {sorted(STUDENTS)}, got {unknown}")
    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        for student in students:
            if not any(s.id == student for s in gb.students):
                gb.add_student(student)
    for name in chapters:
        for student in students:
            sub = out / "submitted" / student / name
            sub.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / STUDENTS[student] / name / f"{name}.ipynb", sub / f"{name}.ipynb")
    if chapters:
        res = api.autograde("*", "*", force=True, create=True)  # every submission in one nbgrader run
        if not res["success"]:
            raise RuntimeError(f"nbgrader autograde failed:\n{res['log']}\n{res.get('error')}")
    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        for name in chapters:
            scores[name] = {}
            for student in students:
                sub_nb = gb.find_submission_notebook(name, name, student)
                scores[name][student] = {g.name: float(g.score) for g in sub_nb.grades if g.cell.cell_type == "code"}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "course")
    parser.add_argument("--chapters", nargs="*", help="chapter stems (default: every notebook of _toc.yml)")
    parser.add_argument("--grade", action="store_true", help="autograde both versions and check the scores")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    chapters = [p for p in toc_chapters() if not args.chapters or p.stem in args.chapters]
    out = args.out.resolve()
    checks = build(chapters, out)
    print(f"course kit in {out}: {sum(checks.values())} graded checks")
    for name, n in checks.items():
        print(f"  {name:32s} {n} check(s)")
    print(f"student notebooks to hand out: {out / 'student'}")
    if not args.grade:
        return
    scores = grade(out, [n for n, k in checks.items() if k])
    bad = []
    for name, by in scores.items():
        inst, blank = by["instructor"], by["blank"]
        print(f"  {name:32s} instructor {sum(inst.values()):.0f}/{len(inst)}, blank student {sum(blank.values()):.0f}/{len(blank)}")
        bad += [f"{name}: instructor fails {g}" for g, s in inst.items() if s < 1]
        bad += [f"{name}: blank student passes {g}" for g, s in blank.items() if s > 0]
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    if bad:
        sys.exit("course kit check failed:\n  " + "\n  ".join(bad))


if __name__ == "__main__":
    os.environ.setdefault("MOMLP_PROFILE", "smoke")
    main()
