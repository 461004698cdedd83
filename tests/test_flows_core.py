"""Proofs for the from-scratch flow layers (adlab.flows core, coupling, permute, actnorm, likelihood).

Independent references: torch.autograd.functional.jacobian (log|det J|), torch.linalg
(slogdet), torch.distributions (Gaussian log-density), normflows (the same models
built from its own layers), and hand-computed values.
"""
from __future__ import annotations

import copy
import math

import normflows as nf
import pytest
import torch
from sklearn.datasets import make_moons
from torch import nn
from torch.autograd.functional import jacobian

from adlab.flows.actnorm import ActNorm
from adlab.flows.core import SequentialFlow
from adlab.flows.coupling import (AffineCoupling, GlowCoupling, conv_subnet, mlp_subnet,
                                  soft_clamp)
from adlab.flows.likelihood import (bits_per_dim, log_likelihood, nll_nats,
                                    standard_normal_log_prob)
from adlab.flows.permute import InvertibleConv1x1, RandomPermutation

C, H, W, CC = 4, 3, 3, 3  # channels, map size, condition channels (small: Jacobians are 36 x 36)


# ----------------------------------------------------------------------------- helpers

def perturb_(module: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so no log-det is trivially 0 (rotations, zero init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def subnet_for(kind: str):
    return mlp_subnet(hidden=16) if kind == "vector" else conv_subnet(hidden_ratio=2.0)


def make_layer(name: str, kind: str, cond: bool) -> nn.Module:
    """One layer (or stack) of each type; conditional where the layer uses a condition."""
    cc = CC if cond else 0
    sub = subnet_for(kind)
    layers = {
        "coupling": lambda: AffineCoupling(C, sub, cond_channels=cc),
        "coupling_first_tanh": lambda: AffineCoupling(C, sub, cond_channels=cc, clamp=1.5,
                                                      clamp_activation="tanh",
                                                      transform_first=True),
        "coupling_allinone": lambda: AffineCoupling(C, sub, cond_channels=cc, clamp=1.9,
                                                    clamp_activation="allinone"),
        "coupling_odd": lambda: AffineCoupling(C + 1, sub, cond_channels=cc, clamp=None),
        "glow_coupling": lambda: GlowCoupling(C, sub, cond_channels=cc, clamp=3.0),
        "permutation": lambda: RandomPermutation(C, seed=3),
        "invconv": lambda: InvertibleConv1x1(C, seed=1),
        "actnorm": lambda: ActNorm(C),
        "stack": lambda: SequentialFlow(
            ActNorm(C), AffineCoupling(C, sub, cond_channels=cc), InvertibleConv1x1(C, seed=2),
            GlowCoupling(C, sub, cond_channels=cc, clamp_activation="allinone"),
            RandomPermutation(C, seed=4), AffineCoupling(C, sub, cond_channels=cc,
                                                         transform_first=True)),
    }
    return layers[name]()


def inputs(name: str, kind: str, cond: bool, dtype=torch.float64, batch: int = 3):
    g = torch.Generator().manual_seed(7)
    ch = C + 1 if name == "coupling_odd" else C
    shape = (batch, ch) if kind == "vector" else (batch, ch, H, W)
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).to(dtype)
    c = None
    if cond:
        c_shape = (batch, CC) if kind == "vector" else (batch, CC, H, W)
        c = torch.randn(c_shape, generator=g).to(dtype)
    return x, c


def ready_layer(name: str, kind: str, cond: bool, dtype=torch.float64):
    """Build, perturb, cast, and run ActNorm's data-dependent init on the test batch."""
    torch.manual_seed(0)
    layer = perturb_(make_layer(name, kind, cond)).to(dtype)
    x, c = inputs(name, kind, cond, dtype)
    with torch.no_grad():
        layer(x, c)  # ActNorm initialises here (its first batch); a no-op for the others
    return layer, x, c


def autograd_logdet(layer: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """log|det| of the full Jacobian of one sample's flattened output w.r.t. its flattened input."""
    out = []
    for i in range(x.shape[0]):
        xi, ci = x[i:i + 1], (None if c is None else c[i:i + 1])
        f = lambda v: layer(v.view_as(xi), ci)[0].reshape(-1)  # noqa: E731
        J = jacobian(f, xi.reshape(-1), vectorize=True)
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign != 0, "the Jacobian is singular: the layer is not invertible here"
        out.append(logabsdet)
    return torch.stack(out)


LAYERS = ["coupling", "coupling_first_tanh", "coupling_allinone", "coupling_odd",
          "glow_coupling", "permutation", "invconv", "actnorm", "stack"]
CONDITIONAL = {"coupling", "coupling_first_tanh", "coupling_allinone", "coupling_odd",
               "glow_coupling", "stack"}
CASES = [(n, k, c) for n in LAYERS for k in ("vector", "map")
         for c in ((False, True) if n in CONDITIONAL else (False,))]
IDS = [f"{n}-{k}-{'cond' if c else 'nocond'}" for n, k, c in CASES]


# ----------------------------------------------------------------------------- identities

@pytest.mark.parametrize("name,kind,cond", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_inverse_of_forward_is_identity(name, kind, cond, dtype, tol):
    layer, x, c = ready_layer(name, kind, cond, dtype)
    with torch.no_grad():
        z, logdet = layer(x, c)
        x_back = layer.inverse(z, c)
        z_again, _ = layer(x_back, c)
    assert z.shape == x.shape and logdet.shape == (x.shape[0],)
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(z_again, z, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("name,kind,cond", CASES, ids=IDS)
def test_logdet_equals_autograd_jacobian(name, kind, cond):
    layer, x, c = ready_layer(name, kind, cond)
    with torch.no_grad():
        _, logdet = layer(x, c)
    expected = autograd_logdet(layer, x, c)
    if name != "permutation":  # a permutation's log-det is exactly 0; the others must not be
        assert expected.abs().max() > 1e-3, "test would be vacuous: log|det J| is ~0"
    torch.testing.assert_close(logdet, expected, atol=1e-8, rtol=1e-8)


def test_coupling_jacobian_is_triangular_with_exp_s_diagonal():
    """RealNVP Eq. (6): dz/dx = [[I, 0], [*, diag(exp(s(x_a)))]] for one vector sample."""
    layer, x, _ = ready_layer("coupling", "vector", False)
    xi = x[:1]
    J = jacobian(lambda v: layer(v.view_as(xi))[0].reshape(-1), xi.reshape(-1))
    d = C - C // 2  # passive part
    torch.testing.assert_close(J[:d, :d], torch.eye(d, dtype=J.dtype))
    assert torch.all(J[:d, d:] == 0)
    s, _ = layer.scale_and_shift(xi[:, :d])
    torch.testing.assert_close(J[d:, d:], torch.diag(torch.exp(s[0])))
    assert J[d:, :d].abs().max() > 1e-3  # the lower-left block is not trivially 0


def test_vector_condition_broadcasts_over_map_positions():
    """A condition [B, Cc] on a map equals the same condition repeated at every position."""
    layer, x, c_map = ready_layer("coupling", "map", True)
    c_vec = c_map[:, :, 0, 0]
    c_rep = c_vec[:, :, None, None].expand(-1, -1, H, W)
    with torch.no_grad():
        z1, ld1 = layer(x, c_vec)
        z2, ld2 = layer(x, c_rep)
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(ld1, ld2)
    torch.testing.assert_close(layer.inverse(z1, c_vec), x)


def _freia_subnet(c_in, c_out):
    return nn.Linear(c_in, c_out)


def test_soft_clamp_allinone_equals_freia_allinone_block():
    # FrEIA's AllInOneBlock._affine on fixed coefficients: x = 1 and zero shift leave
    # log(output) = its clamped log-scale, and its log-det the sum of it.
    from FrEIA.modules import AllInOneBlock

    a = torch.tensor([[-30.0, -4.0, 0.0, 2.5, 40.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    block = AllInOneBlock([(5,)], subnet_constructor=_freia_subnet, affine_clamping=1.9)
    y, logdet = block._affine(torch.ones(1, 5, dtype=torch.float64), a.clone())
    ours = soft_clamp(a[:, :5], 1.9, "allinone")
    torch.testing.assert_close(ours, torch.log(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.sum(1), logdet, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours_name,freia_name", [("atan", "ATAN"), ("tanh", "TANH")])
def test_soft_clamp_atan_tanh_equal_freia_after_the_cs_flow_rescaling(ours_name, freia_name):
    # FrEIA's GLOWCouplingBlock clamps as clamp * f(s); CS-Flow / DifferNet's copy divides by
    # clamp first (clamp * 0.636 * atan(s / clamp), cs-flow freia_funcs.py), as soft_clamp does.
    # So soft_clamp(clamp * u) must equal FrEIA's clamp of u, with FrEIA's own f.
    from FrEIA.modules import GLOWCouplingBlock

    u = torch.tensor([-30.0, -2.0, -0.4, 0.0, 0.7, 3.0, 50.0], dtype=torch.float64)
    for clamp in (1.5, 3.0):
        block = GLOWCouplingBlock([(4,)], subnet_constructor=_freia_subnet, clamp=clamp,
                                  clamp_activation=freia_name)
        torch.testing.assert_close(soft_clamp(clamp * u, clamp, ours_name),
                                   block.clamp * block.f_clamp(u), rtol=1e-12, atol=1e-12)
        out = soft_clamp(clamp * u, clamp, ours_name)
        assert out.abs().max() <= clamp and torch.all(out.diff() > 0)


def test_soft_clamp_off_and_errors():
    s = torch.tensor([-8.0, 0.0, 8.0])
    assert torch.equal(soft_clamp(s, None), s) and torch.equal(soft_clamp(s, 2.0, "none"), s)
    with pytest.raises(ValueError, match="clamp activation"):
        soft_clamp(s, 2.0, "relu")
    with pytest.raises(ValueError, match="positive"):
        soft_clamp(s, -1.0, "atan")


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance():
    """Glow Sec. 3.1: after init on a batch, that batch's output has per-channel mean 0, variance 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, C, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(1, C, 1, 1) \
        + torch.tensor([5.0, -2.0, 0.0, 1.0]).view(1, C, 1, 1)
    layer = ActNorm(C)
    z, logdet = layer(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(C), atol=1e-4, rtol=0)
    # log-det = h * w * sum log s = -h*w * sum log std(x)
    expected = -25 * torch.log(x.std(dim=(0, 2, 3), unbiased=False)).sum()
    torch.testing.assert_close(logdet, expected.expand(16), atol=1e-3, rtol=1e-5)
    # a second batch does not re-initialise; a loaded state_dict stays initialised
    before = layer.log_s.detach().clone()
    layer(torch.randn(8, C, 5, 5))
    torch.testing.assert_close(layer.log_s.detach(), before)
    fresh = ActNorm(C)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x)[0], layer(x)[0])


def test_invconv_logdet_is_slogdet_of_W_times_positions():
    layer = perturb_(InvertibleConv1x1(C, seed=0)).double()
    weight = layer.weight()
    torch.testing.assert_close(layer.weight_inverse() @ weight, torch.eye(C, dtype=weight.dtype))
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    _, logdet = layer(x)
    expected = H * W * torch.linalg.slogdet(weight)[1]
    assert expected.abs() > 1e-2
    torch.testing.assert_close(logdet, expected.expand(2))
    # and the layer is the 1x1 convolution with that weight
    torch.testing.assert_close(layer(x)[0], nn.functional.conv2d(x, weight[:, :, None, None]))


def test_invconv_starts_as_rotation():
    weight = InvertibleConv1x1(C, seed=5).weight().double()
    torch.testing.assert_close(weight @ weight.T, torch.eye(C, dtype=weight.dtype), atol=1e-6,
                               rtol=0)


def test_likelihood_units_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    logdet = torch.randn(5, generator=g, dtype=torch.float64)
    D = 18
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(standard_normal_log_prob(z), ref)
    torch.testing.assert_close(log_likelihood(z, logdet), ref + logdet)
    nll = -(ref + logdet).mean()
    torch.testing.assert_close(nll_nats(z, logdet), nll)
    torch.testing.assert_close(nll_nats(z, logdet, per_dim=True), nll / D)
    torch.testing.assert_close(bits_per_dim(z, logdet), nll / (D * math.log(2)))
    torch.testing.assert_close(bits_per_dim(z, logdet, n_bins=256), nll / (D * math.log(2)) + 8.0)


def test_flow_density_integrates_to_one_in_2d():
    """p(x) = N(f(x)) |det J| is a density: its integral over a wide grid is ~1."""
    torch.manual_seed(0)
    flow = perturb_(SequentialFlow(AffineCoupling(2, mlp_subnet(hidden=16)),
                                   RandomPermutation(2, perm=[1, 0]),
                                   AffineCoupling(2, mlp_subnet(hidden=16)),
                                   InvertibleConv1x1(2, seed=0)), std=0.1).double()
    t = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        p = log_likelihood(*flow(grid)).exp()
    integral = p.sum() * (t[1] - t[0]) ** 2
    assert abs(integral.item() - 1.0) < 1e-3


def test_sequential_flow_slicing_and_errors():
    flow = make_layer("stack", "vector", False)
    assert len(flow) == 6 and isinstance(flow[1], AffineCoupling) and len(flow[:3]) == 3
    assert flow[:3][2] is flow[2]  # slices share the modules
    with pytest.raises(ValueError, match="channels"):
        flow(torch.randn(4, C + 1))
    with pytest.raises(ValueError, match="batch"):
        flow(torch.randn(C))
    with pytest.raises(ValueError, match="cond"):
        AffineCoupling(C, mlp_subnet(), cond_channels=2)(torch.randn(4, C))
    with pytest.raises(ValueError, match="mlp_subnet"):
        AffineCoupling(C, mlp_subnet())(torch.randn(2, C, 3, 3))
    with pytest.raises(ValueError, match="at least 2"):
        ActNorm(C)(torch.randn(1, C))
    with pytest.raises(TypeError, match="inverse"):
        SequentialFlow(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- normflows

def _ref_clamp(s, clamp, act):
    """The soft clamps written out again (CS-Flow / FrEIA forms), independent of soft_clamp."""
    if clamp is None or act == "none":
        return s
    return {"atan": lambda: clamp * 0.636 * torch.atan(s / clamp),
            "tanh": lambda: clamp * torch.tanh(s / clamp),
            "allinone": lambda: clamp * torch.tanh(0.1 * s)}[act]()


class _InterleavedParamMap(nn.Module):
    """normflows' AffineCoupling reads shift = param[:, 0::2], scale = param[:, 1::2]."""

    def __init__(self, layer: AffineCoupling):
        super().__init__()
        self.subnet, self.n = copy.deepcopy(layer.subnet), layer.n_active
        self.clamp, self.act = layer.clamp, layer.clamp_activation

    def forward(self, passive):
        out = self.subnet(passive)
        s, t = _ref_clamp(out[:, :self.n], self.clamp, self.act), out[:, self.n:]
        return torch.stack([t, s], dim=2).flatten(1, 2)


class _MaskedNet(nn.Module):
    """s or t of normflows' MaskedAffineFlow: a function of b * z, zero where b = 1."""

    def __init__(self, subnet, layer: AffineCoupling, part: str):
        super().__init__()
        self.subnet, self.part, self.n = subnet, part, layer.n_active
        self.clamp, self.act = layer.clamp, layer.clamp_activation
        D = layer.channels
        first = list(range(D - D // 2))
        second = list(range(D - D // 2, D))
        self.passive, self.active = (second, first) if layer.transform_first else (first, second)

    def forward(self, z_masked):
        out = self.subnet(z_masked[:, self.passive])
        val = _ref_clamp(out[:, :self.n], self.clamp, self.act) if self.part == "s" \
            else out[:, self.n:]
        full = torch.zeros_like(z_masked)
        full[:, self.active] = val
        return full


def nf_equivalent(layer: nn.Module, ndim: int, masked: bool) -> list:
    """normflows flows whose .inverse (their data -> latent direction) equals layer.forward.

    normflows' NormalizingFlow.log_prob runs flows[K-1].inverse first; its flows'
    .forward is the generative direction. nf.flows.Reverse swaps the two.
    """
    dtype = next(layer.parameters()).dtype if any(True for _ in layer.parameters()) else None
    if isinstance(layer, SequentialFlow):
        return [f for sub in layer for f in nf_equivalent(sub, ndim, masked)]
    if isinstance(layer, GlowCoupling):
        return nf_equivalent(layer.first, ndim, masked) + nf_equivalent(layer.second, ndim, masked)
    if isinstance(layer, AffineCoupling) and masked:
        D = layer.channels
        b = torch.zeros(D, dtype=dtype)
        passive = _MaskedNet(None, layer, "s").passive
        b[passive] = 1.0
        subnet = copy.deepcopy(layer.subnet)
        flow = nf.flows.MaskedAffineFlow(b, t=_MaskedNet(subnet, layer, "t"),
                                         s=_MaskedNet(subnet, layer, "s"))
        return [nf.flows.Reverse(flow)]
    if isinstance(layer, AffineCoupling):
        mode = "channel_inv" if layer.transform_first else "channel"
        return [nf.flows.Reverse(nf.flows.AffineCouplingBlock(_InterleavedParamMap(layer),
                                                              split_mode=mode))]
    if isinstance(layer, ActNorm):
        m = nf.flows.ActNorm((layer.channels,) + (1,) * (ndim - 2)).to(dtype)
        with torch.no_grad():
            m.s.copy_(layer.log_s.view_as(m.s))
            m.t.copy_(layer.b.view_as(m.t))
        m.data_dep_init_done = torch.tensor(1.0)
        return [nf.flows.Reverse(m)]
    if isinstance(layer, RandomPermutation):
        m = nf.flows.Permute(layer.channels, mode="shuffle")
        m.perm, m.inv_perm = layer.perm.clone(), layer.perm_inv.clone()
        return [nf.flows.Reverse(m)]
    if isinstance(layer, InvertibleConv1x1):  # its .inverse is z = P L U x already
        assert ndim == 4, "normflows' Invertible1x1Conv takes NCHW maps"
        m = nf.flows.Invertible1x1Conv(layer.channels, use_lu=True).to(dtype)
        with torch.no_grad():
            m.P, m.sign_S = layer.P.clone(), layer.sign_s.clone()
            m.L.copy_(layer.L)
            m.U.copy_(layer.U)
            m.log_S.copy_(layer.log_s)
        return [m]
    raise TypeError(type(layer))


def nf_model(flow: nn.Module, shape: tuple, masked: bool = False) -> nf.NormalizingFlow:
    flows = nf_equivalent(flow, 1 + len(shape), masked)
    q0 = nf.distributions.DiagGaussian(shape, trainable=False)
    return nf.NormalizingFlow(q0, list(reversed(flows)))


def test_normflows_same_loglik_realnvp_vectors():
    """RealNVP-style vector flow vs normflows MaskedAffineFlow / Permute / ActNorm, same parameters."""
    torch.manual_seed(0)
    D = 5
    flow = SequentialFlow(
        ActNorm(D), AffineCoupling(D, mlp_subnet(hidden=16), clamp=2.0),
        RandomPermutation(D, seed=0),
        AffineCoupling(D, mlp_subnet(hidden=16), clamp_activation="tanh", transform_first=True),
        RandomPermutation(D, seed=1),
        GlowCoupling(D, mlp_subnet(hidden=16), clamp=1.9, clamp_activation="allinone"))
    flow = perturb_(flow, 0.2).double()
    x = 2 * torch.randn(64, D, dtype=torch.float64) + 1
    with torch.no_grad():
        flow(x)  # ActNorm init
        ours = log_likelihood(*flow(x))
        ref = nf_model(flow, (D,), masked=True).double().log_prob(x)
    assert ours.std() > 0.1  # not a constant
    torch.testing.assert_close(ours, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.filterwarnings("ignore:torch.lu is deprecated")  # inside normflows' Invertible1x1Conv
def test_normflows_same_loglik_glow_maps():
    """Glow-style map flow vs normflows ActNorm / Invertible1x1Conv(LU) / AffineCouplingBlock."""
    torch.manual_seed(0)
    flow = SequentialFlow(
        ActNorm(C), InvertibleConv1x1(C, seed=0), AffineCoupling(C, conv_subnet(), clamp=2.0),
        ActNorm(C), InvertibleConv1x1(C, seed=1),
        GlowCoupling(C, conv_subnet(kernel_size=1), clamp=2.0, clamp_activation="allinone"),
        RandomPermutation(C, seed=2), AffineCoupling(C, conv_subnet(), clamp=None))
    flow = perturb_(flow, 0.1).double()
    x = torch.randn(8, C, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        flow(x)
        ours = log_likelihood(*flow(x))
        ref = nf_model(flow, (C, 5, 5)).double().log_prob(x)
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-8, rtol=1e-8)


def moons_flow(n_layers: int = 4, hidden: int = 32) -> SequentialFlow:
    layers = [ActNorm(2)]
    for _ in range(n_layers):
        layers += [AffineCoupling(2, mlp_subnet(hidden=hidden), clamp=2.0),
                   RandomPermutation(2, perm=[1, 0])]
    return SequentialFlow(layers)


def test_two_moons_adlab_and_normflows_fit_to_the_same_nll():
    """Both implementations, same initial parameters, data and batches, reach the same NLL.

    250 Adam steps (lr 3e-3, batch 256); measured |difference| 3e-4 nats (float32 rounding
    accumulated over the steps), asserted < 0.01.
    Both must also beat a full-covariance Gaussian fitted to the data by 0.3 nats.
    """
    X, _ = make_moons(n_samples=3000, noise=0.08, random_state=0)
    X = torch.tensor(X, dtype=torch.float32)
    train, test = X[:2000], X[2000:]
    torch.manual_seed(0)
    ours = moons_flow()
    with torch.no_grad():
        ours(train)  # ActNorm data-dependent init
    ref = nf_model(ours, (2,), masked=True)  # an independent copy of the same parameters
    assert not set(map(id, ref.parameters())) & set(map(id, ours.parameters()))

    def test_nll(model_nll):
        with torch.no_grad():
            return model_nll(test).item()

    ours_nll = lambda x: nll_nats(*ours(x))  # noqa: E731
    ref_nll = lambda x: -ref.log_prob(x).mean()  # noqa: E731
    before = (test_nll(ours_nll), test_nll(ref_nll))
    opt_a = torch.optim.Adam(ours.parameters(), lr=3e-3)
    opt_b = torch.optim.Adam(ref.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        batch = train[torch.randint(0, len(train), (256,), generator=g)]
        for opt, loss_fn in ((opt_a, ours_nll), (opt_b, ref_nll)):
            opt.zero_grad()
            loss_fn(batch).backward()
            opt.step()
    after = (test_nll(ours_nll), test_nll(ref_nll))
    # a full-covariance Gaussian fitted to the training data: what a flow must beat
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gauss_nll = -gauss.log_prob(test).mean().item()
    assert abs(before[0] - before[1]) < 1e-4
    assert abs(after[0] - after[1]) < 0.01, (before, after)
    assert max(after) < gauss_nll - 0.3, (after, gauss_nll)
