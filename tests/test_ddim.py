"""DDPM / DDIM from scratch (adlab.diffusion.ddim) against diffusers' schedulers and closed forms.

Independent references: diffusers' DDIMScheduler, DDIMInverseScheduler and DDPMScheduler
(configured identically, clip_sample=False), torch autograd on a torch.distributions mixture
density, and the closed-form probability-flow solution for Gaussian data.
Tolerances: 1e-5 (rtol and atol) where diffusers computes its schedule in float32 and we in
float64; 1e-10 where both sides use the very same alpha_bar values in float64.
"""
import math

import pytest
import torch
from torch.testing import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler  # noqa: E402

from adlab.diffusion.ddim import (  # noqa: E402
    GaussianMixtureEps, ddim_invert, ddim_sample, ddim_step, ddpm_sample, ddpm_step, predict_x0,
    previous_timesteps, q_sample, reconstruct, timesteps,
)
from adlab.diffusion.schedules import Schedule, linear_betas, scaled_linear_betas  # noqa: E402

F64 = torch.float64
AB = Schedule.linear().alpha_bar
TOL = dict(rtol=1e-5, atol=1e-5)      # float32 schedule (diffusers) vs float64 (ours)
EXACT = dict(rtol=1e-10, atol=1e-10)  # same alpha_bar values on both sides, float64


class FixedEps(torch.nn.Module):
    """A fixed random eps model: the N(0, I)-data optimum sqrt(1 - ab_t) x plus a random conv
    term, so trajectories stay O(1) while eps_hat depends on x and t in a non-trivial way."""

    def __init__(self, seed=0, channels=3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1).double()

    @torch.no_grad()
    def forward(self, x, t):
        ab = AB[torch.as_tensor(t)].view(-1, 1, 1, 1).to(x)
        return (1 - ab).sqrt() * x + 0.3 * torch.tanh(self.conv(x.double()).to(x) + 1e-3 * ab)


def _x(seed=1, dtype=F64, shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------ schedules

@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_schedules_match_diffusers(name):
    kwargs = {} if name == "linear" else dict(beta_start=0.00085, beta_end=0.012)
    ref = DDIMScheduler(beta_schedule=name, **kwargs)
    sched = Schedule.linear() if name == "linear" else Schedule.scaled_linear()
    assert_close(sched.betas, ref.betas.double(), rtol=1e-6, atol=0)
    assert_close(sched.alpha_bar, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)


def test_schedule_endpoints_by_hand():
    b = linear_betas()
    assert b.numel() == 1000 and math.isclose(b[0], 1e-4) and math.isclose(b[-1], 0.02)
    s = scaled_linear_betas()
    assert math.isclose(s[0], 0.00085) and math.isclose(s[-1], 0.012)
    assert math.isclose(s[500].sqrt(), (0.00085 ** 0.5 + 500 / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)))
    ab = Schedule.linear().alpha_bar
    assert math.isclose(ab[2], (1 - 1e-4) * (1 - b[1]) * (1 - b[2]), rel_tol=1e-12)
    assert_close(Schedule.linear().snr, ab / (1 - ab))


# ------------------------------------------------------------------------------ q_sample, x0

@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_q_sample_matches_add_noise(dtype):
    ref = DDIMScheduler()
    x0, eps = _x(1, dtype, (6, 3, 4, 4)), _x(2, dtype, (6, 3, 4, 4))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert_close(q_sample(x0, t, eps, AB), ref.add_noise(x0, eps, t), **TOL)
    assert_close(q_sample(x0[:1], 321, eps[:1], AB), ref.add_noise(x0[:1], eps[:1], torch.tensor([321])), **TOL)


def test_predict_x0_recovers_x0_with_true_noise():
    x0, eps = _x(1), _x(2)
    for t in [0, 10, 500, 900, 999]:
        x_t = q_sample(x0, t, eps, AB)
        assert_close(predict_x0(x_t, t, eps, AB), x0, rtol=0, atol=1e-6)
    t = torch.tensor([3, 999])
    assert_close(predict_x0(q_sample(x0, t, eps, AB), t, eps, AB), x0, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ timesteps

CASES = [("leading", 0, 10), ("leading", 1, 50), ("leading", 0, 7), ("leading", 1, 1), ("trailing", 0, 10),
         ("trailing", 0, 7), ("trailing", 0, 1), ("linspace", 0, 10), ("linspace", 0, 7), ("leading", 0, 1000)]


@pytest.mark.parametrize("spacing,offset,N", CASES)
def test_timesteps_match_set_timesteps(spacing, offset, N):
    ref = DDIMScheduler(steps_offset=offset, timestep_spacing=spacing)
    ref.set_timesteps(N)
    assert torch.equal(timesteps(N, 1000, spacing, offset), ref.timesteps)
    if spacing != "linspace":  # DDPMScheduler has the same leading / trailing rules
        ddpm = DDPMScheduler(steps_offset=offset, timestep_spacing=spacing)
        ddpm.set_timesteps(N)
        assert torch.equal(timesteps(N, 1000, spacing, offset), ddpm.timesteps)


def test_timesteps_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_inference_steps"):
        timesteps(1001)
    with pytest.raises(ValueError, match="spacing"):
        timesteps(10, spacing="even")
    with pytest.raises(ValueError, match="offset"):
        timesteps(1000, offset=1)  # would reach t = 1000
    with pytest.raises(ValueError, match="outside"):
        q_sample(_x(), 1000, _x(), AB)


def test_previous_timesteps_rules_agree_where_diffusers_says_so():
    for spacing, offset in [("leading", 0), ("leading", 1), ("trailing", 0)]:
        ts = timesteps(10, spacing=spacing, offset=offset)
        seq, stride = previous_timesteps(ts), previous_timesteps(ts, rule="stride")
        assert torch.equal(seq[:-1], stride[:-1]) and seq[-1] == -1 and stride[-1] < 0
    ts = timesteps(10, spacing="linspace")                  # 999, 888, ...: diffusers steps to 899
    assert previous_timesteps(ts, rule="stride")[0] == 899 and previous_timesteps(ts)[0] == 888


# ------------------------------------------------------------------------------ DDIM step and loop

def _diffusers_ddim_loop(ref, model, x, eta, noises):
    prev, x0s = [], []
    for i, t in enumerate(ref.timesteps.tolist()):
        out = ref.step(model(x, torch.full((x.shape[0],), t)), t, x, eta=eta,
                       variance_noise=noises[i] if eta > 0 else None)
        x = out.prev_sample
        prev.append(x)
        x0s.append(out.pred_original_sample)
    return prev, x0s


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing,offset,N", [("leading", 0, 10), ("leading", 1, 50), ("trailing", 0, 7),
                                              ("linspace", 0, 10)])
def test_ddim_step_loop_matches_diffusers(spacing, offset, N, set_alpha_to_one, eta):
    """Every prev_sample and pred_original_sample of a whole loop, same injected noise."""
    model = FixedEps()
    ref = DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                        timestep_spacing=spacing)
    ref.set_timesteps(N)
    ts = timesteps(N, 1000, spacing, offset)
    prevs = previous_timesteps(ts, 1000, rule="stride")  # diffusers' t_prev = t - T // N
    x_T = _x(3)
    gen = torch.Generator().manual_seed(4)
    noises = [torch.randn(x_T.shape, generator=gen, dtype=F64) for _ in range(N)]
    ref_prev, ref_x0 = _diffusers_ddim_loop(ref, model, x_T, eta, noises)
    # The same reference with its (float32) schedule promoted to float64: then only the step
    # formulas differ, and they agree to round-off.
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    ref64_prev, ref64_x0 = _diffusers_ddim_loop(ref, model, x_T, eta, noises)
    for alpha_bar, tol, ref_prev, ref_x0 in [(AB, TOL, ref_prev, ref_x0),
                                             (ref.alphas_cumprod, EXACT, ref64_prev, ref64_x0)]:
        x = x_T
        for i, (t, t_prev) in enumerate(zip(ts.tolist(), prevs.tolist())):
            eps_hat = model(x, torch.full((x.shape[0],), t))
            assert_close(predict_x0(x, t, eps_hat, alpha_bar), ref_x0[i], **tol)
            x = ddim_step(x, t, t_prev, eps_hat, alpha_bar, eta, noise=noises[i],
                          set_alpha_to_one=set_alpha_to_one)
            assert_close(x, ref_prev[i], **tol)


@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("spacing,offset,N", [("leading", 0, 20), ("leading", 1, 20), ("trailing", 0, 10)])
def test_ddim_sample_matches_diffusers_with_generator(spacing, offset, N, eta):
    """The default t_prev rule ('sequence') equals diffusers' where it should; noise drawn from
    equally seeded generators in the same order."""
    model = FixedEps(seed=5)
    ref = DDIMScheduler(clip_sample=False, steps_offset=offset, timestep_spacing=spacing)
    ref.set_timesteps(N)
    x_T = _x(6, torch.float32)
    gen = torch.Generator().manual_seed(7)
    y = x_T
    for t in ref.timesteps.tolist():
        y = ref.step(model(y, torch.full((2,), t)), t, y, eta=eta, generator=gen).prev_sample
    x = ddim_sample(model, x_T, N, AB, eta=eta, spacing=spacing, offset=offset,
                    generator=torch.Generator().manual_seed(7))
    assert_close(x, y, **TOL)


def test_ddim_sample_linspace_needs_stride_rule_to_match_diffusers():
    model = FixedEps(seed=8)
    ref = DDIMScheduler(clip_sample=False, timestep_spacing="linspace")
    ref.set_timesteps(10)
    y = x_T = _x(9)
    for t in ref.timesteps.tolist():
        y = ref.step(model(y, torch.full((2,), t)), t, y).prev_sample
    assert_close(ddim_sample(model, x_T, 10, AB, spacing="linspace", prev_rule="stride"), y, **TOL)
    assert (ddim_sample(model, x_T, 10, AB, spacing="linspace") - y).abs().max() > 1e-3


def test_ddim_eta1_is_ddpm_with_posterior_variance():
    """DDIM Sec. 4.1: eta = 1 makes the generalised step the DDPM ancestral step with
    sigma^2 = beta_tilde (Ho et al. Eq. 7), also on strided sub-sequences."""
    x, eps, z = _x(1), _x(2), _x(3)
    for t, t_prev in [(999, 899), (500, 499), (20, 0), (5, -1)]:
        assert_close(ddim_step(x, t, t_prev, eps, AB, 1.0, noise=z),
                     ddpm_step(x, t, t_prev, eps, AB, noise=z, sigma2="beta_tilde"), **EXACT)


def test_ddim_eta0_ignores_noise_and_rejects_bad_eta():
    x, eps = _x(1), _x(2)
    assert torch.equal(ddim_step(x, 500, 400, eps, AB, 0.0, noise=_x(3)), ddim_step(x, 500, 400, eps, AB))
    with pytest.raises(ValueError, match="inversion"):
        ddim_step(x, 400, 500, eps, AB, 0.5, noise=_x(3))


# ------------------------------------------------------------------------------ DDPM

@pytest.mark.parametrize("sigma2,variance_type", [("beta", "fixed_large"), ("beta_tilde", "fixed_small")])
@pytest.mark.parametrize("N,promote", [(50, False), (50, True), (None, True)])
def test_ddpm_loop_matches_diffusers(sigma2, variance_type, N, promote):
    """Ho et al. Eq. (11) (ours) vs diffusers' posterior-mean form (Eq. 7 with x0_hat): the same
    mean; sigma^2 = beta ('fixed_large') or beta_tilde ('fixed_small'); no noise on the last step;
    a strided 50 steps (1e-5) or all 1000 (N=None). diffusers forms beta_t = 1 - ab_t / ab_{t-1} from
    float32 cumprods, which loses ~4 digits near t = 0 when the steps are single, so the 1000-step loop
    is compared with diffusers' schedule promoted to float64 (``promote``): then only the formulas
    differ and they agree to 1e-10."""
    model = FixedEps(seed=10)
    ref = DDPMScheduler(clip_sample=False, variance_type=variance_type)
    if N is not None:
        ref.set_timesteps(N)
    alpha_bar, tol = AB, TOL
    if promote:
        ref.alphas_cumprod, ref.one = ref.alphas_cumprod.double(), ref.one.double()
        alpha_bar, tol = ref.alphas_cumprod, EXACT
    ts = ref.timesteps.tolist()
    x = y = _x(11, shape=(1, 3, 4, 4))
    g_ref, g_ours = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    prevs = previous_timesteps(torch.tensor(ts)).tolist()
    for t, t_prev in zip(ts, prevs):
        y = ref.step(model(y, torch.tensor([t])), t, y, generator=g_ref).prev_sample
        x = ddpm_step(x, t, t_prev, model(x, torch.tensor([t])), alpha_bar, sigma2=sigma2, generator=g_ours)
        assert_close(x, y, **tol)
    x_loop = ddpm_sample(model, _x(11, shape=(1, 3, 4, 4)), N, alpha_bar, sigma2=sigma2,
                         generator=torch.Generator().manual_seed(12))
    assert_close(x_loop, y, **tol)


# ------------------------------------------------------------------------------ inversion

@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing,offset,N", [("leading", 0, 10), ("leading", 1, 25), ("trailing", 0, 10)])
def test_ddim_invert_matches_diffusers_inverse_scheduler(spacing, offset, N, set_alpha_to_one):
    model = FixedEps(seed=13)
    ref = DDIMInverseScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                               timestep_spacing=spacing)
    ref.set_timesteps(N)
    y = x0 = _x(14)
    for t in ref.timesteps.tolist():
        y = ref.step(model(y, torch.full((2,), t)), t, y).prev_sample
    x_T, xs = ddim_invert(model, x0, N, AB, spacing=spacing, offset=offset,
                          set_alpha_to_one=set_alpha_to_one, return_trajectory=True)
    assert_close(x_T, y, **TOL)
    assert xs.shape[0] == N + 1 and torch.equal(xs[0], x0)


def test_inversion_round_trip_is_exact_for_a_point_mass():
    """Data = one point mu: eps* = (x_t - sqrt(ab) mu) / sqrt(1 - ab) is constant along the DDIM
    path and x0_hat = mu exactly, so invert-then-sample returns x0 = mu to float64 round-off
    (tolerance 1e-10), for any number of steps."""
    mu = _x(15, shape=(1, 3, 8, 8))
    model = GaussianMixtureEps(mu, 0.0, alpha_bar=AB)
    for N, spacing in [(10, "leading"), (3, "trailing"), (50, "linspace")]:
        x_T = ddim_invert(model, mu, N, AB, spacing=spacing)
        assert_close(ddim_sample(model, x_T, N, AB, spacing=spacing), mu, **EXACT)


def test_inversion_round_trip_for_gaussian_data_converges():
    """Data N(mu, s^2 I), s = 0.5, exact eps*: the round trip error is first order in the step size.
    Tolerance: max |x0_rec - x0| / max |x0| < 2e-2 at 200 steps, and 50 -> 200 steps cuts it > 3x."""
    g = torch.Generator().manual_seed(16)
    mu = torch.randn(1, 16, generator=g, dtype=F64)
    model = GaussianMixtureEps(mu, 0.5, alpha_bar=AB)
    x0 = model.sample(64, g)
    err = {}
    for N in (50, 200):
        x_rec = ddim_sample(model, ddim_invert(model, x0, N, AB), N, AB)
        err[N] = float((x_rec - x0).abs().max() / x0.abs().max())
    assert err[200] < 2e-2 and err[50] > 3 * err[200], err


# ------------------------------------------------------------------------------ the exact model

def test_gaussian_mixture_eps_is_the_scaled_score():
    """eps*(x_t, t) = -sqrt(1 - ab_t) grad log q_t(x_t), q_t the noised mixture built with
    torch.distributions and differentiated by autograd."""
    D = torch.distributions
    g = torch.Generator().manual_seed(17)
    mu = torch.randn(3, 2, generator=g, dtype=F64) * 2
    s = torch.tensor([0.1, 0.5, 1.3], dtype=F64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    model = GaussianMixtureEps(mu, s, w, alpha_bar=AB)
    for t in [0, 100, 600, 999]:
        ab = AB[t]
        q_t = D.MixtureSameFamily(D.Categorical(probs=w),
                                  D.Independent(D.Normal(ab.sqrt() * mu, (ab * s ** 2 + 1 - ab).sqrt()
                                                         .unsqueeze(-1).expand(3, 2)), 1))
        x = torch.randn(32, 2, generator=g, dtype=F64).requires_grad_(True)
        (score,) = torch.autograd.grad(q_t.log_prob(x).sum(), x)
        assert_close(model(x.detach(), torch.full((32,), t)), -(1 - ab).sqrt() * score, **EXACT)


def test_gaussian_mixture_sample_moments():
    g = torch.Generator().manual_seed(18)
    model = GaussianMixtureEps(torch.tensor([[-2.0, 0.0], [3.0, 1.0]], dtype=F64), [0.5, 1.0], [0.25, 0.75])
    x = model.sample(40000, g)
    assert_close(x.mean(0), torch.tensor([1.75, 0.75], dtype=F64), rtol=0, atol=0.03)
    var0 = 0.25 * 0.25 + 0.75 * 1.0 + 0.25 * 0.75 * 5.0 ** 2  # mixture variance along axis 0
    assert abs(float(x[:, 0].var()) - var0) < 0.1


# ------------------------------------------------------------------------------ reconstruction

def test_reconstruct_from_the_top_matches_a_diffusers_trailing_loop():
    model = FixedEps(seed=19)
    x0, eps = _x(20), _x(21)
    ref = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(10)
    y = ref.add_noise(x0, eps, torch.tensor([999]))
    for t in ref.timesteps.tolist():
        y = ref.step(model(y, torch.full((2,), t)), t, y).prev_sample
    assert_close(reconstruct(model, x0, 999, 10, AB, eps=eps), y, **TOL)


def test_reconstruct_follows_the_gaussian_probability_flow():
    """For data N(mu, s^2 I) the probability-flow ODE keeps z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab)
    constant, so the exact reconstruction from t is mu + s z: the anomaly x0 - mu shrinks by
    s sqrt(ab) / sqrt(ab s^2 + 1 - ab). DDIM with every step from t_start = 300 matches it to 1e-2
    (relative to max |x0 - mu|); with the data itself a point mass it returns mu exactly."""
    g = torch.Generator().manual_seed(22)
    mu = torch.zeros(1, 3, 8, 8, dtype=F64)
    x0 = mu + 2.0 * torch.randn(1, 3, 8, 8, generator=g, dtype=F64)  # far from the data: an "anomaly"
    eps = torch.randn(1, 3, 8, 8, generator=g, dtype=F64)
    s, t = 0.3, 300
    ab = AB[t]
    expected = mu + s * (ab.sqrt() * (x0 - mu) + (1 - ab).sqrt() * eps) / (ab * s ** 2 + 1 - ab).sqrt()
    x_rec = reconstruct(GaussianMixtureEps(mu, s, alpha_bar=AB), x0, t, t + 1, AB, eps=eps)
    assert float((x_rec - expected).abs().max()) < 1e-2 * float((x0 - mu).abs().max())
    assert float((x_rec - mu).abs().max()) < 0.5 * float((x0 - mu).abs().max())
    assert_close(reconstruct(GaussianMixtureEps(mu, 0.0, alpha_bar=AB), x0, t, 5, AB, eps=eps), mu, **EXACT)


def test_reconstruct_and_model_errors_are_clear():
    x = _x(23)
    with pytest.raises(ValueError, match="t_start"):
        reconstruct(FixedEps(), x, 1000, 10, AB)
    with pytest.raises(ValueError, match="steps"):
        reconstruct(FixedEps(), x, 5, 10, AB)
    with pytest.raises(TypeError, match="UNet2DModel"):
        ddim_sample(lambda x, t: x.mean(), x, 5, AB)
