"""CS-Flow (adlab.flows.csflow): log-dets against autograd, the coupling against FrEIA's
GLOWCouplingBlock, the cross-scale wiring on a hand example, the loss and score against the
likelihood module, the backbone cut against timm, paper-profile readiness and robustness."""
import math

import pytest
import torch
import torch.nn.functional as F

from adlab.flows.csflow import (CrossScaleCoupling, CrossScaleFlow, CrossScaleSubnet, CSFlow,
                                CSFlowConfig, anomaly_map, anomaly_score, feature_trunk,
                                image_pyramid, nll_loss)
from adlab.flows.likelihood import nll_nats, standard_normal_log_prob
from adlab.train import NonFiniteLossError


def scales(batch=2, channels=4, size=4, n=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // 2 ** i, size // 2 ** i, generator=g, dtype=dtype)
            for i in range(n)]


def randomise(module, seed=0, scale=0.3):
    """Non-trivial weights everywhere, gamma included (it starts at 0: the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def jacobian_logdet(fn, xs):
    """log|det J| of ``fn`` (list of maps -> list of maps) per sample, by autograd (float64)."""
    shapes = [x.shape[1:] for x in xs]
    sizes = [math.prod(s) for s in shapes]

    def flat_fn(v):
        parts = [p.view(1, *s) for p, s in zip(v.split(sizes), shapes)]
        return torch.cat([z.flatten() for z in fn(parts)])

    out = []
    for b in range(len(xs[0])):
        v = torch.cat([x[b].flatten() for x in xs])
        jac = torch.autograd.functional.jacobian(flat_fn, v, vectorize=True)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


# ----------------------------------------------------------------------------- the flow

@pytest.mark.parametrize("cross_scale", [True, False])
def test_coupling_logdet_matches_autograd(cross_scale):
    layer = randomise(CrossScaleCoupling(4, hidden=6, kernel_size=3, cross_scale=cross_scale)
                      .double())
    xs = scales()
    _, logdet = layer(xs)
    reference = jacobian_logdet(lambda parts: layer(parts)[0], xs)
    assert reference.abs().max() > 0.1          # a non-trivial Jacobian
    torch.testing.assert_close(logdet, reference, rtol=1e-9, atol=1e-9)


def test_flow_logdet_and_inverse():
    flow = randomise(CrossScaleFlow(4, n_blocks=2, hidden=5, kernel_sizes=(3, 5)).double(), 1)
    xs = scales(channels=4, size=4, seed=1)
    zs, logdet = flow(xs)
    torch.testing.assert_close(logdet, jacobian_logdet(lambda p: flow(p)[0], xs),
                               rtol=1e-9, atol=1e-9)
    for x, x_back in zip(xs, flow.inverse(zs)):
        torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)


def test_fresh_flow_is_the_identity_up_to_permutations():
    """gamma starts at 0 (freia_funcs.py:40-42): no scaling, log-det 0, norms unchanged."""
    flow = CrossScaleFlow(6, n_blocks=2, hidden=5, kernel_sizes=(3, 3)).double()
    xs = scales(channels=6, size=8)
    zs, logdet = flow(xs)
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    for x, z in zip(xs, zs):
        torch.testing.assert_close(z.pow(2).sum(1), x.pow(2).sum(1))
        assert not torch.equal(z, x)              # the channels were permuted


def test_single_scale_coupling_equals_freia_glow_block():
    """One scale: our coupling is FrEIA 0.2's GLOWCouplingBlock with the atan clamp of the
    CS-Flow code (clamp * 0.636 * atan(s / clamp)) and the same subnetworks."""
    from FrEIA.modules import GLOWCouplingBlock

    ours = randomise(CrossScaleCoupling(6, hidden=8, n_scales=1, clamp=3.0).double(), 2)
    subnets = iter([ours.subnet_2, ours.subnet_1])   # FrEIA builds subnet1 (x1 -> x2) first

    class OneScale(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net([x])[0]

    freia = GLOWCouplingBlock([(6, 8, 8)], subnet_constructor=lambda i, o: OneScale(next(subnets)),
                              clamp=3.0, clamp_activation=lambda u: 0.636 * torch.atan(u / 3.0))
    x = scales(channels=6, size=8, n=1, seed=3)
    z, logdet = ours(x)
    (z_ref,), logdet_ref = freia([x[0]])
    torch.testing.assert_close(z[0], z_ref)
    torch.testing.assert_close(logdet, logdet_ref)


def test_cross_scale_subnet_wiring_hand_example():
    """1 channel, 1x1 kernels: scale 0 gets its own term plus the upsampled coarse hidden map,
    scale 1 its own plus the finer hidden map subsampled by the stride-2 conv (top-left cell)."""
    net = CrossScaleSubnet(1, 1, hidden=1, kernel_size=1, n_scales=2, leaky_slope=0.1)
    with torch.no_grad():
        for conv, w in [(net.inner[0], 1.0), (net.inner[1], 1.0), (net.outer[0], 2.0),
                        (net.outer[1], 3.0), (net.up[0], 5.0), (net.down[0], 7.0)]:
            conv.weight.fill_(w)
            conv.bias.zero_()
        net.gamma.copy_(torch.tensor([1.0, 10.0]))
    x0 = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]])
    x1 = torch.tensor([[[[-5.0]]]])
    out0, out1 = net([x0, x1])
    h0 = torch.tensor([[1.0, -0.2], [3.0, 4.0]])     # LeakyReLU(0.1)
    h1 = -0.5
    torch.testing.assert_close(out0[0, 0], 2.0 * h0 + 5.0 * h1)
    torch.testing.assert_close(out1[0, 0], torch.tensor([[10.0 * (3.0 * h1 + 7.0 * 1.0)]]))
    independent = CrossScaleSubnet(1, 1, hidden=1, kernel_size=1, n_scales=2, cross_scale=False)
    assert len(independent.up) == len(independent.down) == 0


def test_scales_interact_only_with_cross_connections():
    xs = scales(channels=4, size=8, seed=4)
    changed = [xs[0], xs[1], xs[2] + 1.0]            # only the coarsest scale differs
    for cross, expect_change in [(True, True), (False, False)]:
        layer = randomise(CrossScaleCoupling(4, hidden=6, cross_scale=cross).double(), 5)
        diff = (layer(xs)[0][0] - layer(changed)[0][0]).abs().max()
        assert (diff > 1e-6) == expect_change


def test_wrong_scale_sizes_are_one_clear_error():
    flow = CrossScaleFlow(4, n_blocks=1, hidden=4, kernel_sizes=(3,))
    bad = [torch.zeros(1, 4, 13, 13), torch.zeros(1, 4, 7, 7), torch.zeros(1, 4, 4, 4)]
    with pytest.raises(ValueError, match="exactly half the size"):
        flow(bad)
    with pytest.raises(ValueError, match="list of 3 feature maps"):
        flow(torch.zeros(1, 4, 8, 8))


# ----------------------------------------------------------------------------- loss, scores

def test_loss_is_the_nll_per_dimension_without_the_constant():
    zs = scales(seed=6)
    logdet = torch.tensor([0.7, -1.3], dtype=torch.float64)
    flat = torch.cat([z.flatten(1) for z in zs], dim=1)
    reference = nll_nats(flat, logdet, per_dim=True) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll_loss(zs, logdet), reference)


def test_score_and_map():
    zs = scales(seed=7)
    flat = torch.cat([z.flatten(1) for z in zs], dim=1)
    reference = -standard_normal_log_prob(flat) / flat.shape[1] - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(anomaly_score(zs), reference)
    zs[0].zero_()
    zs[0][1, :, 3, 0] = 5.0                          # one hot cell: bottom-left of sample 1
    maps = anomaly_map(zs, (32, 32))
    assert maps.shape == (2, 32, 32) and maps[0].abs().max() == 0
    row, col = divmod(int(maps[1].argmax()), 32)
    assert row >= 24 and col < 8


def test_image_pyramid_is_nearest_subsampling():
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8)
    p = image_pyramid(x, 3)
    assert [t.shape[-1] for t in p] == [8, 4, 2]
    torch.testing.assert_close(p[1], x[..., ::2, ::2])
    torch.testing.assert_close(p[2], x[..., ::4, ::4])


# ----------------------------------------------------------------------------- backbone

def test_paper_trunk_is_efficientnet_b5_block_35():
    """Official block 35 (0-based, of 39) is the last of timm's stage blocks.5: 304 ch, stride 32"""
    trunk = feature_trunk("tf_efficientnet_b5", "blocks.5", pretrained=False)
    blocks = [m for m in trunk.modules() if type(m).__name__ in
              ("DepthwiseSeparableConv", "InvertedResidual")]
    assert len(blocks) == 36
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 64, 96)).shape == (1, 304, 2, 3)


def test_quick_trunk_matches_the_feature_extractor():
    from adlab.data.mvtec import normalize
    from adlab.features import FeatureExtractor

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trunk = feature_trunk("resnet18", "layer2", pretrained=False, seed=3)
    reference = FeatureExtractor("resnet18", ("layer2",), pretrained=False, seed=3)(x)[0]
    with torch.no_grad():
        torch.testing.assert_close(trunk(normalize(x)), reference)
    with pytest.raises(ValueError, match="no part 'layer9'"):
        feature_trunk("resnet18", "layer9", pretrained=False)


# ----------------------------------------------------------------------------- detector

def tiny_images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_quick_training_is_finite_for_three_seeds():
    images = tiny_images(8)
    for seed in range(3):
        det = CSFlow(CSFlowConfig(hidden=16, epochs=3, batch_size=4, seed=seed))
        det.fit(images, progress=False)
        assert len(det.history) == 6 and all(math.isfinite(v) for v in det.history)
        assert det.flow.layers[1].subnet_1.gamma.abs().sum() > 0    # training moved gamma from 0
        pred = det.predict(images[:3])
        assert pred.maps.shape == (3, 64, 64) and torch.isfinite(pred.scores).all()


def test_non_finite_loss_stops_with_the_step():
    images = tiny_images(4)
    images[1, 0, 5, 5] = float("nan")
    det = CSFlow(CSFlowConfig(hidden=8, epochs=1, batch_size=4))
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        det.fit(images, progress=False)


def test_predict_before_fit_and_bad_image_size():
    with pytest.raises(RuntimeError, match="fit"):
        CSFlow(hidden=8).predict(tiny_images(1))
    with pytest.raises(ValueError, match="exactly half the size"):
        CSFlow(hidden=8, epochs=1).fit(tiny_images(2, size=72), progress=False)


def test_paper_profile_is_ready(monkeypatch):
    """Paper settings (EfficientNet-B5 block 35, 768 px, hidden 1024, kernels 3,3,3,5), random
    init: one training step and one predict on CPU."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    c = CSFlowConfig(pretrained=False, epochs=1, batch_size=1)
    assert (c.backbone, c.layer, c.input_size, c.hidden, c.block_kernels()) == \
        ("tf_efficientnet_b5.aa_in1k", "blocks.5", 768, 1024, (3, 3, 3, 5))
    det = CSFlow(c).fit(tiny_images(1, size=96), progress=False)
    assert len(det.history) == 1 and math.isfinite(det.history[0])
    assert det.grid == (24, 24) and det.flow.layers[1].subnet_1.inner[0].out_channels == 1024
    pred = det.predict(tiny_images(1, size=96, seed=1))
    assert pred.maps.shape == (1, 96, 96) and torch.isfinite(pred.scores).all()
