"""pytest (nbval) runs each notebook without a frontend: record outputs readable without a kernel.

The kernels nbval starts inherit this environment: progress bars print their final line as
text instead of a widget frozen at 0% (:mod:`adlab.progress`), and explorers draw a static
figure of their default view beside the widget (:mod:`adlab.viz`).
"""
import os

os.environ["ADLAB_STATIC_OUTPUT"] = "1"
