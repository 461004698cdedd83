"""Assignment mode: nbgrader metadata from the markers, student versions, grading (adlab.assign).

The per-notebook tests execute every notebook once (the student version, then the
instructor's exercise cells in the same kernel) and run nbgrader itself; the rest use
small hand-made notebooks.
"""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from nbgrader.nbgraderformat import MetadataValidator
from nbgrader.utils import determine_grade

from adlab import assign
from adlab.__main__ import main

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
NBGRADER = Path(sys.executable).parent / "nbgrader"


@pytest.fixture
def notebook_env(monkeypatch):
    """The environment CI runs notebooks in; kernels started by nbclient inherit it."""
    for name, value in {"ADLAB_STATIC_OUTPUT": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)


def solution(name, body):
    return new_code_cell(f"def {name}(x):\n    ### BEGIN SOLUTION\n    {body}\n    ### END SOLUTION")


def hand_notebook():
    """Three exercises: one right, one wrong, one right whose check writes to stderr."""
    nb = new_notebook(cells=[
        new_markdown_cell("**Exercise 1.** Double it."),
        solution("double", "return 2 * x"),
        new_code_cell("assert double(2) == 4\nprint('exercise 1 correct')"),
        new_markdown_cell("**Exercise 2.** Halve it."),
        solution("half", "return x / 3"),
        new_code_cell("assert half(4) == 2, 'half(4) should be 2'"),
        solution("triple", "return 3 * x"),
        new_code_cell("import sys\nassert triple(1) == 3\nprint('careful', file=sys.stderr)"),
        new_code_cell("done = True"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def nbgrader_meta(nb):
    return [cell.metadata.get("nbgrader") for cell in nb.cells]


def test_tag_notebook_marks_solutions_and_locked_checks():
    nb = hand_notebook()
    nb.cells[0].metadata["nbgrader"] = {"solution": True, "grade_id": "stale"}  # not a solution
    nb = assign.tag_notebook(nb)
    solution_meta = lambda k: {"grade": False, "grade_id": f"ex{k}", "locked": False,
                               "schema_version": 3, "solution": True, "task": False}
    check_meta = lambda k: {"grade": True, "grade_id": f"ex{k}_check", "locked": True, "points": 1,
                            "schema_version": 3, "solution": False, "task": False}
    assert nbgrader_meta(nb) == [None, solution_meta(1), check_meta(1), None, solution_meta(2),
                                 check_meta(2), solution_meta(3), check_meta(3), None]
    MetadataValidator().validate_nb(nb)  # nbgrader's own schema and unique-id checks


def test_tag_notebook_is_idempotent_and_keeps_an_instructors_points():
    nb = assign.tag_notebook(hand_notebook())
    nb.cells[5].metadata["nbgrader"]["points"] = 3
    once = nbformat.writes(nb)
    assert nbformat.writes(assign.tag_notebook(nb)) == once
    assert nb.cells[5].metadata["nbgrader"]["points"] == 3


@pytest.mark.parametrize("cells, message", [
    ([solution("f", "return x"), new_markdown_cell("text")], "cell 0 has a solution region but cell 1"),
    ([new_code_cell("x = 1"), solution("f", "return x")], "cell 1 has a solution region but cell 2"),
    ([solution("f", "return x"), new_code_cell("print(f(1))")], "cell 0 has a solution region"),
    ([new_markdown_cell("### BEGIN SOLUTION\nan answer\n### END SOLUTION")], "cell 0 is a markdown cell"),
])
def test_tag_notebook_names_the_cell_of_a_solution_without_check(cells, message):
    with pytest.raises(ValueError, match=message):
        assign.tag_notebook(new_notebook(cells=cells))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_are_tagged(path):
    nb = nbformat.read(path, as_version=4)
    assert nbgrader_meta(nb) == nbgrader_meta(assign.tag_notebook(copy.deepcopy(nb))), \
        f"{path.name}: run adlab.assign.tag_notebook on it (.ci/refresh_notebooks.py does)"
    assert any(meta and meta["grade"] for meta in nbgrader_meta(nb)), f"{path.name} has no exercise"


def test_grade_scores_like_nbgrader(tmp_path, capsys):
    nb = assign.tag_notebook(hand_notebook())
    nb.cells[2].metadata["nbgrader"]["points"] = 2
    nb.cells[5].metadata["nbgrader"]["points"] = 3
    path = tmp_path / "hw.ipynb"
    nbformat.write(nb, path)

    executed = assign.execute(path)
    ours = [(r["grade_id"], r["score"], r["points"]) for r in assign.score(executed)]
    theirs = [(c.metadata["nbgrader"]["grade_id"], *determine_grade(c))
              for c in executed.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert ours == theirs == [("ex1_check", 2, 2), ("ex2_check", 0, 3), ("ex3_check", 0, 1)]

    assert main(["grade", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "ex1_check  pass  2/2",
        "ex2_check  FAIL  0/3  AssertionError: half(4) should be 2",
        "ex3_check  FAIL  0/1  wrote to stderr: careful",
        "score 2/6",
    ]
    assert nbformat.read(path, as_version=4) == nb  # grading leaves the file as it was


def test_grade_refuses_a_notebook_without_graded_cells(tmp_path, capsys):
    path = tmp_path / "plain.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), path)
    assert main(["grade", str(path)]) == 2
    assert "has no graded cells" in capsys.readouterr().err


def test_assign_refuses_to_overwrite_the_input_or_write_into_a_file(tmp_path, capsys):
    path = tmp_path / "hw.ipynb"
    nbformat.write(hand_notebook(), path)
    before = path.read_bytes()
    assert main(["assign", str(path), "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite the instructor notebook" in capsys.readouterr().err
    assert main(["assign", str(path), "--out", str(path)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert path.read_bytes() == before

    assert main(["assign", str(path), "--out", str(tmp_path / "student")]) == 0
    student = nbformat.read(tmp_path / "student" / "hw.ipynb", as_version=4)
    assert student.cells[1].source == "def double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"


def test_assign_without_nbgrader_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    path = tmp_path / "hw.ipynb"
    nbformat.write(hand_notebook(), path)
    monkeypatch.setitem(sys.modules, "nbgrader", None)  # import nbgrader now raises ImportError
    assert main(["assign", str(path), "--out", str(tmp_path / "student")]) == 2
    assert capsys.readouterr().err.strip() == assign.INSTALL_HINT
    assert 'pip install -e ".[teach]"' in assign.INSTALL_HINT
    assert not (tmp_path / "student").exists()


class StudentRun:
    """One kernel run: the student version as generated, then the instructor's exercise
    cells (solution, check) replayed after it. Every student check must fail on its stub,
    every instructor check must pass. The run's folder is not the notebook's own.

    One subclass per notebook (below), so pytest-xdist (``--dist loadscope``) runs the
    notebooks' student versions side by side: each class is its own scope."""

    path: Path

    def test_student_checks_fail_and_instructor_checks_pass(self, tmp_path, notebook_env):
        path = self.path
        instructor = assign.tag_notebook(nbformat.read(path, as_version=4))
        run = assign.student_version(instructor)
        for cell in instructor.cells:
            if "nbgrader" in cell.metadata:
                replay = copy.deepcopy(cell)
                replay.id = f"{cell.id}-instructor"
                replay.metadata["nbgrader"]["grade_id"] += "_instructor"
                run.cells.append(replay)
        nbformat.write(run, tmp_path / path.name)

        records = assign.score(assign.execute(tmp_path / path.name))
        student = [r for r in records if not r["grade_id"].endswith("_instructor")]
        teacher = [r for r in records if r["grade_id"].endswith("_instructor")]
        assert student and len(teacher) == len(student)
        assert [r for r in student if r["error"] != "NotImplementedError"] == []
        assert [r for r in teacher if r["error"] is not None] == []


for _path in NOTEBOOKS:
    _name = "TestStudent_" + "".join(ch if ch.isalnum() else "_" for ch in _path.stem)
    globals()[_name] = type(_name, (StudentRun,), {"path": _path})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nbgrader_generate_assignment(path, tmp_path):
    course = tmp_path / "course"
    (course / "source" / "hw").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(course)!r}\n")
    shutil.copy(path, course / "source" / "hw" / path.name)
    env = {**os.environ, "PATH": f"{NBGRADER.parent}{os.pathsep}{os.environ['PATH']}"}  # nbgrader runs `alembic`
    done = subprocess.run([str(NBGRADER), "generate_assignment", "hw", "--force"], cwd=course,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    instructor = nbformat.read(path, as_version=4)
    release = nbformat.read(course / "release" / "hw" / path.name, as_version=4)
    assert len(release.cells) == len(instructor.cells)
    n_solutions = 0
    for ours, theirs in zip(instructor.cells, release.cells):
        assert "BEGIN SOLUTION" not in theirs.source
        assert theirs.get("outputs", []) == []
        meta = ours.metadata.get("nbgrader", {})
        if meta.get("solution"):
            n_solutions += 1
            assert "raise NotImplementedError()" in theirs.source
        elif meta.get("grade"):
            assert theirs.source == ours.source
            assert theirs.metadata["nbgrader"]["locked"] and theirs.metadata["editable"] is False
    assert n_solutions > 0
