"""pytest (nbval) runs each notebook without a frontend: record outputs readable without a kernel.

A notebook's kernel inherits this process's environment when nbval starts it (in the
setup of the notebook's first cell), so ``ADLAB_STATIC_OUTPUT=1`` is set just before:
progress bars then print their final line as text instead of a widget frozen at 0 %
(:mod:`adlab.progress`), and explorers draw a static figure of their default view
(:func:`adlab.viz.interactive_figure`). It is set for notebook items only, so the unit
tests under ``tests/`` (which pytest runs first) see the live behaviour.
"""
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.path.suffix == ".ipynb":
        os.environ["ADLAB_STATIC_OUTPUT"] = "1"
