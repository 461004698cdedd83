"""pytest (nbval) runs each notebook without a frontend: record outputs readable without a kernel.

A notebook's kernel inherits this process's environment when nbval starts it (in the
setup of the notebook's first cell), so ``ADLAB_STATIC_OUTPUT=1`` is set just before:
progress bars then print their final line as text instead of a widget frozen at 0 %
(:mod:`adlab.progress`), and explorers draw a static figure of their default view
(:func:`adlab.viz.interactive_figure`). It is set for notebook items only; ``tests/conftest.py``
removes it again for every unit test, so they see the live behaviour even when a worker of
pytest-xdist runs them after a notebook.

Kernels also run torch on one thread (``OMP_NUM_THREADS=1``), as ``.ci/refresh_notebooks.py``
records them: float sums then add up in the same order in every run, so the committed
numbers are reproduced digit for digit, and the small convolutions of the quick profile
do not pay for waking a second thread (measured up to 10x slower on a busy 2-core machine).

The test command runs on several processes (pytest-xdist, ``--dist loadscope``): the cells
of one notebook are one scope, so they run in order in one worker (nbval keeps one kernel
per notebook), while different notebooks run side by side.
"""
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.path.suffix == ".ipynb":
        os.environ["ADLAB_STATIC_OUTPUT"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"
