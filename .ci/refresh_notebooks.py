"""Re-execute notebooks in place (quick profile) and strip widget state, for committing.

    .venv/bin/python .ci/refresh_notebooks.py [notebooks/NN_name.ipynb ...]

Outputs must come from executing the notebook as committed (DESIGN.md); GitHub refuses a
notebook whose `metadata.widgets` lacks its state, so that key is removed. Exercise and
check cells get their nbgrader metadata from the solution markers
(`adlab.assign.tag_notebook`). Prints each notebook's wall-clock time (the budget is 2
minutes, aim for 1).
"""
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from adlab.assign import tag_notebook

os.environ.pop("MPLBACKEND", None)  # the inline backend, so figures are saved
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ADLAB_PROFILE", "quick")
os.environ["ADLAB_STATIC_OUTPUT"] = "1"  # bars end as text, explorers add a static figure
os.environ["OMP_NUM_THREADS"] = "1"  # as notebooks/conftest.py: one thread, reproducible sums

paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("notebooks").glob("*.ipynb"))
for path in paths:
    nb = tag_notebook(nbformat.read(path, as_version=4))  # before the run: a bad exercise stops it early
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t0
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    size = path.stat().st_size / 1e6
    print(f"{path}: {seconds:.1f} s, {size:.2f} MB", flush=True)
