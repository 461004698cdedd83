"""CFlow-AD (adlab.flows.cflow) against independent references: FrEIA's conditional
decoder, autograd Jacobians, torch.distributions, hand examples; plus the fibre order,
the validation-based map, robustness and a paper-profile build."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from adlab.flows.cflow import (CFlow, CFlowConfig, FibreBatches, cflow_decoder, cflow_loss,
                               fibres_of, likelihood_map, log_likelihood_per_dim,
                               positional_encoding_2d)
from adlab.flows.coupling import mlp_subnet
from adlab.train import NonFiniteLossError


# ----------------------------------------------------------------------------- condition

def test_positional_encoding_hand_values():
    # P = 8: half = 4 channels per axis, frequencies w_0 = 1 and w_1 = 10000^(-2/4) = 0.01.
    pe = positional_encoding_2d(8, 3, 5)
    assert pe.shape == (8, 3, 5)
    y, x = 2, 3
    expected = [math.sin(3), math.cos(3), math.sin(0.03), math.cos(0.03),
                math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]
    assert torch.allclose(pe[:, y, x], torch.tensor(expected), atol=1e-6)
    # column channels do not change along a column, row channels not along a row
    assert torch.equal(pe[:4, 0, :], pe[:4, 2, :])
    assert torch.equal(pe[4:, :, 0], pe[4:, :, 4])


def test_positional_encoding_distinct_positions_and_bad_size():
    pe = positional_encoding_2d(128, 16, 16).flatten(1).T          # [256 positions, 128]
    assert torch.cdist(pe, pe).add(torch.eye(256) * 1e3).min() > 1e-2
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(126, 4, 4)


# ----------------------------------------------------------------------------- decoder

def test_decoder_equals_freia_conditional_sequence():
    """The official decoder is FrEIA's SequenceINN of conditional AllInOneBlocks
    (cflow-ad model.py:46-53); same weights and rotations -> same z and log-det."""
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    c, p, blocks = 10, 8, 3
    ref = Ff.SequenceINN(c)
    for _ in range(blocks):
        ref.append(Fm.AllInOneBlock, cond=0, cond_shape=(p,), subnet_constructor=mlp_subnet(),
                   affine_clamping=1.9, global_affine_type="SOFTPLUS", permute_soft=True)
    ours = cflow_decoder(c, condition_vec=p, coupling_blocks=blocks, clamp=1.9)
    with torch.no_grad():
        for r, o in zip(ref.module_list, ours):
            r.global_scale.add_(0.3 * torch.randn_like(r.global_scale))
            r.global_offset.add_(torch.randn_like(r.global_offset))
            o.subnet.load_state_dict(r.subnet.state_dict())
            o.global_scale.copy_(r.global_scale.flatten())
            o.global_offset.copy_(r.global_offset.flatten())
            o.w.copy_(r.w_perm.reshape(c, c))
            o.w_inv.copy_(r.w_perm_inv.reshape(c, c))
    x, cond = torch.randn(64, c) * 2, torch.randn(64, p)
    z_ref, ld_ref = ref(x, c=[cond])
    z, ld = ours(x, cond)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(ld, ld_ref, atol=1e-4, rtol=1e-5)


def test_decoder_shape_follows_official_subnet():
    d = cflow_decoder(64, condition_vec=128, coupling_blocks=8)
    assert len(d) == 8
    first = d[0].subnet
    # Linear(D, 2D) - ReLU - Linear(2D, 2 floor(C/2)), D = ceil(C/2) + P
    assert (first[0].in_features, first[0].out_features, first[2].out_features) == (160, 320, 64)
    assert d[0].clamp == 1.9
    unconditional = cflow_decoder(64, condition_vec=0, coupling_blocks=2)
    assert unconditional[0].subnet[0].in_features == 32


def test_decoder_logdet_equals_autograd_jacobian():
    torch.manual_seed(1)
    d = cflow_decoder(6, condition_vec=4, coupling_blocks=3).double()
    with torch.no_grad():
        for block in d:
            block.global_scale.add_(torch.randn_like(block.global_scale))
    x, cond = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, ld = d(x, cond)
    for i in range(3):
        jac = jacobian(lambda v: d(v[None], cond[i:i + 1])[0][0], x[i])
        assert torch.allclose(ld[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)
    assert torch.allclose(d.inverse(d(x, cond)[0], cond), x, atol=1e-6)  # rotations stored in float32


# ----------------------------------------------------------------------------- likelihood

def test_log_likelihood_per_dim_and_loss_against_torch_distributions():
    torch.manual_seed(2)
    z, logdet = torch.randn(50, 7) * 3, torch.randn(50) * 5
    normal = torch.distributions.Normal(0.0, 1.0)
    ref = (normal.log_prob(z).sum(1) + logdet) / 7
    got = log_likelihood_per_dim(z, logdet)
    assert torch.allclose(got, ref, atol=1e-5)
    # -log sigmoid(a), computed the long way
    assert torch.allclose(cflow_loss(got), -torch.log(torch.sigmoid(ref)).mean(), atol=1e-5)


def test_likelihood_map_hand_example():
    # layer A: 2 x 2 grid, layer B: constant 1 x 1 grid; output 3 x 3
    a = torch.tensor([[[0.0, -1.0], [-2.0, -3.0]]])
    b = torch.full((1, 1, 1), -0.5)
    m = likelihood_map([a, b], [0.0, 0.5], (3, 3))[0]
    pa = torch.exp(a[0].double())
    extra = math.exp(-1.0)                                   # exp(-0.5 - 0.5), everywhere
    # align_corners=True: the corners are the input cells, the centre their mean
    assert torch.allclose(m[0, 0], pa[0, 0] + extra)
    assert torch.allclose(m[2, 2], pa[1, 1] + extra)
    assert torch.allclose(m[0, 2], pa[0, 1] + extra)
    assert torch.allclose(m[1, 1], pa.mean() + extra)
    # more likely than the validation maximum: capped at probability 1, never inf
    capped = likelihood_map([torch.full((1, 2, 2), 900.0)], [0.0], (3, 3))
    assert torch.equal(capped, torch.ones(1, 3, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- fibre order

def _coordinate_encoder(images):
    """Fake encoder: two maps whose fibres carry (image id, row, column) of their position."""
    out = []
    for h in (4, 2):
        b = len(images)
        i = images[:, 0, 0, 0].view(b, 1, 1).expand(b, h, h)
        r = torch.arange(h).view(1, h, 1).expand(b, h, h).float()
        col = torch.arange(h).view(1, 1, h).expand(b, h, h).float()
        out.append(torch.stack([i, r, col], 1))
    return out


def test_fibre_batches_use_every_fibre_once_with_its_own_condition():
    images = torch.arange(6).float().view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    fb = FibreBatches(_coordinate_encoder, images, batch_size=3, n=8, condition_vec=8, seed=0)
    pe = positional_encoding_2d(8, 4, 4)
    seen, layers = [], []
    for _ in range(fb.steps_per_batch([16, 4], 3)):       # one image batch: 6 + 1 steps
        layer, e, cond = next(fb)
        layers.append(layer)
        if layer == 0:
            assert e.shape == (8, 3)
            r, col = e[:, 1].long(), e[:, 2].long()
            assert torch.allclose(cond, pe[:, r, col].T)
            seen += [tuple(v) for v in e.tolist()]
    assert layers == [0] * 6 + [1]                          # layer after layer, as official
    assert len(set(seen)) == 48 == len(seen)                # 3 images x 16 cells, each once
    assert len({s[0] for s in seen}) == 3


# ----------------------------------------------------------------------------- detector

def _textures(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 6 * math.pi, size)
    stripes = 0.5 + 0.25 * torch.sin(base[None, :] + base[:, None])
    return (stripes + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _tiny(**kw):
    base = dict(backbone="resnet18", layers=("layer1", "layer2"), coupling_blocks=2,
                fibres=64, batch_size=4, epochs=1.0, lr=1e-3, pretrained=False, seed=0)
    base.update(kw)
    return CFlow(**base)


def test_fit_predict_shapes_validation_max_and_no_batch_dependence():
    train = _textures(20)
    det = _tiny().fit(train, progress=False)
    assert len(det.history) > 0 and all(math.isfinite(v) for v in det.history)
    test = _textures(4, seed=1)
    test[0, :, 8:20, 8:20] = 1.0                               # a white square
    pred = det.predict(test)
    assert pred.scores.shape == (4,) and pred.maps.shape == (4, 32, 32)
    assert torch.isfinite(pred.maps).all()
    assert pred.scores[0] > pred.scores[1:].max()
    # each image's map is its own: no test-set statistic (the official max is over the test set)
    single = det.predict(test[2:3])
    assert torch.allclose(single.maps[0], pred.maps[2], atol=1e-5)
    # the normalising maxima come from validation images of the training set: there the
    # anomaly map is >= 0 and reaches 0
    from adlab.train import holdout
    _, val = holdout(train, det.config.val_fraction, det.config.seed)
    val_maps = det.predict(val).maps
    assert val_maps.min() >= -1e-6 and val_maps.min() < 1e-3


def test_predict_errors_are_clear():
    with pytest.raises(RuntimeError, match="fit"):
        _tiny().predict(_textures(1))
    det = _tiny(epochs=0.1).fit(_textures(10), progress=False)
    with pytest.raises(ValueError, match="Resize"):
        det.predict(_textures(1, size=64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quick_training_is_finite_for_seeds(seed):
    det = _tiny(seed=seed, layers=("layer1", "layer2", "layer3"),
                coupling_blocks=8, epochs=1.0).fit(_textures(16, seed=seed), progress=False)
    assert all(math.isfinite(v) for v in det.history)
    assert torch.isfinite(det.predict(_textures(2, seed=9)).maps).all()


def test_nan_input_stops_with_a_message_naming_the_step():
    images = _textures(10)
    images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 0.*learning rate"):
        _tiny().fit(images, progress=False)


def test_unconditional_decoder_runs():
    det = _tiny(condition_vec=0, epochs=0.5).fit(_textures(10), progress=False)
    assert det.decoders[0][0].cond_channels == 0
    assert torch.isfinite(det.predict(_textures(2)).maps).all()


def test_paper_profile_builds_and_runs_one_step(monkeypatch):
    """The paper settings (WRN-50 layers 2-4, 8 blocks, P = 128, N = 256, 256 px) on CPU:
    random init, one optimiser step, one predict."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    config = CFlowConfig(pretrained=False, batch_size=2, epochs=1e-6)
    assert (config.backbone, config.layers) == ("wide_resnet50_2", ("layer2", "layer3", "layer4"))
    assert (config.coupling_blocks, config.condition_vec, config.fibres, config.clamp,
            config.lr, config.rotation_deg) == (8, 128, 256, 1.9, 2e-4, 5.0)
    torch.manual_seed(0)
    det = CFlow(config).fit(torch.rand(2, 3, 256, 256), progress=False)     # 1 fit + 1 val
    assert len(det.history) == 1 and math.isfinite(det.history[0])
    assert [d[0].channels for d in det.decoders] == [512, 1024, 2048]
    pred = det.predict(torch.rand(1, 3, 256, 256))
    assert pred.maps.shape == (1, 256, 256) and torch.isfinite(pred.maps).all()


def test_fibres_of_order():
    f = torch.arange(2 * 3 * 2 * 2).float().view(2, 3, 2, 2)
    e = fibres_of(f)
    assert e.shape == (8, 3)
    assert torch.equal(e[5], f[1, :, 0, 1])                 # image 1, row 0, column 1
