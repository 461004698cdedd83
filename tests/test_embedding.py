"""PaDiM, PatchCore and the mean-image baseline against independent references."""
import math

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from adlab.detector import Prediction
from adlab.embedding.naive import MeanImageDetector, pixel_distance
from adlab.embedding.padim import (PaDiM, covariance, embedding_concat, gaussian_parameters,
                                   mahalanobis, random_channels)
from adlab.embedding.patchcore import (PatchCore, coreset_indices, coverage_radius, greedy_coreset,
                                       locally_aware_features, nearest_neighbours,
                                       random_projection, reweighted_score)

# ----------------------------------------------------------------------------- PaDiM


def test_covariance_is_numpy_cov_plus_eps_identity():
    x = torch.randn(12, 3, 5, dtype=torch.float64)                 # N=12 images, P=3, d=5
    got = covariance(x, epsilon=0.01)
    for p in range(3):
        want = np.cov(x[:, p].numpy(), rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(got[p].numpy(), want, rtol=1e-12)


def test_mahalanobis_matches_scipy():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(30, 4, 6, generator=g)                     # N=30, P=4, d=6
    test = torch.randn(3, 4, 6, generator=g) * 2
    mu, sigma_inv = gaussian_parameters(train, epsilon=0.01, chunk=3)   # chunking across positions
    got = mahalanobis(test, mu, sigma_inv)
    for b in range(3):
        for p in range(4):
            cov = np.cov(train[:, p].double().numpy(), rowvar=False) + 0.01 * np.eye(6)
            want = scipy.spatial.distance.mahalanobis(test[b, p].numpy(), train[:, p].double().mean(0),
                                                      np.linalg.inv(cov))
            assert got[b, p].item() == pytest.approx(want, rel=1e-4)


def test_embedding_concat_copies_coarse_cells_into_their_fine_block():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    e = embedding_concat([a, b])
    assert e.shape == (2, 7, 8, 8)
    assert torch.equal(e[:, :3], a)
    want = b.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # each cell -> a 2x2 block
    assert torch.equal(e[:, 3:], want)


def test_random_channels_are_a_seeded_subset():
    idx = random_channels(448, 100, seed=0)
    assert len(idx) == 100 == len(set(idx.tolist())) and 0 <= idx.min() and idx.max() < 448
    assert torch.equal(idx, random_channels(448, 100, seed=0))
    assert not torch.equal(idx, random_channels(448, 100, seed=1))
    with pytest.raises(ValueError, match="d=500"):
        random_channels(448, 500)


# ----------------------------------------------------------------------------- coreset


def brute_force_k_center(z: np.ndarray, n: int, start: int) -> list[int]:
    """Reference greedy k-center: full N x N distance matrix, min over the whole coreset each step."""
    dist = scipy.spatial.distance.cdist(z, z)
    chosen = [start]
    while len(chosen) < n:
        chosen.append(int(np.argmax(dist[:, chosen].min(axis=1))))
    return chosen


@pytest.mark.parametrize("start", [0, 17])
def test_greedy_coreset_equals_brute_force_k_center(start):
    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(start), dtype=torch.float64)
    got = greedy_coreset(z, 40, start=start)
    assert got.tolist() == brute_force_k_center(z.numpy(), 40, start)


def test_greedy_coreset_memory_is_linear_in_n():
    # 300k points: an N x N float32 matrix would need 360 GB, so this runs only if none is built.
    z = torch.randn(300_000, 8, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(z, 4, start=123)
    assert idx[0] == 123 and len(set(idx.tolist())) == 4
    # each pick is the farthest point from the picks before it (N x t distances only)
    for t in range(1, 4):
        d = torch.cdist(z, z[idx[:t]]).min(1).values
        assert idx[t] == int(d.argmax())


def test_coverage_radius_shrinks_as_the_coreset_grows():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    radii = [coverage_radius(x, x[coreset_indices(x, r, seed=0)]) for r in (0.01, 0.05, 0.2)]
    assert radii[0] > radii[1] > radii[2] > 0
    assert coverage_radius(x, x[coreset_indices(x, 1.0)]) < 1e-2     # 0 up to cdist's matmul rounding
    assert len(coreset_indices(x, 0.05, seed=0)) == 100


def test_random_projection_preserves_distances_on_average():
    x = torch.randn(200, 1536, generator=torch.Generator().manual_seed(2))
    z = random_projection(x, 128, seed=0)
    ratio = torch.pdist(z) / torch.pdist(x)
    assert z.shape == (200, 128) and abs(ratio.mean().item() - 1) < 0.05 and ratio.min() > 0.6
    assert torch.equal(random_projection(x[:, :64], 128), x[:, :64])      # D <= k: unchanged


# ----------------------------------------------------------------------------- PatchCore scoring


def test_nearest_neighbours_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(57, 5, generator=g), torch.randn(23, 5, generator=g)
    dist, idx = nearest_neighbours(q, bank, k=3, max_elements=50)      # 2 query rows per chunk
    full = scipy.spatial.distance.cdist(q.numpy(), bank.numpy())
    want_idx = np.argsort(full, axis=1)[:, :3]
    assert np.array_equal(idx.numpy(), want_idx)
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(full, want_idx, 1), rtol=1e-5)


def test_reweighting_eq7_by_hand():
    # 1-D memory bank; b = 3. Test image patches at 0.2 and 7.0.
    memory = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    patches = torch.tensor([[[0.2], [7.0]]])
    dist, idx = nearest_neighbours(patches[0], memory)
    # m_test,* = 7.0 (score 1.0), m* = 6.0; N_3(6.0) = {6, 3, 10} at distances 1, 4, 3 from 7.
    weight = 1 - math.exp(1) / (math.exp(1) + math.exp(4) + math.exp(3))
    s = reweighted_score(patches, dist.view(1, 2), idx.view(1, 2), memory, b=3)
    assert s.item() == pytest.approx(weight * 1.0, rel=1e-6)
    s1 = reweighted_score(patches, dist.view(1, 2), idx.view(1, 2), memory, b=1)
    assert s1.item() == pytest.approx(1.0)                 # b = 1: plain s*


def test_locally_aware_features_average_neighbourhoods():
    f2, f3 = torch.randn(1, 2, 6, 6), torch.randn(1, 3, 3, 3)
    phi = locally_aware_features([f2, f3], p=3)
    assert phi.shape == (1, 5, 6, 6)
    a = f2[0].numpy()
    np.testing.assert_allclose(phi[0, :2, 2, 3].numpy(), a[:, 1:4, 2:5].mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(phi[0, :2, 0, 0].numpy(), a[:, 0:2, 0:2].mean((1, 2)), rtol=1e-5)
    # layer3 part: its own 3x3 average (over the cells that exist), then bilinear upsampling
    b = f3[0].numpy()
    avg3 = np.array([[[b[c, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean() for j in range(3)]
                      for i in range(3)] for c in range(3)], dtype=np.float32)
    up = F.interpolate(torch.from_numpy(avg3)[None], size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(phi[:, 2:], up, rtol=1e-5, atol=1e-6)
    # channel reduction: 6 -> 3 averages consecutive channel pairs; without target_dim all 6 stay
    x = torch.randn(1, 6, 4, 4)
    torch.testing.assert_close(locally_aware_features([x], p=1, target_dim=3),
                               x.view(1, 3, 2, 4, 4).mean(2))
    torch.testing.assert_close(locally_aware_features([x], p=1), x)


# ----------------------------------------------------------------------------- naive


def test_pixel_distance_by_hand():
    x = torch.tensor([[[[1.0]], [[0.0]], [[0.5]]]])                 # one RGB pixel
    mu = torch.tensor([[[0.5]], [[0.5]], [[0.5]]])
    var = torch.tensor([[[0.25]], [[1.0]], [[4.0]]])
    assert pixel_distance(x, mu).item() == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert pixel_distance(x, mu, var, eps=0).item() == pytest.approx((1 + 0.25 + 0) / 3)


def test_naive_baseline_finds_a_bright_spot():
    g = torch.Generator().manual_seed(0)
    train = 0.4 + 0.05 * torch.rand(20, 3, 32, 32, generator=g)
    test = 0.4 + 0.05 * torch.rand(2, 3, 32, 32, generator=g)
    test[1, :, 20:23, 5:8] = 1.0
    for kw in (dict(), dict(normalize_std=False), dict(top_k=4)):
        pred = MeanImageDetector(**kw).fit(train, progress=False).predict(test)
        r, c = divmod(int(pred.maps[1].argmax()), 32)
        assert 20 <= r < 23 and 5 <= c < 8
        assert pred.scores[1] > pred.scores[0]
        want = np.sort(pred.maps[1].flatten().numpy())[-kw.get("top_k", 1):].mean()
        assert pred.scores[1].item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- detectors end to end


def _toy(n_good, n_bad, size=64, seed=0):
    """Normal: smooth noise; anomalous: the same with a bright square patch (and its mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_good + n_bad, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) * 0.5 + 0.25
    masks = torch.zeros(len(x), size, size)
    for i in range(n_good, len(x)):
        r, c = torch.randint(4, size - 16, (2,), generator=g).tolist()
        x[i, :, r:r + 10, c:c + 10] = 1.0
        masks[i, r:r + 10, c:c + 10] = 1
    return x, torch.tensor([0] * n_good + [1] * n_bad), masks


DETECTORS = [
    lambda: PaDiM(backbone="resnet18", d=40, pretrained=False),
    lambda: PatchCore(backbone="resnet18", coreset_ratio=0.25, pretrained=False),
    lambda: MeanImageDetector(),
]


@pytest.fixture(scope="module")
def toy():
    train, _, _ = _toy(24, 0, seed=1)
    test, labels, masks = _toy(12, 12, seed=2)
    return train, test, labels, masks


@pytest.mark.parametrize("make", DETECTORS, ids=["padim", "patchcore", "naive"])
def test_detectors_separate_bright_patches_from_smooth_noise(make, toy):
    train, test, labels, masks = toy
    det = make()
    with pytest.raises(RuntimeError, match="fit"):
        det.predict(test[:1])
    pred = det.fit(train, progress=False).predict(test)
    assert isinstance(pred, Prediction)
    assert pred.scores.shape == (24,) and pred.maps.shape == (24, 64, 64)
    assert torch.isfinite(pred.maps).all()
    assert roc_auc_score(labels.numpy(), pred.scores.numpy()) >= 0.95
    # localisation: pixel AUROC of the maps against the patch masks
    assert roc_auc_score(masks.flatten().numpy(), pred.maps.flatten().numpy()) >= 0.9


def test_padim_rejects_a_different_image_size(toy):
    train = toy[0]
    det = PaDiM(backbone="resnet18", d=20, pretrained=False).fit(train[:4], progress=False)
    with pytest.raises(ValueError, match="Resize"):
        det.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not both"):
        PaDiM(det.config, d=3)
