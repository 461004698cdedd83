"""Plots and the explorers build without error, show the numbers they claim, and redraw."""
import matplotlib

matplotlib.use("Agg")
import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from adlab import Prediction, metrics, viz  # noqa: E402
from adlab.progress import STATIC_ENV  # noqa: E402


class _TinyDataset:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(4, 3, 16, 16, generator=g)
        self.masks = torch.zeros(4, 16, 16)
        self.masks[2:, 4:8, 4:8] = 1
        self.labels = torch.tensor([0, 0, 1, 1])
        self.defects = ["good", "good", "hole", "scratch"]

    def __len__(self):
        return 4


@pytest.fixture
def live(monkeypatch):
    monkeypatch.delenv(STATIC_ENV, raising=False)


@pytest.fixture
def static(monkeypatch):
    monkeypatch.setenv(STATIC_ENV, "1")


def _new_figures(before):
    return [plt.figure(n) for n in plt.get_fignums() if n not in before]


def test_curves_show_the_metric_values():
    ds = _TinyDataset()
    maps = ds.masks + 0.1 * torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(1))
    scores = torch.tensor([0.1, 0.4, 0.3, 0.9])
    fig, axes = plt.subplots(1, 3)
    viz.plot_roc(axes[0], ds.labels, scores)
    viz.plot_pro(axes[1], ds.masks, maps)
    viz.plot_score_histogram(axes[2], ds.labels, scores, threshold=0.5)
    assert f"{metrics.image_auroc(ds.labels, scores):.3f}" in axes[0].get_legend().texts[0].get_text()
    assert f"{metrics.aupro(ds.masks, maps):.3f}" in axes[1].get_legend().texts[0].get_text()
    plt.close(fig)


def test_grid():
    ds = _TinyDataset()
    fig = viz.show_grid(ds.images, ["a", "b", "c", "d"], masks=ds.masks, maps=ds.masks, ncols=3)
    assert len(fig.axes) == 6 and [ax.get_title() for ax in fig.axes[:4]] == ["a", "b", "c", "d"]
    plt.close(fig)
    assert viz.to_hwc(ds.images[0]).shape == (16, 16, 3)


def test_interactive_figure_redraws_when_a_slider_moves(live):
    calls = []
    ui = viz.interactive_figure(lambda k=2, scale=1.0: calls.append((k, scale)),
                                k=ipywidgets.IntSlider(value=2, min=0, max=5), scale=(0.5, 2.0))
    assert isinstance(ui, ipywidgets.interactive) and calls == [(2, 1.0)]   # default view drawn
    ui.children[0].value = 4
    ui.children[1].value = 0.5
    assert calls[1:] == [(4, 1.0), (4, 0.5)]


def test_interactive_figure_static_draws_the_default_view_once(static, capsys):
    calls = []
    result = viz.interactive_figure(lambda k=2, scale=1.0, ax=None: calls.append((k, scale, ax)),
                                    k=ipywidgets.IntSlider(value=3, min=0, max=5), scale=(0.5, 2.0),
                                    ax=ipywidgets.fixed("axis"))
    assert result is None and calls == [(3, 1.0, "axis")]
    assert capsys.readouterr().out == "(static view: k=3, scale=1; run the notebook to move the sliders)\n"


def test_explorer_redraws_the_chosen_image(live):
    ds = _TinyDataset()
    before = plt.get_fignums()
    ui = viz.explorer(ds, Prediction(torch.rand(4), ds.masks.clone()))
    first = _new_figures(before)
    assert len(first) == 1 and first[0].axes[0].get_title().startswith("hole")  # first defect
    image, threshold = ui.children[:2]
    assert np.isclose(threshold.max, 1.0)
    before = plt.get_fignums()
    image.value = 3
    redrawn = _new_figures(before)
    assert len(redrawn) == 1 and redrawn[0].axes[0].get_title().startswith("scratch")
    before = plt.get_fignums()
    assert threshold.value == threshold.max   # maps = masks: only the 16 defect pixels reach it
    threshold.value = threshold.min           # every pixel flagged: IoU 16 / 256
    assert _new_figures(before)[0].axes[2].get_title().endswith("IoU 0.06")
    plt.close("all")


def test_explorer_static_shows_a_figure_not_a_widget(static, capsys):
    ds = _TinyDataset()
    before = plt.get_fignums()
    assert viz.explorer(ds, Prediction(torch.rand(4), ds.masks.clone())) is None
    assert len(_new_figures(before)) == 1
    assert capsys.readouterr().out.startswith("(static view: image=2, threshold=")
    plt.close("all")
