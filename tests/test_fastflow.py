"""FastFlow: the flow against FrEIA, the loss against autograd and a hand example, the map as the
reference code computes it, paper-profile readiness, robustness."""
import math

import pytest
import torch
from torch import nn

from adlab.flows.fastflow import (FastFlow, FastFlowModel, anomaly_map, fastflow_flow,
                                  fastflow_loss, official_settings)
from adlab.train import NonFiniteLossError, holdout

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")


def _freia_fastflow(c, h, w, steps, hidden_ratio, conv3x3_only, clamp=2.0):
    """The reference code's nf_fast_flow (gathierry/FastFlow fastflow.py:11-36) built on FrEIA 0.2."""
    def subnet(k):
        def make(cin, cout):
            hidden = int(cin * hidden_ratio)
            return nn.Sequential(nn.Conv2d(cin, hidden, k, padding="same"), nn.ReLU(),
                                 nn.Conv2d(hidden, cout, k, padding="same"))
        return make
    nodes = Ff.SequenceINN(c, h, w)
    for i in range(steps):
        k = 1 if i % 2 == 1 and not conv3x3_only else 3
        nodes.append(Fm.AllInOneBlock, subnet_constructor=subnet(k), affine_clamping=clamp,
                     permute_soft=False)
    return nodes


def _copy_into_freia(ours, ref):
    """Same subnet weights, global affine and permutation in FrEIA's blocks as in ours."""
    for mine, theirs in zip(ours.layers, ref.module_list):
        theirs.subnet.load_state_dict(mine.subnet.state_dict())
        with torch.no_grad():
            theirs.global_scale.copy_(mine.global_scale.view_as(theirs.global_scale))
            theirs.global_offset.copy_(mine.global_offset.view_as(theirs.global_offset))
            theirs.w_perm.copy_(mine.w.view(*theirs.w_perm.shape))
            theirs.w_perm_inv.copy_(mine.w.T.contiguous().view(*theirs.w_perm_inv.shape))


@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_flow_equals_reference_code_on_freia(conv3x3_only):
    torch.manual_seed(0)
    c, h, w = 6, 5, 7
    ours = fastflow_flow(c, steps=4, hidden_ratio=1.0, conv3x3_only=conv3x3_only, seed=3)
    kernels = [layer.subnet[0].kernel_size[0] for layer in ours.layers]
    assert kernels == ([3, 3, 3, 3] if conv3x3_only else [3, 1, 3, 1])
    for p in ours.parameters():                       # move off the identity-like init
        nn.init.normal_(p, std=0.3)
    ref = _freia_fastflow(c, h, w, 4, 1.0, conv3x3_only)
    _copy_into_freia(ours, ref)
    x = torch.randn(3, c, h, w)
    z, logdet = ours(x)
    z_ref, logdet_ref = ref(x)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(logdet, logdet_ref, atol=1e-4)


def test_logdet_matches_autograd_jacobian():
    torch.manual_seed(1)
    c, h, w = 4, 3, 3
    flow = fastflow_flow(c, steps=3, hidden_ratio=1.0, conv3x3_only=False, seed=0).double()
    for p in flow.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    _, logdet = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, c, h, w))[0].flatten(),
                                             x.flatten())
    assert torch.allclose(logdet[0], torch.slogdet(jac)[1], atol=1e-8)
    assert flow.inverse(flow(x)[0]).sub(x).abs().max() < 1e-10


def test_loss_is_the_nll_up_to_the_gaussian_constant():
    """fastflow_loss + D/2 log(2 pi) = -log p(x) from torch.distributions, per map, batch mean."""
    torch.manual_seed(2)
    zs = [torch.randn(4, 3, 5, 5), torch.randn(4, 6, 2, 2)]
    logdets = [torch.randn(4), torch.randn(4)]
    nll = 0.0
    for z, ld in zip(zs, logdets):
        normal = torch.distributions.Normal(0.0, 1.0)
        log_pz = normal.log_prob(z).flatten(1).sum(1)
        const = 0.5 * z[0].numel() * math.log(2 * math.pi)
        nll = nll + (-(log_pz + ld) - const).mean()
    assert torch.allclose(fastflow_loss(zs, logdets), nll, atol=1e-5)


def test_anomaly_map_hand_example():
    # one 1x1 cell per map, two channels: mean_c z^2 = (1 + 9) / 2 = 5 and (0 + 4) / 2 = 2
    z1 = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    z2 = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    m = anomaly_map([z1, z2], (4, 4))
    expected = -(math.exp(-2.5) + math.exp(-1.0)) / 2
    assert m.shape == (1, 4, 4)
    assert torch.allclose(m, torch.full((1, 4, 4), expected), atol=1e-6)
    # a cell farther from the origin scores higher (less negative)
    far = anomaly_map([3 * z1], (1, 1))
    assert far.item() > anomaly_map([z1], (1, 1)).item()


def test_official_settings_follow_the_reference_configs():
    assert official_settings("resnet18") == dict(flow_steps=8, hidden_ratio=1.0,
                                                 conv3x3_only=True, block=None)
    assert official_settings("wide_resnet50_2")["conv3x3_only"] is False
    deit = official_settings("deit_base_distilled_patch16_384")
    assert (deit["flow_steps"], deit["hidden_ratio"], deit["block"]) == (20, 0.16, 7)
    assert official_settings("cait_m48_448")["block"] == 40
    d = FastFlow(backbone="deit_tiny_patch16_224", flow_steps=4)
    assert d.config.flow_steps == 4 and d.config.hidden_ratio == 0.16   # explicit value kept


def _images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _tiny(**kw):
    base = dict(backbone="resnet18", flow_steps=2, epochs=2, eval_every=1, batch_size=4,
                pretrained=False)
    base.update(kw)
    return FastFlow(**base)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quick_training_is_finite_for_three_seeds(seed):
    d = _tiny(seed=seed, flow_steps=8, epochs=3).fit(_images(12, seed=seed), progress=False)
    assert len(d.history) == 9 and all(math.isfinite(v) for v in d.history)
    assert d.history[-1] < d.history[0]
    pred = d.predict(_images(2, seed=9))
    assert pred.maps.shape == (2, 32, 32) and torch.isfinite(pred.maps).all()
    assert torch.isfinite(pred.scores).all()


def test_validation_picks_the_kept_weights():
    """The weights kept are those of the lowest validation loss, recomputed here from the split."""
    images = _images(20)
    d = _tiny(epochs=3, val_fraction=0.2).fit(images, progress=False)
    steps = [s for s, _ in d.val_history]
    assert steps == [4, 8, 12]                        # 16 fit images / batch 4: 4 steps an epoch
    best_step, best_loss = min(d.val_history, key=lambda p: p[1])
    assert d.best_step == best_step
    _, val = holdout(images, 0.2, seed=0)
    with torch.no_grad():
        assert fastflow_loss(*d.model(d.features(val))).item() == pytest.approx(best_loss, rel=1e-5)


def test_nan_input_stops_training_with_the_step():
    images = _images(8)
    images[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 0"):
        _tiny(val_fraction=0.0).fit(images, progress=False)


def test_predict_refuses_another_image_size_and_before_fit():
    with pytest.raises(RuntimeError, match="before fit"):
        _tiny().predict(_images(1))
    d = _tiny(epochs=1).fit(_images(8), progress=False)
    with pytest.raises(ValueError, match="size used in fit"):
        d.predict(_images(1, size=64))


def test_transformer_path_tiny():
    d = FastFlow(backbone="deit_tiny_patch16_224", flow_steps=2, epochs=1, batch_size=4,
                 pretrained=False, val_fraction=0.0)
    d.fit(_images(4, size=32), progress=False)
    assert d.model.shapes == [(192, 2, 2)]
    assert isinstance(d.model.norms[0], nn.Identity)  # no extra LayerNorm for transformers
    assert d.predict(_images(1, size=32)).maps.shape == (1, 32, 32)


def test_paper_profile_readiness(monkeypatch):
    """WideResNet-50 at 256 px, 8 full-width steps, random init: one step and one predict on CPU."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    d = FastFlow(pretrained=False, epochs=1, batch_size=1, val_fraction=0.0)
    c = d.config
    assert (c.backbone, c.flow_steps, c.hidden_ratio, c.conv3x3_only) == \
        ("wide_resnet50_2", 8, 1.0, False)
    assert (c.lr, c.weight_decay, c.clamp) == (1e-3, 1e-5, 2.0)
    d.fit(_images(1, size=256), progress=False)
    assert d.model.shapes == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert len(d.history) == 1 and math.isfinite(d.history[0])
    pred = d.predict(_images(1, size=256))
    assert pred.maps.shape == (1, 256, 256) and torch.isfinite(pred.scores).all()


def test_model_rejects_wrong_feature_shapes():
    m = FastFlowModel([(4, 2, 2)], layer_norm=True, steps=1, hidden_ratio=1.0,
                      conv3x3_only=True, clamp=2.0)
    with pytest.raises(ValueError, match="fitted on feature maps"):
        m([torch.randn(1, 4, 3, 3)])


def test_paper_transformer_path_readiness():
    """The reference DeiT config (384 px, block 7 of deit_base_distilled, 20 steps, ratio 0.16)."""
    d = FastFlow(backbone="deit_base_distilled_patch16_384", pretrained=False, epochs=1,
                 batch_size=1, val_fraction=0.0)
    assert (d.config.flow_steps, d.config.hidden_ratio, d.config.block) == (20, 0.16, 7)
    d.fit(_images(1, size=384), progress=False)
    assert d.model.shapes == [(768, 24, 24)]          # cls and distillation tokens dropped
    assert math.isfinite(d.history[0])
    assert d.predict(_images(1, size=384)).maps.shape == (1, 384, 384)
