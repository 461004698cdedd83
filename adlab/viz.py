"""Plots and explorers for notebooks."""
from __future__ import annotations

import inspect


def show_source(obj) -> None:
    """Display the source of an adlab function or class in a notebook (plain text elsewhere)."""
    source = inspect.getsource(obj)
    where = f"# from {obj.__module__}"
    try:
        from IPython.display import Markdown, display
        display(Markdown(f"```python\n{where}\n{source}```"))
    except ImportError:  # pragma: no cover - outside IPython
        print(where)
        print(source)
