"""The course kit: student notebooks whose graded checks pass on the instructor version and fail on blank answers.

Builds the kit with ``scripts/build_course.py`` (nbgrader ``generate_assignment``) and autogrades the blank student
versions with nbgrader, the way a teacher grades a class (smoke profile); the demo chapter grades both versions.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_EXERCISES = {"intro"}
# nbgrader 0.9 trips a harmless SQLAlchemy autoflush warning on every autograde
pytestmark = pytest.mark.filterwarnings("ignore:Object of type <Submitted")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"_scripts_{name}"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bc = _load("build_course")
CHAPTERS = [p for p in bc.toc_chapters() if p.stem not in NO_EXERCISES]


def _demo_chapter(answer: str) -> nbformat.NotebookNode:
    """A two-exercise chapter (one written, one coding) whose solution cell holds ``answer``."""
    py2nb = _load("py2nb")
    script = f'''# %% [markdown]
# # Demo
#
# The square of $b$ is $b^2$.

# %%
base = 3

# %% [markdown]
# ## Exercises
#
# :::{{exercise}}
# :label: ex-demo-text
# Why is $3^2$ odd?
# :::
#
# :::{{solution}} ex-demo-text
# :class: dropdown
# The written solution: odd times odd is odd.
# :::
#
# :::{{exercise}}
# :label: ex-demo-code
# Square `base`.
# :::
#
# ````{{solution-start}} ex-demo-code
# :class: dropdown
# ````

# %%
{answer}

# %% tags=["exercise-check"]
assert squared == 9, squared

# %% [markdown]
# ````{{solution-end}}
# ````
'''
    return py2nb.convert(script)


def test_every_chapter_with_a_coding_exercise_has_a_check_cell_after_its_solution():
    lacking, misplaced = [], []
    for path in CHAPTERS:
        exercises = bc.coding_exercises(nbformat.read(path, as_version=4))
        for ex in exercises:
            if len(ex.check_cells) != 1:
                lacking.append(f"{path.stem} ({ex.label}: {len(ex.check_cells)} check cells)")
            elif ex.solution_cells and max(ex.solution_cells) > ex.check_cells[0]:
                misplaced.append(f"{path.stem} ({ex.label})")
    assert not misplaced, f"check cell must come after the solution's code cells in: {misplaced}"
    assert not lacking, (
        "every coding exercise needs exactly ONE code cell tagged `exercise-check` after its solution "
        f"(it is the graded cell of the student version); lacking in: {lacking}"
    )


def test_demo_chapter_student_version_is_graded_and_can_fail(tmp_path):
    """The whole pipeline on a tiny chapter: right answers pass, blank and wrong answers fail."""
    for kind, answer in {"right": "squared = base ** 2", "wrong": "squared = base * 2"}.items():
        nbformat.write(_demo_chapter(answer), tmp_path / f"demo_{kind}.ipynb")
    course = tmp_path / "course"
    checks = bc.build([tmp_path / "demo_right.ipynb", tmp_path / "demo_wrong.ipynb"], course)
    assert checks == {"demo_right": 1, "demo_wrong": 1}
    student = nbformat.read(course / "student" / "demo_right.ipynb", as_version=4)
    text = "\n".join(c.source for c in student.cells)
    assert "base ** 2" not in text and "odd times odd" not in text, "a solution leaked into the student version"
    assert bc.CODE_STUB in text and "YOUR ANSWER HERE" in text and "assert squared == 9" in text
    assert not re.search(r"\{(?:solution|exercise)", text), "MyST exercise/solution directives left for Jupyter"
    scores = bc.grade(course, ["demo_right", "demo_wrong"])
    assert scores["demo_right"] == {"instructor": {"demo_right-ex1-check": 1.0}, "blank": {"demo_right-ex1-check": 0.0}}
    assert scores["demo_wrong"]["instructor"] == {"demo_wrong-ex1-check": 0.0}  # a wrong answer fails its check


def test_unbalanced_solution_regions_are_reported():
    nb = _demo_chapter("squared = 9")
    nb.cells = [c for c in nb.cells if "{solution-end}" not in c.source]
    with pytest.raises(ValueError, match="has no"):
        bc.coding_exercises(nb)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The kit for every chapter, its blank student versions autograded once for this module.

    The instructor versions are not autograded here: their code cells are the chapter's own code cells
    (``test_instructor_version_runs_exactly_the_chapter_code``), which nbval runs as the chapter's test, so a
    check cell that failed on the instructor version fails nbval. ``make course`` grades both versions.
    """
    out = tmp_path_factory.mktemp("course")
    checks = bc.build(bc.toc_chapters(), out)
    graded = [name for name, n in checks.items() if n]
    scores = bc.grade(out, graded, students=("blank",))
    summary = {"checks": checks, "scores": scores}
    keep = ROOT / "_build" / "course_scores.json"
    keep.parent.mkdir(exist_ok=True)
    keep.write_text(json.dumps(summary, indent=2) + "\n")
    yield out, checks, scores
    shutil.rmtree(out, ignore_errors=True)


def test_student_versions_keep_every_check_and_no_solution(course):
    out, checks, _ = course
    for path in bc.toc_chapters():
        chapter = nbformat.read(path, as_version=4)
        student = nbformat.read(out / "student" / f"{path.stem}.ipynb", as_version=4)
        stext = "\n".join(c.source for c in student.cells)
        n_checks = sum(1 for c in chapter.cells if bc.CHECK_TAG in c.metadata.get("tags", []))
        assert checks[path.stem] == n_checks, path.stem
        exercises = bc.coding_exercises(chapter)
        solution_ids = {i for ex in exercises for i in ex.solution_cells}
        elsewhere = "\n".join(c.source for i, c in enumerate(chapter.cells) if i not in solution_ids)
        for ex in exercises:
            for i in ex.solution_cells:
                lines = [ln for ln in chapter.cells[i].source.splitlines()
                         if len(ln.strip()) > 25 and ln not in elsewhere]
                leaked = [ln for ln in lines if ln in stext]
                assert not leaked, f"{path.stem}: solution lines left in the student version: {leaked[:3]}"
            for i in ex.check_cells:
                assert chapter.cells[i].source in stext, f"{path.stem}: check cell {i} missing from the student version"
        assert stext.count(bc.CODE_STUB) == sum(len(ex.solution_cells) for ex in bc.coding_exercises(chapter))


def test_instructor_version_runs_exactly_the_chapter_code(course):
    """Same code cells, same order, same sources: nbval's run of the chapter is the instructor's autograde run."""
    out, checks, _ = course
    for path in bc.toc_chapters():
        chapter = nbformat.read(path, as_version=4)
        inst = nbformat.read(out / "source" / path.stem / f"{path.stem}.ipynb", as_version=4)
        ours = [c.source for c in chapter.cells if c.cell_type == "code"]
        theirs = [c.source for c in inst.cells if c.cell_type == "code"]
        assert theirs == ours, f"{path.stem}: the instructor version's code differs from the chapter's"
        graded = [c for c in inst.cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")]
        assert len(graded) == checks[path.stem], path.stem
        assert all(bc.CHECK_TAG in c.metadata.get("tags", []) for c in graded), path.stem


def test_blank_student_fails_every_check(course):
    _, checks, scores = course
    total = sum(checks.values())
    passing_blank = [f"{c}:{g}" for c, s in scores.items() for g, v in s["blank"].items() if v > 0]
    assert sum(len(s["blank"]) for s in scores.values()) == total
    assert not passing_blank, f"these checks pass on a blank student notebook (they cannot fail): {passing_blank}"
