"""Progress bars that read well live and in a committed notebook.

Live (JupyterLab, a terminal) :func:`progress` is ``tqdm.auto``: a widget bar in
a notebook, a text bar in a terminal. A notebook executed without a frontend
(nbval, ``.ci/refresh_notebooks.py``, any run with ``ADLAB_STATIC_OUTPUT=1``) would
store the widget frozen at "0%" (GitHub and nbviewer cannot run it), so there the
bar draws nothing while it runs and prints its final line once, as text, when it
closes::

    train: 100%|##########| 200/200 [00:05<00:00, 38.1it/s, loss=0.0123]

``notebooks/conftest.py`` and the refresh script set the variable; nothing else
has to. Use :func:`progress` wherever you would use ``tqdm``.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm as _text_tqdm

STATIC_ENV = "ADLAB_STATIC_OUTPUT"


def static_output() -> bool:
    """True when outputs are being recorded for readers without a kernel."""
    return os.environ.get(STATIC_ENV, "").strip().lower() not in ("", "0", "false", "no")


class FinalLineBar(_text_tqdm):
    """A tqdm bar that stays silent while running and prints its final state as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs["ascii"] = True  # '#' blocks: the same in every renderer and font
        kwargs["leave"] = False  # close() prints the one final line itself
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):  # noqa: D401 - tqdm's hook
        """Draw nothing while running (the stored output would be a frozen frame)."""
        return False

    def close(self):
        if not self.disable and not getattr(self, "_final_printed", False):
            self._final_printed = True
            self._ema_dt = lambda: None  # the overall rate, not a moving average
            self.fp.write(self.__str__() + "\n")
            self.fp.flush()
        super().close()


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` live; :class:`FinalLineBar` when static."""
    if static_output():
        return FinalLineBar(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
