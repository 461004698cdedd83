"""The committed notebooks read right without a kernel (GitHub, nbviewer, a printed PDF).

These tests read the stored outputs only; ``pytest --nbval`` (the project's test command)
re-executes every notebook and compares those outputs with what the code prints now.
"""
import base64
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"
# a widget stored without its state is dead text: a bar frozen at 0 %, or a box's repr
DEAD_WIDGET_TEXT = re.compile(r"(^|\s)0%\||^(VBox|HBox|interactive)\(")
MACHINE_PATH = re.compile(r"/root/|/home/|/tmp/|/Users/|[A-Z]:\\\\Users")
PLOTTING = re.compile(r"\bplt\.|show_grid\(|interactive_figure\(|explorer\(|\.imshow\(")
MAX_PNG_KB = 200  # "no megabyte-sized images" (DESIGN.md): GitHub renders small PNGs fast


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def nb(request):
    return nbformat.read(request.param, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _texts(output):
    """Every text a reader sees for one output (streams, text/plain, markdown, tracebacks)."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return [output.ename, output.evalue, *output.traceback]
    return [v for k, v in output.get("data", {}).items() if k.startswith("text/")]


def _has_image(cell):
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


def test_found_the_notebooks():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


def test_cells_executed_once_in_order(nb):
    counts = [c.execution_count for c in _code(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}: re-execute top to bottom"


def test_no_error_outputs(nb):
    errors = [(i, o.ename) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


def test_no_widget_without_a_static_fallback(nb):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or _has_image(cell):
            continue
        for o in cell.outputs:
            assert WIDGET not in o.get("data", {}), f"cell {i}: a widget view and no figure beside it"
            for text in _texts(o):
                assert not DEAD_WIDGET_TEXT.search(text), f"cell {i}: dead widget text {text[:60]!r}"


def test_no_machine_paths_in_outputs(nb):
    for i, cell in enumerate(_code(nb)):
        for o in cell.outputs:
            for text in _texts(o):
                match = MACHINE_PATH.search(text)
                assert not match, f"code cell {i}: machine path in {text[max(0, match.start() - 40):match.end() + 40]!r}"


def test_plotting_notebooks_store_their_figures(nb):
    plotting = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and PLOTTING.search(c.source)]
    if plotting:
        assert any(_has_image(c) for c in _code(nb)), f"plotting code in cells {plotting} but no figure stored"


def test_inline_backend_set_where_matplotlib_is_first_used(nb):
    """With MPLBACKEND=Agg (as CI sets it) a notebook without ``%matplotlib inline`` stores no figures."""
    first = next((c for c in _code(nb) if "matplotlib" in c.source or "plt." in c.source), None)
    if first is not None:
        assert "%matplotlib inline" in first.source, f"add %matplotlib inline to: {first.source[:80]!r}"


def test_small_images_and_no_widget_state(nb):
    assert "widgets" not in nb.metadata, "strip metadata.widgets (.ci/refresh_notebooks.py does)"
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if png:
                kb = len(base64.b64decode(png)) / 1024
                assert kb <= MAX_PNG_KB, f"cell {i}: a {kb:.0f} KB PNG (lower the dpi or the figure size)"


@pytest.mark.parametrize("text, dead", [
    ("two moons:   0%|          | 0/800 [00:00<?, ?it/s]", True),
    ("VBox(children=(HBox(children=(IntSlider(value=0, ...", True),
    ("interactive(children=(FloatSlider(value=0.5, ...", True),
    ("two moons: 100%|##########| 800/800 [00:05<00:00, 150.00it/s]", False),
    ("(static view: k=13; run the notebook to move the sliders)", False),
])
def test_dead_widget_pattern(text, dead):
    assert bool(DEAD_WIDGET_TEXT.search(text)) == dead
