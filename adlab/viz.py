"""Plots and ipywidgets explorers for the notebooks.

Everything takes tensors or arrays as the rest of adlab produces them: images
``[3, H, W]`` in [0, 1], masks and maps ``[H, W]``.
"""
from __future__ import annotations

import inspect

import numpy as np


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def to_hwc(image) -> np.ndarray:
    """``[3, H, W]`` tensor/array in [0, 1] -> ``[H, W, 3]`` array for ``imshow``."""
    image = _np(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    return np.clip(image.squeeze(), 0.0, 1.0)


def show_source(obj) -> None:
    """Display the source of an adlab function or class in a notebook (plain text elsewhere)."""
    source = inspect.getsource(obj)
    header = f"# {obj.__module__}.{obj.__qualname__}"
    try:
        from IPython.display import Markdown, display
        display(Markdown(f"```python\n{header}\n{source}```"))
    except ImportError:  # pragma: no cover - outside IPython
        print(header)
        print(source)


def overlay(ax, image, anomaly_map=None, mask=None, title: str | None = None,
            vmin=None, vmax=None, alpha: float = 0.5):
    """Draw an image, its anomaly map as a translucent heat map, and the mask outline."""
    ax.imshow(to_hwc(image))
    if anomaly_map is not None:
        ax.imshow(_np(anomaly_map), cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax)
    if mask is not None and _np(mask).any():
        ax.contour(_np(mask), levels=[0.5], colors="white", linewidths=1)
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")
    return ax


def show_grid(images, titles=None, masks=None, maps=None, ncols: int = 8, size: float = 1.4,
              vmin=None, vmax=None, dpi: int = 60):
    """A grid of images (with optional anomaly maps and mask outlines).

    A low ``dpi`` keeps the PNG saved in a notebook small (GitHub renders it faster).
    """
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.2 * nrows),
                             squeeze=False, dpi=dpi)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        overlay(ax, images[i], None if maps is None else maps[i],
                None if masks is None else masks[i], None if titles is None else titles[i],
                vmin=vmin, vmax=vmax)
    fig.tight_layout()
    return fig


def plot_roc(ax, labels, scores, label: str | None = None):
    """ROC curve (FPR vs TPR) with the AUROC in the legend."""
    from adlab.metrics import image_auroc, roc_curve

    fpr, tpr, _ = roc_curve(_np(labels).ravel(), _np(scores).ravel())
    ax.plot(fpr, tpr, label=f"{label or 'ROC'} (AUROC {image_auroc(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    return ax


def plot_pro(ax, masks, maps, fpr_limit: float = 0.3, label: str | None = None):
    """PRO curve up to ``fpr_limit`` with the normalised AUPRO in the legend."""
    from adlab.metrics import aupro, pro_curve

    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    ax.plot(fpr[keep], pro[keep], label=f"{label or 'PRO'} (AUPRO {aupro(masks, maps, fpr_limit):.3f})")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (pixels)")
    ax.set_ylabel("per-region overlap")
    ax.legend(fontsize=8)
    return ax


def plot_score_histogram(ax, labels, scores, threshold: float | None = None, bins: int = 30):
    """Histogram of image scores, normal vs anomalous, with an optional threshold line."""
    labels, scores = _np(labels).astype(bool), _np(scores)
    edges = np.histogram_bin_edges(scores, bins=bins)
    ax.hist(scores[~labels], bins=edges, alpha=0.6, label="good")
    ax.hist(scores[labels], bins=edges, alpha=0.6, label="defect")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return ax


def interactive_figure(fn, **controls):
    """Sliders that redraw ``fn``'s figure live, and a static figure when outputs are recorded.

    ``fn(**values)`` draws one figure and calls ``plt.show()``; ``controls`` are what
    ``ipywidgets.interactive`` takes (widgets, ``(min, max, step)`` tuples, ``fixed``).
    Live (JupyterLab) this returns ``ipywidgets.interactive(fn, **controls)``: the last
    expression of a cell displays it, and moving a slider calls ``fn`` again.
    When outputs are recorded without a frontend (:func:`adlab.progress.static_output`)
    a widget would be stored as dead text (``interactive(...)``), and the figure it draws
    would be hidden inside the widget's state. So there ``fn`` is called once with the
    controls' default values, as a plain figure, followed by one line naming those values;
    nothing is returned.
    """
    import ipywidgets

    from adlab.progress import static_output

    if not static_output():
        return ipywidgets.interactive(fn, **controls)
    # manual=True builds the widgets from the abbreviations without calling fn
    ui = ipywidgets.interactive(fn, {"manual": True}, **controls)
    values = {w._kwarg: w.get_interact_value() for w in ui.kwargs_widgets}  # _kwarg: fn's argument
    fn(**values)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in values.items() if not isinstance(controls.get(k), ipywidgets.fixed))
    print(f"(static view: {shown}; run the notebook to move the sliders)")


def explorer(dataset, prediction):
    """Browse test images, move the threshold, and see the predicted region against the mask.

    ``dataset`` is an ADDataset (test split), ``prediction`` its :class:`adlab.Prediction`.
    Returns the sliders and figure of :func:`interactive_figure` (the last expression of a
    cell displays them); when outputs are recorded headless, draws the default view instead.
    The default view is the first defective image (the first image if there is none).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    maps = _np(prediction.maps)
    scores = _np(prediction.scores)
    lo, hi = float(np.quantile(maps, 0.5)), float(maps.max())
    first = next((i for i, d in enumerate(dataset.defects) if d != "good"), 0)

    def draw(image, threshold):
        i, thr = image, threshold
        mask = None if dataset.masks is None else _np(dataset.masks[i])
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6), dpi=72)
        overlay(axes[0], dataset.images[i], mask=mask,
                title=f"{dataset.defects[i]}  score {scores[i]:.3g}")
        overlay(axes[1], dataset.images[i], maps[i], title="anomaly map")
        predicted = maps[i] >= thr
        axes[2].imshow(predicted, cmap="gray")
        if mask is not None and mask.any():
            axes[2].contour(mask, levels=[0.5], colors="red", linewidths=1)
        if mask is not None:
            inter, union = (predicted & (mask > 0)).sum(), (predicted | (mask > 0)).sum()
            axes[2].set_title(f"map >= threshold  IoU {inter / max(union, 1):.2f}", fontsize=8)
        axes[2].axis("off")
        plt.show()

    return interactive_figure(
        draw, image=widgets.IntSlider(first, 0, len(dataset) - 1, description="image"),
        threshold=widgets.FloatSlider(value=float(np.quantile(maps, 0.99)), min=lo, max=hi,
                                      step=(hi - lo) / 200 or 1e-3, description="threshold",
                                      readout_format=".3g"))
