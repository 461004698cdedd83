"""DifferNet (adlab.flows.differnet) against independent references: FrEIA, autograd,
torchvision, scipy, torch.distributions, and properties the paper relies on."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from adlab.features import PretrainedWeightsWarning
from adlab.flows import differnet as dn
from adlab.flows.differnet import (DifferNet, DifferNetConfig, anomaly_score, differnet_flow,
                                   gradient_map, nll_loss, rotate, st_subnet)
from adlab.train import NonFiniteLossError

TINY = dict(input_size=64, n_scales=1, hidden=16, n_blocks=2, steps=5, batch_size=4,
            n_transforms=2, train_pool=2, n_transforms_test=2, pretrained=False)


def _images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# ------------------------------------------------------------------ the flow

def test_flow_equals_freia_glow_blocks():
    """Same weights: our flow and FrEIA's PermuteRandom(seed=k) + GLOWCouplingBlock give the
    same z and log-det (FrEIA's ATAN clamp is clamp * 0.636 * atan(s); DifferNet's
    freia_funcs divides s by clamp, so FrEIA gets that form as a callable)."""
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")
    dim, hidden, clamp = 10, 12, 3.0
    torch.manual_seed(0)
    ours = differnet_flow(dim, n_blocks=3, hidden=hidden, clamp=clamp)
    ref = Ff.SequenceINN(dim)
    for k in range(3):
        ref.append(Fm.PermuteRandom, seed=k)
        ref.append(Fm.GLOWCouplingBlock, subnet_constructor=st_subnet(hidden), clamp=clamp,
                   clamp_activation=lambda u: 0.636 * torch.atan(u / clamp))
    couplings = [m for m in ref.module_list if isinstance(m, Fm.GLOWCouplingBlock)]
    for block, glow in zip(couplings, [layer for layer in ours if hasattr(layer, "first")]):
        # FrEIA's subnet2 (from the second half) changes the first half, as our `first`
        glow.first.subnet.load_state_dict(block.subnet2.state_dict())
        glow.second.subnet.load_state_dict(block.subnet1.state_dict())
    x = 2 * torch.randn(7, dim)
    z_ref, logdet_ref = ref(x)
    z, logdet = ours(x)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-4, rtol=1e-5)


def test_flow_logdet_is_autograd_logdet_and_inverse_round_trips():
    torch.manual_seed(1)
    flow = differnet_flow(6, n_blocks=2, hidden=8, clamp=3.0).double()
    for p in flow.parameters():  # a trained-looking flow, far from the identity
        p.data.normal_(0, 0.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    z, logdet = flow(x)
    for i in range(len(x)):
        jac = jacobian(lambda v: flow(v[None])[0][0], x[i])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.inverse(z), x)


def test_log_scales_stay_inside_the_atan_clamp():
    """Eq. (2): |s| < 0.636 * pi / 2 * alpha, whatever the subnet says: log|det| per block is bounded."""
    torch.manual_seed(2)
    flow = differnet_flow(8, n_blocks=1, hidden=8, clamp=3.0)
    for p in flow.parameters():
        p.data.normal_(0, 50.0)
    _, logdet = flow(100 * torch.randn(16, 8))
    assert logdet.abs().max() < 8 * 3.0 * 0.636 * math.pi / 2
    assert logdet.abs().max() > 8 * 3.0 * 0.636 * 0.5  # and the clamp is not trivially small


def test_nll_loss_is_gaussian_nll_per_dimension():
    """Eq. (4) is -log p(y) (up to the constant D/2 log 2 pi) divided by D."""
    torch.manual_seed(3)
    z, logdet = torch.randn(5, 12), torch.randn(5)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + logdet
    const = 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll_loss(z, logdet), -log_p.mean() / 12 - const)


# ------------------------------------------------------------------ transforms, features, maps

@pytest.mark.parametrize("degrees", [90.0, 180.0, 270.0, 30.0])
def test_rotate_matches_torchvision(degrees):
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    x = _images(2, size=16)
    ref = tv_rotate(x, degrees, interpolation=InterpolationMode.BILINEAR)
    ours = rotate(x, torch.tensor([degrees, degrees]))
    if degrees % 90 == 0:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, torch.rot90(x, int(degrees // 90), dims=(2, 3)),
                                   atol=1e-5, rtol=0)
    else:  # both sample bilinearly; torchvision fills partly outside pixels differently
        inner = (slice(None), slice(None), slice(4, 12), slice(4, 12))
        torch.testing.assert_close(ours[inner], ref[inner], atol=1e-4, rtol=0)


def test_gradient_map_is_scipy_blur_then_channel_sum():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    ref = np.stack([sum(np.abs(ndimage.gaussian_filter(g[b, c].numpy(), 3.0)) for c in range(3))
                    for b in range(2)])
    np.testing.assert_allclose(gradient_map(g, 3.0).numpy(), ref, atol=1e-10)


def test_anomaly_score_is_mean_over_transforms_of_half_squared_norm():
    z = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 4.0]]])  # [B=2, T=2, D=2]
    torch.testing.assert_close(anomaly_score(z), torch.tensor([(0.5 * 5 + 0) / 2,
                                                               (0.5 * 9 + 0.5 * 16) / 2]))


# ------------------------------------------------------------------ the detector

@pytest.fixture(scope="module")
def fitted():
    return DifferNet(**TINY, seed=0).fit(_images(8), progress=False)


def test_predict_scores_equal_the_feature_path_and_maps_are_input_sized(fitted):
    x = _images(3, size=48, seed=5)  # not the model's input size: resized inside, maps back at 48
    pred = fitted.predict(x)
    angles = dn.test_angles(fitted.config.n_transforms_test).expand(3, -1)
    torch.testing.assert_close(pred.scores, fitted.score_features(fitted.features(x, angles)),
                               atol=1e-4, rtol=1e-4)
    assert pred.maps.shape == (3, 48, 48) and torch.isfinite(pred.maps).all()
    assert (pred.maps >= 0).all() and pred.maps.amax(dim=(1, 2)).min() > 0


def test_score_over_four_right_angles_is_rotation_invariant():
    """With T = 4 test rotations (0, 90, 180, 270 deg) an image turned by 90 deg has the same
    transform set, hence the same score (Sec. 3.4's reason for averaging over transforms)."""
    det = DifferNet(**{**TINY, "n_transforms_test": 4}, seed=1).fit(_images(8), progress=False)
    x = _images(2, seed=7)
    torch.testing.assert_close(det.predict(torch.rot90(x, 1, dims=(2, 3))).scores,
                               det.predict(x).scores, rtol=1e-4, atol=1e-5)
    one = DifferNet(**{**TINY, "n_transforms_test": 1}, seed=1).fit(_images(8), progress=False)
    assert not torch.allclose(one.predict(torch.rot90(x, 1, dims=(2, 3))).scores,
                              one.predict(x).scores, rtol=1e-3)


def test_gradient_map_points_at_a_local_change():
    """Sec. 3.5: the input gradient of the score is largest where the image differs from training."""
    torch.manual_seed(0)
    flat = 0.5 + 0.02 * torch.randn(16, 3, 64, 64)
    det = DifferNet(**{**TINY, "steps": 60, "hidden": 32}, seed=0).fit(flat, progress=False)
    test = 0.5 + 0.02 * torch.randn(1, 3, 64, 64)
    test[:, :, 8:20, 40:52] = 1.0  # a bright square defect
    m = det.predict(test).maps[0]
    assert m[8:20, 40:52].mean() > 1.3 * m[36:60, 4:28].mean()


def test_quick_training_is_finite_for_three_seeds():
    for seed in range(3):
        det = DifferNet(**{**TINY, "steps": 20}, seed=seed).fit(_images(8, seed=seed),
                                                                progress=False)
        assert len(det.history) == 20 and all(math.isfinite(v) for v in det.history)
        assert torch.isfinite(det.predict(_images(2, seed=9)).maps).all()


def test_nan_input_stops_training_with_the_step():
    x = _images(8)
    x[3, :, 5, 5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 0"):
        DifferNet(**TINY).fit(x, progress=False)


def test_predict_before_fit_and_wrong_shape_are_clear(fitted):
    with pytest.raises(RuntimeError, match="call fit"):
        DifferNet(**TINY).predict(_images(1))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))


# ------------------------------------------------------------------ weights and the paper profile

def test_offline_alexnet_weights_warn_with_the_path_and_fall_back(tmp_path, monkeypatch):
    import torchvision.models._api as tv_api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # offline: no download is tried at all
    with pytest.warns(PretrainedWeightsWarning, match=str(tmp_path / "hub" / "checkpoints")):
        model, loaded = dn.alexnet_features(pretrained=True, seed=0)
    assert not loaded
    reference, _ = dn.alexnet_features(pretrained=False, seed=0)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)

    def unreachable(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.delenv("HF_HUB_OFFLINE")                # online attempt, but the host is unreachable
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", unreachable)
    with pytest.warns(PretrainedWeightsWarning, match="name resolution"):
        _, loaded = dn.alexnet_features(pretrained=True, seed=0)
    assert not loaded


def test_paper_profile_builds_trains_one_step_and_predicts(monkeypatch):
    """The paper's architecture (AlexNet at 448/224/112 px, 8 blocks of 2048-wide s-t nets,
    768-d features), random init, one step and one predict on CPU."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    cfg = DifferNetConfig(pretrained=False, steps=1, batch_size=2, train_pool=2,
                          n_transforms=2, n_transforms_test=2)
    assert (cfg.input_size, cfg.n_scales, cfg.hidden, cfg.n_blocks) == (448, 3, 2048, 8)
    det = DifferNet(cfg).fit(_images(2, size=96), progress=False)
    assert sum(p.numel() for p in det.flow.parameters()) > 150e6
    assert det.flow[1].first.subnet[0].in_features == 384
    assert len(det.history) == 1 and math.isfinite(det.history[0])
    pred = det.predict(_images(1, size=96, seed=3))
    assert pred.maps.shape == (1, 96, 96) and torch.isfinite(pred.scores).all()
