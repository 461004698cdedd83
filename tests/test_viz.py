"""Plots and the explorer widget build without error and show the numbers they claim."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from adlab import Prediction, metrics, viz  # noqa: E402


class _TinyDataset:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(4, 3, 16, 16, generator=g)
        self.masks = torch.zeros(4, 16, 16)
        self.masks[2:, 4:8, 4:8] = 1
        self.labels = torch.tensor([0, 0, 1, 1])
        self.defects = ["good", "good", "hole", "hole"]

    def __len__(self):
        return 4


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


def test_grid_and_explorer():
    ds = _TinyDataset()
    fig = viz.show_grid(ds.images, ["a", "b", "c", "d"], masks=ds.masks, maps=ds.masks, ncols=3)
    assert len(fig.axes) == 6 and [ax.get_title() for ax in fig.axes[:4]] == ["a", "b", "c", "d"]
    plt.close(fig)
    assert viz.to_hwc(ds.images[0]).shape == (16, 16, 3)
    box = viz.explorer(ds, Prediction(torch.rand(4), ds.masks.clone()))
    index, threshold = box.children[0].children
    index.value = 3                      # redraws without error
    threshold.value = threshold.max
    assert np.isclose(threshold.max, 1.0)
    plt.close("all")
