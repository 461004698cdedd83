"""Assignment mode: turn a notebook's exercises into an nbgrader assignment, and grade one.

Every exercise in the notebooks is two code cells (DESIGN.md, "Notebooks"): the exercise
cell holds the reference answer between ``### BEGIN SOLUTION`` and ``### END SOLUTION``,
and the cell right after it checks the answer with asserts. From these markers alone

* :func:`tag_notebook` writes the nbgrader cell metadata (exercise cell: a solution
  cell; check cell: a locked grade cell worth some points), so ``nbgrader
  generate_assignment`` accepts the notebook;
* :func:`student_version` strips the solutions with nbgrader's own preprocessors
  (``python -m adlab assign NOTEBOOK... --out DIR``);
* :func:`execute` and :func:`score` run a notebook and score every graded cell the way
  nbgrader's autograder does (``python -m adlab grade NOTEBOOK``).

nbgrader is an optional extra (``pip install -e ".[teach]"``); only :func:`student_version`
needs it. Tagging and grading read and run notebooks with nbformat and nbclient.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import nbformat

# nbgrader's ClearSolutions finds a solution region by these substrings anywhere in a
# line (jupyter/nbgrader 0.9.6, nbgrader/preprocessors/clearsolutions.py:31-39).
BEGIN, END = "BEGIN SOLUTION", "END SOLUTION"
DEFAULT_POINTS = 1
INSTALL_HINT = ('nbgrader is not installed; install the teaching extra: '
                'pip install -e ".[teach]"  (from the adlab folder)')


def _meta(grade_id: str, *, solution: bool, points: float | None = None) -> dict:
    """nbgrader cell metadata, schema version 3 (nbgrader 0.9.6, nbgrader/nbgraderformat/v3.json)."""
    meta = {"grade": points is not None, "grade_id": grade_id, "locked": not solution,
            "schema_version": 3, "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def tag_notebook(nb):
    """Give each exercise cell and its check cell nbgrader metadata; clear it everywhere else.

    The k-th code cell containing ``### BEGIN SOLUTION`` becomes solution cell ``ex<k>``
    (k counts from 1, as the notebooks number their exercises); the code cell right
    after it becomes the locked grade cell ``ex<k>_check``, worth 1 point unless its
    metadata already gives other ``points`` (an instructor's edit is kept). Any other
    ``nbgrader`` cell metadata is removed, so tagging twice gives the same notebook.
    nbgrader needs no notebook-level metadata beyond the kernelspec.

    Modifies ``nb`` in place and returns it. Raises ``ValueError`` naming the cell when a
    solution region is not in a code cell followed by a code cell that asserts.
    """
    roles = {}
    for i, cell in enumerate(nb.cells):
        if BEGIN not in cell.source:
            continue
        if cell.cell_type != "code":
            raise ValueError(f"cell {i} is a {cell.cell_type} cell with a solution region; "
                             "solution regions belong in code cells")
        check = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if check is None or check.cell_type != "code" or BEGIN in check.source \
                or "assert" not in check.source:
            raise ValueError(f"cell {i} has a solution region but cell {i + 1} is not a code "
                             "cell that checks it with asserts; put the check cell right after it")
        k = len(roles) // 2 + 1
        roles[i], roles[i + 1] = ("solution", f"ex{k}"), ("check", f"ex{k}_check")

    for i, cell in enumerate(nb.cells):
        old = cell.metadata.pop("nbgrader", {})
        role, grade_id = roles.get(i, (None, None))
        if role == "solution":
            cell.metadata["nbgrader"] = _meta(grade_id, solution=True)
        elif role == "check":
            points = old.get("points", DEFAULT_POINTS) if old.get("grade") else DEFAULT_POINTS
            cell.metadata["nbgrader"] = _meta(grade_id, solution=False, points=points)
    return nb


def student_version(nb):
    """The notebook a student gets: tagged, solutions stubbed, outputs and hidden tests cleared.

    Uses nbgrader's preprocessors, in the order ``nbgrader generate_assignment`` runs them
    (nbgrader 0.9.6, nbgrader/converters/generate_assignment.py:59-72): LockCells (check
    cells become read-only in Jupyter), ClearSolutions (each solution region becomes
    ``# YOUR CODE HERE`` / ``raise NotImplementedError()``), ClearOutput, ClearHiddenTests.
    The nbgrader metadata stays, so the result can be graded. Returns a new notebook.
    """
    from nbgrader.preprocessors import ClearHiddenTests, ClearOutput, ClearSolutions, LockCells

    nb = tag_notebook(copy.deepcopy(nb))
    resources = {}
    for pre in (LockCells(), ClearSolutions(), ClearOutput(), ClearHiddenTests()):
        nb, resources = pre.preprocess(nb, resources)
    return nb


def _failure(cell) -> str | None:
    """Why a graded cell earns nothing, or None when it passed.

    nbgrader's rule (nbgrader 0.9.6, nbgrader/utils.py:128-161, ``determine_grade``): a
    grade code cell whose outputs hold an error or anything written to stderr gets 0
    points, otherwise all of them. (nbgrader also reads a numeric last-expression result as partial credit; the
    check cells here end with ``print``, so that case is not implemented.)
    """
    if cell.get("execution_count") is None:
        return "not run"
    for out in cell.outputs:
        if out.output_type == "error":
            return (f"{out.ename}: {out.evalue}" if out.evalue else out.ename).splitlines()[0][:120]
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stderr":
            return "wrote to stderr: " + (out.text.strip().splitlines() or [""])[0][:100]
    return None


def execute(path, timeout: int = 600):
    """Run every cell of the notebook at ``path`` and return the executed copy.

    nbclient runs the cells with errors allowed (one wrong exercise does not stop the
    rest), in the notebook's folder, interrupting a cell after ``timeout`` seconds. Old
    outputs are cleared first, so a cell the run never reaches shows as not run. The
    file itself is not modified.
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=timeout, interrupt_on_timeout=True, allow_errors=True,
                            kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        client.execute()
    except Exception as err:  # e.g. the kernel died: the cells not reached stay "not run"
        print(f"{path}: execution stopped: {type(err).__name__}: {err}".splitlines()[0],
              file=sys.stderr)
    return nb


def score(nb) -> list[dict]:
    """One record per graded cell of an executed notebook: ``grade_id``, ``points``,
    ``score`` and ``error`` (None when the cell passed)."""
    records = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade"):
            error = _failure(cell)
            records.append({"grade_id": meta["grade_id"], "points": meta["points"],
                            "score": 0 if error else meta["points"], "error": error})
    return records


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def assign_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adlab assign",
        description="Write the student version of each notebook into DIR: solutions replaced "
                    "by stubs, outputs cleared, check cells locked (an earlier student version "
                    "of the same name in DIR is replaced).")
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    try:
        import nbgrader  # noqa: F401
    except ImportError:
        return _fail(INSTALL_HINT)
    if args.out.exists() and not args.out.is_dir():
        return _fail(f"--out {args.out} is a file; give a folder for the student notebooks")
    targets = {}
    for src in args.notebooks:
        dst = args.out / src.name
        if not src.is_file():
            return _fail(f"no notebook at {src}; nothing was written")
        if dst.resolve() == src.resolve():
            return _fail(f"refusing to overwrite the instructor notebook {src} with its student "
                         "version; choose another --out folder")
        if dst in targets:
            return _fail(f"two notebooks named {src.name} would both be written to {dst}; "
                         "assign them with different --out folders")
        targets[dst] = src
    students = {}
    for dst, src in targets.items():  # build every student version before writing any
        try:
            students[dst] = student_version(nbformat.read(src, as_version=4))
        except Exception as err:
            return _fail(f"{src}: {err}".splitlines()[0] + "; nothing was written")
    args.out.mkdir(parents=True, exist_ok=True)
    for dst, nb in students.items():
        nbformat.write(nb, dst)
        n = sum(cell.metadata.get("nbgrader", {}).get("solution", False) for cell in nb.cells)
        print(f"{dst}: {n} exercises")
    return 0


def grade_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adlab grade",
        description="Run a notebook and print pass/FAIL and points for each graded check cell, "
                    "then the total. Exit code 0 when every check passes, 1 otherwise.")
    parser.add_argument("notebook", type=Path, metavar="NOTEBOOK")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        return _fail(f"no notebook at {args.notebook}")
    try:
        cells = nbformat.read(args.notebook, as_version=4).cells
    except Exception as err:
        return _fail(f"cannot read {args.notebook} as a notebook: {err}".splitlines()[0])
    if not any(c.metadata.get("nbgrader", {}).get("grade") for c in cells):
        return _fail(f"{args.notebook} has no graded cells (no nbgrader metadata); make it "
                     "with `python -m adlab assign` or tag it with adlab.assign.tag_notebook")
    records = score(execute(args.notebook))
    width = max(len(r["grade_id"]) for r in records)
    for r in records:
        status = "FAIL" if r["error"] else "pass"
        line = f"{r['grade_id']:<{width}}  {status}  {r['score']:g}/{r['points']:g}"
        print(line + (f"  {r['error']}" if r["error"] else ""))
    total, possible = sum(r["score"] for r in records), sum(r["points"] for r in records)
    print(f"score {total:g}/{possible:g}")
    return 0 if all(r["error"] is None for r in records) else 1
