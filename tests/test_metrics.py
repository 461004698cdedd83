"""adlab.metrics against independent references.

* AUROC / AP: scikit-learn (``roc_auc_score``, ``average_precision_score``).
* F1-max: brute force over scikit-learn's ``precision_recall_curve`` and ``f1_score``.
* AUPRO: a slow, literal reference written here (loop over thresholds, per-region
  overlaps, false positives counted image by image over normal pixels, ``np.interp``
  at the FPR limit, ``np.trapezoid``), plus values worked out by hand.
"""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import (average_precision_score, f1_score, precision_recall_curve,
                             roc_auc_score)

from adlab import metrics as M

# ----------------------------------------------------------------------------- helpers


def random_masks_and_maps(seed, n=6, size=24, levels=None):
    """Masks with several blobs (disks and rectangles) per image, one all-zero mask, one
    fully normal image; maps = blurred mask + noise (optionally quantised: many ties)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(2, n):  # image 0 normal, image 1 a defect image with an all-zero mask
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.integers(0, size, 2)
            if rng.random() < 0.5:
                r = rng.integers(1, 5)
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                h, w = rng.integers(1, 6, 2)
                masks[i, cy:cy + h, cx:cx + w] = True
    blurred = ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5))
    maps = blurred + 0.4 * rng.random(masks.shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return masks, maps


def reference_pro_curve(masks, maps):
    """Literal definition: for each distinct threshold t (high to low), PRO(t) = mean over
    8-connected regions of the detected fraction, FPR(t) = false positives summed over
    images / all normal pixels. Starts at (0, 0)."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        overlaps = [predicted[i][region].sum() / region.sum() for i, region in regions]
        false_positives = sum((predicted[i] & normal[i]).sum() for i in range(len(masks)))
        fprs.append(false_positives / normal.sum())
        pros.append(np.mean(overlaps))
    return np.array(fprs), np.array(pros)


def reference_aupro(masks, maps, limit=0.3):
    fprs, pros = reference_pro_curve(masks, maps)
    keep = fprs <= limit
    x = np.append(fprs[keep], limit)
    y = np.append(pros[keep], np.interp(limit, fprs, pros))
    return np.trapezoid(y, x) / limit


# ---------------------------------------------------------------- image-level metrics

@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + labels, 1)  # one decimal: many ties
    assert len(np.unique(scores)) < n / 3
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
    assert M.image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-10)
    # the same through torch tensors, float32 scores and int labels
    t_labels, t_scores = torch.tensor(labels.astype(int)), torch.tensor(scores, dtype=torch.float32)
    assert M.image_auroc(t_labels, t_scores) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-10)


def test_auroc_is_the_pairwise_probability():
    """AUROC = P(defect score > normal score) + 1/2 P(tie), counted over all pairs."""
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.4, 0.8, 0.2, 0.3])
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    assert M.image_auroc(labels, scores) == pytest.approx(np.mean(pairs), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(120) < 0.4
    scores = np.round(rng.normal(size=120) + 0.8 * labels, 1)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert brute == pytest.approx(f1.max(), abs=1e-12)  # the two references agree
    ours, threshold = M.f1_max(labels, scores, return_threshold=True)
    assert ours == pytest.approx(f1.max(), abs=1e-10)
    assert f1_score(labels, scores >= threshold) == pytest.approx(ours, abs=1e-10)


def test_curves_match_sklearn_points():
    from sklearn.metrics import roc_curve
    rng = np.random.default_rng(7)
    labels = rng.random(80) < 0.5
    scores = np.round(rng.random(80), 1)
    fpr, tpr, thr = M.roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    precision, recall, thr = M.precision_recall_curve(labels, scores)
    sk_p, sk_r, sk_thr = precision_recall_curve(labels, scores)
    # sklearn lists thresholds low to high and appends (P=1, R=0); it stops at full recall
    k = len(sk_thr)
    np.testing.assert_allclose(precision[::-1][-k:], sk_p[:-1], atol=1e-12)
    np.testing.assert_allclose(recall[::-1][-k:], sk_r[:-1], atol=1e-12)
    np.testing.assert_allclose(thr[::-1][-k:], sk_thr, atol=0)


# ---------------------------------------------------------------- pixel-level metrics

@pytest.mark.parametrize("levels", [None, 20])
def test_pixel_metrics_match_sklearn(levels):
    masks, maps = random_masks_and_maps(1, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-10)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert M.pixel_f1_max(masks, maps) == pytest.approx(f1.max(), abs=1e-10)


@pytest.mark.parametrize("seed,levels,limit", [(0, None, 0.3), (1, 16, 0.3), (2, 40, 0.3),
                                               (3, None, 0.05), (4, 10, 1.0)])
def test_aupro_matches_slow_reference(seed, levels, limit):
    masks, maps = random_masks_and_maps(seed, levels=levels)
    assert not masks[1].any() and not masks[0].any()  # an all-zero mask is in the set
    assert ndimage.label(masks[2:], structure=M._STACK_STRUCTURE)[1] >= 8  # several blobs
    expected = reference_aupro(masks, maps, limit)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    assert M.aupro(torch.tensor(masks).float(), torch.tensor(maps), fpr_limit=limit) == \
        pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("levels", [None, 12])
def test_pro_curve_matches_reference_points(levels):
    masks, maps = random_masks_and_maps(5, levels=levels)
    fpr, pro = M.pro_curve(masks, maps)
    ref_fpr, ref_pro = reference_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)


def test_aupro_hand_example():
    """Two 4x4 images worked by hand.

    Image A: region R1 = 2x2 block (top left), region R2 = one pixel (bottom right).
    Image B: no defect. 32 pixels, 5 defect, N = 27 normal.
    Maps: R1 = 0.9, R2 = 0.2, one normal pixel of A = 0.5; in B one pixel 0.9 and two 0.5;
    every other pixel 0.1.
      t = 0.9: PRO = mean(4/4, 0/1) = 1/2, FP = 1      -> (1/27, 1/2)
      t = 0.5: PRO = 1/2, FP = 4                       -> (4/27, 1/2)
      t = 0.2: PRO = mean(1, 1) = 1, FP = 4            -> (4/27, 1)
      t = 0.1: everything                              -> (1, 1)
    Area to 0.3: 1/27 * 1/4 + 3/27 * 1/2 + (0.3 - 4/27) * 1 = 0.3 - 1/12;
    AUPRO = (0.3 - 1/12) / 0.3 = 13/18.
    """
    masks = np.zeros((2, 4, 4))
    masks[0, :2, :2] = 1
    masks[0, 3, 3] = 1
    maps = np.full((2, 4, 4), 0.1)
    maps[0, :2, :2] = 0.9
    maps[0, 3, 3] = 0.2
    maps[0, 0, 3] = 0.5
    maps[1, 2, 1] = 0.9
    maps[1, 0, 0] = maps[1, 3, 2] = 0.5
    fpr, pro = M.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 1 / 27, 4 / 27, 4 / 27, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1], atol=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(13 / 18, abs=1e-12)


def test_regions_are_8_connected():
    """(0,0),(0,1) and the diagonal neighbour (1,2) form ONE region of 3 pixels with
    8-connectivity (4-connectivity would give two regions and PRO = mean(0, 1) = 1/2)."""
    mask = np.zeros((4, 4))
    mask[0, 0] = mask[0, 1] = mask[1, 2] = 1
    amap = np.zeros((4, 4))
    amap[1, 2] = 1.0
    fpr, pro = M.pro_curve(mask, amap)
    assert fpr[1] == 0 and pro[1] == pytest.approx(1 / 3, abs=1e-12)


def test_big_and_tiny_defect_hand_values():
    """A 20x20 defect found perfectly, a 2x2 defect missed (scored like the background).
    Pixel AUROC = (400 * 1 + 4 * 1/2) / 404 (the tiny pixels tie with every normal pixel);
    PRO curve (0,0) -> (0, 1/2) -> (1, 1), so AUPRO = (0.3 * 1/2 + 0.3^2 / 4) / 0.3 = 0.575."""
    mask = np.zeros((64, 64))
    mask[5:25, 5:25] = 1
    mask[50:52, 50:52] = 1
    amap = np.zeros((64, 64))
    amap[5:25, 5:25] = 1
    assert M.pixel_auroc(mask, amap) == pytest.approx(402 / 404, abs=1e-12)
    assert M.aupro(mask, amap) == pytest.approx(0.575, abs=1e-12)


def test_perfect_map_gives_one():
    masks, _ = random_masks_and_maps(3)
    perfect = masks.astype(np.float32)
    assert M.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_auroc(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_ap(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_f1_max(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    # the inverted map is the worst ranking: PRO stays 0 until FPR reaches 1
    assert M.aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 16])
def test_aupro_invariant_to_monotone_transforms(levels):
    masks, maps = random_masks_and_maps(4, levels=levels)
    base = M.aupro(masks, maps)
    for transformed in (np.exp(3 * maps) - 7.0, 100 * maps ** 3, np.arctan(maps)):
        assert M.aupro(masks, transformed) == pytest.approx(base, abs=1e-12)
        assert M.pixel_auroc(masks, transformed) == pytest.approx(M.pixel_auroc(masks, maps),
                                                                  abs=1e-12)


def test_area_up_to_cuts_with_linear_interpolation():
    x, y = np.array([0.0, 0.2, 0.5, 1.0]), np.array([0.0, 0.4, 1.0, 1.0])
    # 0.2 * 0.4 / 2 + 0.1 * (0.4 + 0.6) / 2 = 0.04 + 0.05
    assert M.area_up_to(x, y, 0.3) == pytest.approx(0.09, abs=1e-12)
    assert M.area_up_to(x, y, 0.2) == pytest.approx(0.04, abs=1e-12)
    assert M.area_up_to(x, y, 1.0) == pytest.approx(np.trapezoid(y, x), abs=1e-12)


# ----------------------------------------------------------------------- compute_all

def test_compute_all_keys_values_and_nan_without_masks():
    masks, maps = random_masks_and_maps(2)
    labels = np.array([0, 1] + [1] * (len(masks) - 2))
    scores = maps.reshape(len(maps), -1).max(1)
    keys = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
            "aupro"}
    record = M.compute_all(torch.tensor(labels), torch.tensor(scores), torch.tensor(masks),
                           torch.tensor(maps))
    assert set(record) == keys
    assert record["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-10)
    assert record["pixel_ap"] == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert record["aupro"] == pytest.approx(reference_aupro(masks, maps), abs=1e-9)
    assert all(isinstance(v, float) for v in record.values())
    image_only = M.compute_all(labels, scores)
    assert set(image_only) == keys
    pixel_keys = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
    assert all(math.isnan(image_only[k]) for k in pixel_keys)
    assert image_only["image_ap"] == pytest.approx(record["image_ap"])


# ---------------------------------------------------------------------------- errors

def test_shape_mismatch_raises():
    masks = np.zeros((2, 8, 8))
    masks[1, 2:4, 2:4] = 1
    with pytest.raises(ValueError, match="same shape"):
        M.aupro(masks, np.random.rand(2, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        M.pixel_auroc(masks, np.random.rand(3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        M.compute_all([0, 1], [0.1, 0.9], masks, np.random.rand(2, 4, 4))
    with pytest.raises(ValueError, match="2 masks but 3 labels"):
        M.compute_all([0, 1, 1], [0.1, 0.9, 0.5], masks, np.random.rand(2, 8, 8))
    with pytest.raises(ValueError, match="same length"):
        M.image_auroc([0, 1, 1], [0.1, 0.9])


def test_one_class_and_bad_values_raise():
    with pytest.raises(ValueError, match="only one class"):
        M.image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only one class"):
        M.compute_all([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="only one class.*masks=None"):
        M.aupro(np.zeros((2, 8, 8)), np.random.rand(2, 8, 8))
    with pytest.raises(ValueError, match="binary"):
        M.image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.image_ap([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(np.eye(4), np.eye(4), fpr_limit=0.0)
