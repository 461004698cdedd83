"""PyramidFlow: pyramid, couplings, volume normalisation, loss and detector.

References: scipy / NumPy re-implementations of the pyramid operators (zero-padded
convolution, max pooling, nearest upsampling), autograd Jacobians for the log-dets and
for volume preservation, NumPy's FFT and hand examples for the Fourier loss.
"""
import math
from itertools import combinations

import numpy as np
import pytest
import torch
from scipy import ndimage

from adlab.flows.pyramidflow import (PyramidFlow, PyramidFlowConfig, PyramidFlowNet,
                                     VolumeNorm, VolumePreservingConv1x1, anomaly_map,
                                     build_pyramid, compose_pyramid, fourier_loss,
                                     latent_template, pyramid_blocks)
from adlab.train import NonFiniteLossError


def _randomise(module, scale=0.1, seed=0):
    """Non-zero weights everywhere (the last subnet convs start at 0: identity couplings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------- pyramid

def _np_blur(x):
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    return ndimage.convolve(x, kernel, mode="constant", cval=0.0)


def _np_pyramid(x, levels):
    """Laplacian pyramid of one 2-D array with scipy: blur + 2x2 max; nearest x2 + blur."""
    gaussian = [x]
    for _ in range(levels - 1):
        b = _np_blur(gaussian[-1])
        h, w = b.shape
        gaussian.append(b.reshape(h // 2, 2, w // 2, 2).max(axis=(1, 3)))
    up = [_np_blur(np.repeat(np.repeat(g, 2, 0), 2, 1)) for g in gaussian[1:]]
    return [g - u for g, u in zip(gaussian, up)] + [gaussian[-1]]


def test_pyramid_matches_scipy_reference_and_composes_back():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours = build_pyramid(x, 4)
    assert [tuple(p.shape[-2:]) for p in ours] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    for b in range(2):
        for c in range(3):
            ref = _np_pyramid(x[b, c].numpy(), 4)
            for level, r in zip(ours, ref):
                np.testing.assert_allclose(level[b, c].numpy(), r, atol=1e-12)
    torch.testing.assert_close(compose_pyramid(ours), x, atol=1e-12, rtol=0)


def test_compose_is_linear_so_level_differences_recompose_to_image_differences():
    x, y = torch.randn(2, 1, 2, 16, 16).unbind(0)
    px, py = build_pyramid(x, 3), build_pyramid(y, 3)
    torch.testing.assert_close(compose_pyramid([a - b for a, b in zip(px, py)]), x - y,
                               atol=1e-5, rtol=0)


def test_block_order_follows_the_official_loop():
    # model.py:291-300 for 2, 4 and 8 levels, written out by hand
    assert pyramid_blocks(2) == [("down", 0), ("up", 0)]
    assert pyramid_blocks(4) == [("dual", 0), ("down", 2), ("up", 0), ("dual", 1)]
    assert pyramid_blocks(8) == [("dual", 0), ("dual", 2), ("dual", 4), ("down", 6), ("up", 0),
                                 ("dual", 1), ("dual", 3), ("dual", 5)]


# ----------------------------------------------------------------------------- flow

def _small_net(volume_norm="CVN", levels=3, size=4, channels=2, seed=0):
    net = PyramidFlowNet(channels, size, levels=levels, stacks=1, kernel_size=3,
                         volume_norm=volume_norm, seed=seed)
    return _randomise(net.double(), seed=seed)


def _levels(batch, channels=2, size=4, levels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return build_pyramid(torch.randn(batch, channels, size, size, generator=g,
                                     dtype=torch.float64), levels)


def _flat(levels):
    return torch.cat([p.flatten(1) for p in levels], 1)


def _unflat(v, like):
    out, i = [], 0
    for p in like:
        n = p[0].numel()
        out.append(v[:, i:i + n].view(-1, *p.shape[1:]))
        i += n
    return out


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN", "none"])
def test_flow_is_invertible(volume_norm):
    net = _small_net(volume_norm)
    x = _levels(4)
    net.train()
    net(x)                                    # one training pass: running means become non-zero
    net.eval()
    z, _ = net(x)
    assert not torch.allclose(_flat(z), _flat(x))
    torch.testing.assert_close(_flat(net.inverse(z)), _flat(x), atol=1e-9, rtol=0)


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN", "none"])
def test_logdet_matches_autograd_jacobian(volume_norm):
    net = _small_net(volume_norm)
    x = _levels(3)
    net.train()
    net(x)
    net.eval()                                # per-sample map: running mean fixed
    _, logdet = net(x)
    for b in range(3):
        xb = [p[b:b + 1] for p in x]
        jac = torch.autograd.functional.jacobian(
            lambda v: _flat(net(_unflat(v, xb))[0]), _flat(xb), vectorize=True)[0, :, 0, :]
        sign, ref = torch.linalg.slogdet(jac)
        assert sign != 0
        assert logdet[b].item() == pytest.approx(ref.item(), abs=1e-8)


def test_volume_normalisation_preserves_the_batch_volume():
    """Training mode, CVN: the joint Jacobian of the whole batch has determinant +-1 (autograd).

    (SVN is exact for the couplings whose log-scales are computed at the transformed level's
    own size; a "down" coupling subsamples them to the coarser level, where their per-channel
    mean is no longer exactly 0, as in the official code.)
    """
    x = _levels(2)

    def joint_logdet(net):
        net.train()
        jac = torch.autograd.functional.jacobian(lambda v: _flat(net(_unflat(v, x))[0]), _flat(x),
                                                 vectorize=True)
        n = _flat(x).numel()                  # [B, D, B, D]: every output against every input
        return torch.linalg.slogdet(jac.reshape(n, n))[1].item()

    assert joint_logdet(_small_net("CVN")) == pytest.approx(0.0, abs=1e-8)
    assert abs(joint_logdet(_small_net("none"))) > 0.1        # without it the volume changes


def test_volume_norm_running_mean_and_modes():
    norm = VolumeNorm("CVN", (3, 4, 4))
    s = torch.randn(5, 3, 4, 4) + 2.0
    out = norm.train()(s)
    torch.testing.assert_close(out.mean(dim=(0, 1)), torch.zeros(4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.running_mean[0, 0], 0.1 * s.mean(dim=(0, 1)))
    torch.testing.assert_close(norm.eval()(s), s - 0.1 * s.mean(dim=(0, 1)))
    svn = VolumeNorm("SVN", (3, 4, 4)).train()
    torch.testing.assert_close(svn(s).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="volume_norm must be"):
        VolumeNorm("BN", (3, 4, 4))


def test_volume_preserving_conv_has_unit_determinant():
    conv = _randomise(VolumePreservingConv1x1(5, seed=0), scale=0.5)
    assert torch.linalg.det(conv.weight()).abs().item() == pytest.approx(1.0, abs=1e-5)
    free = _randomise(VolumePreservingConv1x1(5, seed=0, centre=False), scale=0.5)
    assert abs(torch.linalg.det(free.weight()).abs().item() - 1.0) > 1e-3


# ----------------------------------------------------------------------------- loss, map

def test_fourier_loss_hand_example_constant_difference():
    # a constant difference d: its squared map d^2 has only the DC term H W d^2, so the mean
    # magnitude over the H W frequencies is d^2
    y = torch.zeros(2, 3, 8, 8)
    y[1] += 3.0
    assert fourier_loss([y]).item() == pytest.approx(9.0, rel=1e-6)


def test_fourier_loss_matches_numpy_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    latents = build_pyramid(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), 3)
    image = compose_pyramid
    spectra = []
    for i, j in combinations(range(4), 2):
        diff = image([(p[i:i + 1] - p[j:j + 1]) ** 2 for p in latents])[0].mean(0).numpy()
        spectra.append(np.abs(np.fft.fft2(diff)))
    assert fourier_loss(latents).item() == pytest.approx(np.mean(spectra), rel=1e-10)


def test_fourier_loss_needs_a_pair():
    with pytest.raises(ValueError, match="at least 2 images"):
        fourier_loss([torch.zeros(1, 2, 4, 4)])


def test_template_and_anomaly_map_by_hand():
    a, b = torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 2.0)
    template = latent_template([[a], [b]])
    torch.testing.assert_close(template[0], torch.ones(1, 2, 4, 4))
    test = torch.ones(1, 2, 4, 4)
    test[0, 0, 1, 2] = 5.0                       # |5 - 1| = 4 in one channel of two
    expected = torch.zeros(1, 4, 4)
    expected[0, 1, 2] = 2.0
    torch.testing.assert_close(anomaly_map([test], template), expected)


# ----------------------------------------------------------------------------- detector

def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = 0.5 + 0.1 * torch.sin(torch.arange(size) / 2.0)
    return (base.view(1, 1, 1, -1) + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _tiny(**kw):
    return PyramidFlowConfig(**{**dict(encoder="none", flow_size=32, channels=4, levels=3,
                                       stacks=1, kernel_size=3, batch_size=4, steps=3,
                                       pretrained=False), **kw})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quick_training_is_finite_and_localises_a_defect(seed):
    # 9 images in batches of 4: every third step gets one image, paired with a random one
    det = PyramidFlow(_tiny(seed=seed, steps=5)).fit(_images(9, seed=seed), progress=False)
    assert len(det.history) == 5 and all(math.isfinite(v) for v in det.history)
    test = _images(2, seed=10 + seed)
    test[1, :, 10:16, 20:26] = 0.0               # a dark square
    pred = det.predict(test)
    assert pred.maps.shape == (2, 32, 32) and torch.isfinite(pred.maps).all()
    assert pred.scores[1] > pred.scores[0]
    m = pred.maps[1]
    assert m[10:16, 20:26].mean() > 2 * m.mean()


def test_non_finite_loss_stops_with_the_step():
    images = _images(4)
    images[2] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        PyramidFlow(_tiny(batch_size=4)).fit(images, progress=False)


def test_user_errors_are_clear():
    with pytest.raises(ValueError, match="divisible by 2"):
        PyramidFlow(_tiny(flow_size=30)).fit(_images(4), progress=False)
    with pytest.raises(ValueError, match="encoder must be"):
        PyramidFlow(_tiny(encoder="vgg")).fit(_images(4), progress=False)
    with pytest.raises(ValueError, match="at least 2 training images"):
        PyramidFlow(_tiny()).fit(_images(1), progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        PyramidFlow(_tiny()).predict(_images(1))


def test_paper_profile_builds_and_runs(monkeypatch):
    """Paper settings: ResNet-18 stem (random init here), 64 channels, 4 levels, 4 stacks,
    kernel 7, batch 2. The full model is built at the paper's 1024 px input (256 px flow);
    one training step and one predict run on 64 px images (16 px flow) with the same
    architecture and parameter count: one step at 1024 px is ~3e12 multiply-adds, minutes on a CPU."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    config = PyramidFlowConfig(pretrained=False)
    assert (config.encoder, config.flow_size, config.stacks, config.kernel_size,
            config.batch_size) == ("resnet18", 256, 4, 7, 2)
    full = PyramidFlowNet(64, config.flow_size, 4, config.stacks, config.kernel_size)
    assert len(full.layers) == 16
    det = PyramidFlow(PyramidFlowConfig(pretrained=False, flow_size=16, steps=1,  # tiny: 1 thread
                                        single_thread=True)).fit(
        torch.rand(2, 3, 64, 64), progress=False)
    assert sum(p.numel() for p in det.flow.parameters()) == sum(p.numel() for p in full.parameters())
    assert det.encoder.channels == 64 and len(det.history) == 1 and math.isfinite(det.history[0])
    pred = det.predict(torch.rand(1, 3, 64, 64))
    assert pred.maps.shape == (1, 64, 64) and torch.isfinite(pred.scores).all()
