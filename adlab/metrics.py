"""Evaluation metrics for anomaly detection: image and pixel AUROC, AP, F1-max, and AUPRO.

Every metric here answers one question about a *ranking*: does the detector give
defects larger scores than normal data? None needs a threshold chosen in advance:
each sweeps every threshold ``t`` (call a sample anomalous when ``score >= t``)
and summarises the sweep.

Counting at a threshold ``t``, with ``P`` defect and ``N`` normal samples:

* ``TP(t)`` defects at or above ``t``, ``FP(t)`` normal samples at or above ``t``;
* true-positive rate (recall) ``TPR = TP / P``; false-positive rate ``FPR = FP / N``;
* precision ``TP / (TP + FP)``.

The metrics, in the order of :func:`compute_all`:

* **AUROC** (area under the ROC curve, TPR against FPR): the probability that a
  random defect scores higher than a random normal sample (ties count 1/2). 0.5 is
  chance, 1.0 a perfect ranking. It ignores how rare defects are.
* **AP** (average precision, area under the precision-recall curve): how clean the
  top of the ranking is. Rare defects drag it down, so it is the stricter metric
  when defects are few (pixels!). Chance level is the defect fraction ``P / (P + N)``.
* **F1-max**: the best F1 = 2PR/(P+R) over all thresholds: the quality of the single
  best operating point (an optimistic one: it picks the threshold on the test set).
* **Pixel AUROC / AP / F1-max**: the same on every pixel of every test image
  (defect pixels from the ground-truth masks).
* **AUPRO** (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021; PRO
  first in "Uninformed Students", CVPR 2020): pixel AUROC counts pixels, so a large
  defect with thousands of pixels outweighs a tiny one with ten; a detector that
  misses every small defect still reaches a pixel AUROC near 1. The per-region
  overlap (PRO) averages the overlap *per connected defect region* instead, so every
  defect counts the same, whatever its size; AUPRO integrates PRO over the low-FPR
  range that matters in practice (FPR <= 0.3) and divides by 0.3, so 1.0 is perfect.

Implementation: each metric comes from a single sort of the scores. Thresholds are
the distinct score values (as scikit-learn does), so ties are handled exactly and
the numbers equal ``sklearn.metrics.roc_auc_score`` / ``average_precision_score``
(the test reference; we do not call scikit-learn here). All functions accept numpy
arrays or torch tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_curve", "precision_recall_curve", "image_auroc", "image_ap", "f1_max",
    "pixel_auroc", "pixel_ap", "pixel_f1_max", "pro_curve", "aupro", "area_up_to",
    "compute_all", "rank", "region_weights", "Ranking",
]

# 8-connectivity in the image plane, as in the MVTec AD evaluation code
# (``scipy.ndimage.label`` with a 3x3 block of ones). As a 3-D structure whose only
# non-zero plane is the middle one, a single ``label`` call labels a whole stack of
# masks [N, H, W] while never joining regions across different images.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_STACK_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STACK_STRUCTURE[1] = EIGHT_CONNECTED


# --------------------------------------------------------------------------- inputs

def _to_numpy(x, name: str) -> np.ndarray:
    """numpy view of a numpy array, a torch tensor (any device, grad or not) or a list."""
    if x is None:
        raise ValueError(f"{name} is None")
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point() and str(x.dtype) not in ("torch.float32", "torch.float64"):
            x = x.float()  # float16 / bfloat16 have no numpy counterpart worth sorting
        x = x.numpy()
    return np.asarray(x)


def _as_labels(labels, name: str = "labels") -> np.ndarray:
    """Binary ground truth as a flat bool array (accepts bool, 0/1 ints or 0./1. floats)."""
    y = _to_numpy(labels, name).reshape(-1)
    if y.dtype != bool:
        values = np.unique(y)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be binary (0 = normal, 1 = defect); found values "
                             f"{values[:10].tolist()}. Map your labels to 0/1 first.")
        y = y == 1
    return y


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    """Real-valued scores as a float array (float32 kept as is: sorting it is faster)."""
    s = _to_numpy(scores, name)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"{name} contain {bad} NaN or infinite values; the detector produced "
                         "invalid outputs (check for a diverged model or a division by zero).")
    return s


def _as_masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth masks (bool) and anomaly maps (float) as [N, H, W] arrays of one shape.

    A single image [H, W] and a channel axis [N, 1, H, W] are accepted. Masks are
    binarised at 0.5, so {0, 1}, bool and {0, 255} masks all work.
    """
    m = _to_numpy(masks, "masks")
    a = _as_scores(maps, "maps")
    shapes = []
    for arr in (m, a):
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim == 2:
            arr = arr[None]
        shapes.append(arr)
    m, a = shapes
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(f"masks and maps must be [N, H, W] (or [H, W] for one image); got "
                         f"masks {tuple(m.shape)} and maps {tuple(a.shape)}.")
    if m.shape != a.shape:
        raise ValueError(
            f"masks {tuple(m.shape)} and maps {tuple(a.shape)} must have the same shape. Resize "
            "the anomaly maps to the mask resolution first (e.g. torch.nn.functional.interpolate"
            "(maps[:, None], size=masks.shape[-2:], mode='bilinear')[:, 0]); detectors should "
            "return maps at input resolution.")
    return m > 0.5, a


def _require_both_classes(P: int, N: int, what: str) -> None:
    if P == 0 or N == 0:
        missing = "defect" if P == 0 else "normal"
        hint = (" If this category has no ground-truth masks, pass masks=None."
                if what == "pixels" else "")
        raise ValueError(
            f"The {what} contain only one class (no {missing} {what}): AUROC, AP and F1-max "
            f"compare defect against normal {what} and are undefined. Evaluate on a test set with "
            f"both normal and defect {what}.{hint}")


# ------------------------------------------------------------------- one sort, all curves

@dataclass
class Ranking:
    """Counts at every distinct threshold, from the highest score to the lowest.

    ``thresholds[k]`` is the k-th largest distinct score; ``TP[k]`` / ``FP[k]`` count the
    defect / normal samples with ``score >= thresholds[k]``; ``P`` / ``N`` are the totals.
    ``PRO[k]`` (pixels only) is the per-region overlap at that threshold.
    """

    thresholds: np.ndarray
    TP: np.ndarray
    FP: np.ndarray
    P: int
    N: int
    PRO: np.ndarray | None = None


def rank(y: np.ndarray, s: np.ndarray, region_weight: np.ndarray | None = None) -> Ranking:
    """Sort once and accumulate the counts at each distinct threshold.

    Sorting the scores from high to low and lowering the threshold one sample at a time,
    ``TP`` is the running sum of the labels and ``FP`` the running count of the rest.
    Only the last position of each run of tied scores is a valid threshold (all tied
    samples cross it together), exactly as scikit-learn's ``roc_curve`` does.
    ``region_weight`` (optional, per sample) is summed the same way: AUPRO's PRO.
    """
    y = y.reshape(-1)
    s = s.reshape(-1)
    order = np.argsort(s)[::-1]                      # the one sort: high to low
    s_sorted = s[order]
    last_of_tie = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    last_of_tie = np.append(last_of_tie, s.size - 1)
    TP = np.cumsum(y[order], dtype=np.int64)[last_of_tie]
    FP = (last_of_tie + 1) - TP
    P = int(TP[-1])
    N = int(FP[-1])
    PRO = None
    if region_weight is not None:
        PRO = np.cumsum(region_weight.reshape(-1)[order])[last_of_tie]
    return Ranking(s_sorted[last_of_tie], TP, FP, P, N, PRO)


def _image_ranking(labels, scores) -> Ranking:
    y = _as_labels(labels)
    s = _as_scores(scores).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) must have the same length, "
                         "one score per test image.")
    r = rank(y, s)
    _require_both_classes(r.P, r.N, "images")
    return r


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight ``1 / (|R_k| * K)`` for AUPRO, and the number of regions ``K``.

    ``R_1 .. R_K`` are the connected components (8-connected, per image) of the defect
    pixels of all masks. Summing these weights over the pixels above a threshold gives
    the mean over regions of the fraction of each region that is detected: the PRO.
    """
    components, K = ndimage.label(masks, structure=_STACK_STRUCTURE)
    size = np.bincount(components.reshape(-1))                # size[0] counts normal pixels
    weight = np.zeros(masks.shape, dtype=np.float64)
    defect = components > 0
    weight[defect] = 1.0 / (size[components[defect]] * max(K, 1))
    return weight, K


def _pixel_ranking(masks, maps, with_pro: bool) -> Ranking:
    return _ranking_of_pixels(*_as_masks_and_maps(masks, maps), with_pro=with_pro)


def _ranking_of_pixels(m: np.ndarray, a: np.ndarray, with_pro: bool) -> Ranking:
    w = region_weights(m)[0] if with_pro else None
    r = rank(m, a, w)
    _require_both_classes(r.P, r.N, "pixels")
    return r


# ------------------------------------------------------------------------ the summaries

def _auroc(r: Ranking) -> float:
    """Trapezoid area under (FPR, TPR), starting from (0, 0)."""
    FPR = np.concatenate([[0.0], r.FP / r.N])
    TPR = np.concatenate([[0.0], r.TP / r.P])
    return float(np.trapezoid(TPR, FPR))


def _ap(r: Ranking) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k: precision weighted by each step in recall."""
    precision = r.TP / (r.TP + r.FP)
    recall = r.TP / r.P
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _f1_all(r: Ranking) -> np.ndarray:
    """F1 at every threshold. 2PR/(P+R) = 2 TP / (TP + FP + P), which is 0 (not 0/0) at TP = 0."""
    return 2 * r.TP / (r.TP + r.FP + r.P)


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(FPR, TPR, thresholds)`` from (0, 0) (threshold +inf) to (1, 1).

    One point per distinct score, high threshold first.
    """
    r = _image_ranking(labels, scores)
    FPR = np.concatenate([[0.0], r.FP / r.N])
    TPR = np.concatenate([[0.0], r.TP / r.P])
    return FPR, TPR, np.concatenate([[np.inf], r.thresholds])


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)``, one point per distinct score."""
    r = _image_ranking(labels, scores)
    return r.TP / (r.TP + r.FP), r.TP / r.P, r.thresholds


def image_auroc(labels, scores) -> float:
    """Image AUROC: area under the ROC curve of the image scores.

    Equals the probability that a random defect image scores higher than a random
    normal one (ties count 1/2): the Mann-Whitney U statistic divided by ``P * N``.
    ``labels`` 0 = good, 1 = defect; ``scores`` larger = more anomalous.
    """
    return _auroc(_image_ranking(labels, scores))


def image_ap(labels, scores) -> float:
    """Image average precision ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds.

    The step-wise area under the precision-recall curve (no interpolation, as in
    scikit-learn). Chance level is the fraction of defect images.
    """
    return _ap(_image_ranking(labels, scores))


def f1_max(labels, scores, return_threshold: bool = False):
    """Best F1 = 2PR/(P+R) over every threshold (image level).

    An optimistic operating point: the threshold is picked on the test set itself.
    With ``return_threshold=True`` returns ``(f1, threshold)`` where samples with
    ``score >= threshold`` are called defects.
    """
    r = _image_ranking(labels, scores)
    f1 = _f1_all(r)
    k = int(np.argmax(f1))
    return (float(f1[k]), float(r.thresholds[k])) if return_threshold else float(f1[k])


def pixel_auroc(masks, maps) -> float:
    """Pixel AUROC: AUROC over all pixels of all test images (masks [N,H,W], maps [N,H,W]).

    Every pixel counts once, so large defects dominate it (see :func:`aupro`).
    """
    return _auroc(_pixel_ranking(masks, maps, with_pro=False))


def pixel_ap(masks, maps) -> float:
    """Pixel AP: average precision over all pixels. Defect pixels are rare (often < 2%),
    so AP is far below AUROC and tells more about false alarms."""
    return _ap(_pixel_ranking(masks, maps, with_pro=False))


def pixel_f1_max(masks, maps) -> float:
    """Best pixel F1 over every threshold: the best single segmentation threshold."""
    return float(np.max(_f1_all(_pixel_ranking(masks, maps, with_pro=False))))


def _pro_points(r: Ranking) -> tuple[np.ndarray, np.ndarray]:
    FPR = np.concatenate([[0.0], r.FP / r.N])
    PRO = np.concatenate([[0.0], np.clip(r.PRO, 0.0, 1.0)])  # clip float round-off
    return FPR, PRO


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve ``(FPR, PRO)`` from (0, 0) through every distinct threshold to (1, 1).

    At a threshold ``t`` with predicted defect pixels ``A_t = {maps >= t}``:

    * ``PRO(t) = 1/K sum_k |R_k ∩ A_t| / |R_k|`` over the K connected defect regions
      R_k of all masks (8-connected, each image separately);
    * ``FPR(t) = |A_t ∩ normal pixels| / |normal pixels|`` over all test images.

    Vectorised: pixel i of region R_k carries weight ``1 / (|R_k| K)``; after one sort of
    all pixels, the running sum of the weights is PRO and the running count of normal
    pixels is FP, read at the last pixel of every run of tied scores.
    """
    return _pro_points(_pixel_ranking(masks, maps, with_pro=True))


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x, y) for ``0 <= x <= x_max``.

    ``x`` must be non-decreasing and start at 0. The segment that crosses ``x_max`` is
    cut there with linear interpolation (as the MVTec AD evaluation code does).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k = int(np.searchsorted(x, x_max, side="right"))         # points with x <= x_max
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_max:                        # x[k-1] < x_max < x[k]
        y_cut = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_cut)
    return float(np.trapezoid(ys, xs))


def _aupro(r: Ranking, fpr_limit: float) -> float:
    FPR, PRO = _pro_points(r)
    return area_up_to(FPR, PRO, fpr_limit) / fpr_limit


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """AUPRO: area under the PRO curve up to ``FPR = fpr_limit``, divided by ``fpr_limit``.

    Bergmann et al., IJCV 2021 (MVTec AD), with the MVTec AD evaluation code's
    conventions: regions are 8-connected components of each ground-truth mask; FPR
    counts normal pixels of all test images; the curve runs from (0, 0) through every
    distinct threshold; it is cut at ``fpr_limit`` (default 0.3) by linear
    interpolation and integrated with the trapezoid rule. 1.0 is perfect.

    Why it exists: pixel AUROC weighs a defect by its area, so missing every small
    defect barely moves it. PRO gives each defect region the same weight, and the FPR
    limit ignores the high-FPR thresholds no one would deploy (where every region is
    "found" because most of the image is flagged).

    Beware: many repositories compute a different "AUPRO" (a fixed grid of 200
    thresholds, FPR rescaled to [0, 1] after the cut); their numbers are not
    comparable to this one.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit} (the usual value is 0.3).")
    return _aupro(_pixel_ranking(masks, maps, with_pro=True), fpr_limit)


def compute_all(labels, scores, masks=None, maps=None, fpr_limit: float = 0.3) -> dict:
    """Every metric as one record (floats).

    Keys: image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max, aupro.
    ``labels`` [N] (0 good, 1 defect) and ``scores`` [N] give the image metrics;
    ``masks`` [N, H, W] and ``maps`` [N, H, W] (same shape) the pixel metrics, which are
    NaN when ``masks`` is None (a category without ground truth). The pixel metrics
    share one sort of all pixels.
    """
    r = _image_ranking(labels, scores)
    record = dict(image_auroc=_auroc(r), image_ap=_ap(r), image_f1max=float(np.max(_f1_all(r))),
                  pixel_auroc=math.nan, pixel_ap=math.nan, pixel_f1max=math.nan, aupro=math.nan)
    if masks is None:
        return record
    if maps is None:
        raise ValueError("masks were given but maps is None: pass the anomaly maps [N, H, W] "
                         "(or masks=None for image metrics only).")
    m, a = _as_masks_and_maps(masks, maps)
    if m.shape[0] != r.P + r.N:
        raise ValueError(f"{m.shape[0]} masks but {r.P + r.N} labels: pass one mask and one map "
                         "per test image, in the same order as the labels.")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit} (the usual value is 0.3).")
    p = _ranking_of_pixels(m, a, with_pro=True)
    record.update(pixel_auroc=_auroc(p), pixel_ap=_ap(p), pixel_f1max=float(np.max(_f1_all(p))),
                  aupro=_aupro(p, fpr_limit))
    return record
