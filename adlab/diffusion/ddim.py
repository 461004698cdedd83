"""DDPM and DDIM from scratch: forward noising, x0 prediction, the DDIM / DDPM steps, sampling,
deterministic inversion and the noise-and-denoise reconstruction used for anomaly detection.

Papers and equations
--------------------
* DDPM: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
  Eq. (4) q(x_t | x_0); Eq. (11) the ancestral sampling mean; Sec. 3.2 sigma_t^2 = beta_t or
  beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (Eq. 7); Algorithm 2.
* DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021.
  Eq. (9) the predicted x0; Eq. (12) the generalised step; Eq. (16) sigma(eta);
  Sec. 4.2 sampling on a sub-sequence tau of [1..T]; Sec. 5.4 / Eq. (13) encoding x0 -> x_T
  by running the eta = 0 (ODE) update forward in t ("DDIM inversion").
  DDIM writes alpha_t for DDPM's alpha_bar_t; we keep DDPM's name ``alpha_bar`` throughout.

Conventions (those of diffusers, so our numbers match its schedulers)
--------------------------------------------------------------------
* Training steps are t = 0..T-1 (``alpha_bar[t]``); t = -1 means "the data": its alpha_bar is 1
  (``set_alpha_to_one=True``, the paper's alpha_0 := 1) or ``alpha_bar[0]`` (``False``).
* ``model(x_t, t) -> eps_hat`` is any callable: a plain function or an ``nn.Module``. It gets
  ``t`` as a LongTensor of shape [B]. For a diffusers ``UNet2DModel`` wrap it:
  ``model = lambda x, t: unet(x, t).sample``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from adlab.diffusion.schedules import Schedule

__all__ = [
    "q_sample", "predict_x0", "ddim_sigma", "ddim_update", "ddim_step", "ddpm_step",
    "timesteps", "previous_timesteps", "ddim_sample", "ddpm_sample", "ddim_invert",
    "reconstruct", "GaussianMixtureEps",
]

EpsModel = Callable[[Tensor, Tensor], Tensor]
SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------------
# alpha_bar lookup
# --------------------------------------------------------------------------------------------

def _final_alpha_bar(alpha_bar: Tensor, set_alpha_to_one: bool) -> Tensor:
    """alpha_bar "at t = -1", where sampling ends: 1 (DDIM's alpha_0 := 1) or alpha_bar[0]."""
    return torch.ones((), dtype=alpha_bar.dtype) if set_alpha_to_one else alpha_bar[0]


def _alpha_bar_at(alpha_bar: Tensor, t, like: Tensor, set_alpha_to_one: bool | None = None) -> Tensor:
    """alpha_bar_t shaped to broadcast against ``like`` ([B] t -> [B,1,1,...]).

    t < 0 is allowed only when ``set_alpha_to_one`` is given (then it is the data end, see
    :func:`_final_alpha_bar`)."""
    alpha_bar = torch.as_tensor(alpha_bar)
    if alpha_bar.ndim != 1:
        raise ValueError("alpha_bar must be the 1-D tensor of a schedule, e.g. Schedule.linear().alpha_bar.")
    t = torch.as_tensor(t, device=alpha_bar.device).long()
    T = alpha_bar.numel()
    if bool((t >= T).any()) or (set_alpha_to_one is None and bool((t < 0).any())):
        raise ValueError(f"timestep t={t.tolist()} is outside the schedule's range 0..{T - 1}.")
    value = alpha_bar[t.clamp(min=0)]
    if set_alpha_to_one is not None:
        value = torch.where(t < 0, _final_alpha_bar(alpha_bar, set_alpha_to_one), value)
    value = value.to(device=like.device, dtype=like.dtype)
    if value.ndim == 1:  # one t per sample
        if value.numel() not in (1, like.shape[0]):
            raise ValueError(f"got {value.numel()} timesteps for a batch of {like.shape[0]}.")
        value = value.view(-1, *([1] * (like.ndim - 1)))
    return value


def _as_alpha_bar(alpha_bar) -> Tensor:
    if alpha_bar is None:
        return Schedule.linear().alpha_bar
    if isinstance(alpha_bar, Schedule):
        return alpha_bar.alpha_bar
    return torch.as_tensor(alpha_bar)


# --------------------------------------------------------------------------------------------
# One function per equation
# --------------------------------------------------------------------------------------------

def q_sample(x0: Tensor, t, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward process in closed form, DDPM Eq. (4) reparametrised:
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I).

    ``t`` is an int or a LongTensor [B] (one t per sample, as in training)."""
    ab = _alpha_bar_at(alpha_bar, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def _x0_from_eps(x_t: Tensor, ab_t: Tensor, eps_hat: Tensor) -> Tensor:
    return (x_t - (1 - ab_t).sqrt() * eps_hat) / ab_t.sqrt()


def predict_x0(x_t: Tensor, t, eps_hat: Tensor, alpha_bar: Tensor) -> Tensor:
    """The predicted clean sample, DDIM Eq. (9) (= the first term of Eq. 12; DDPM Eq. 4 solved for x0):
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t).

    With the true noise (eps_hat = eps of :func:`q_sample`) this is exactly x0; with the optimal
    eps_hat it is the posterior mean E[x0 | x_t] (Tweedie's formula)."""
    return _x0_from_eps(x_t, _alpha_bar_at(alpha_bar, t, x_t), eps_hat)


def ddim_sigma(alpha_bar_t: Tensor, alpha_bar_prev: Tensor, eta: float) -> Tensor:
    """DDIM Eq. (16): sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    (a = alpha_bar). eta = 0 is DDIM (deterministic); eta = 1 is DDPM's sampler with
    sigma^2 = beta_tilde (Ho et al. Sec. 3.2)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()


def ddim_update(x0_hat: Tensor, eps_hat: Tensor, alpha_bar_prev: Tensor, sigma=0.0,
                noise: Tensor | None = None) -> Tensor:
    """DDIM Eq. (12) given the predicted x0:
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z.

    Split out of :func:`ddim_step` so methods that edit x0_hat (e.g. GLAD's fusion) reuse it."""
    sigma = torch.as_tensor(sigma, dtype=x0_hat.dtype, device=x0_hat.device)
    direction = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat  # "pointing to x_t"
    x_prev = alpha_bar_prev.sqrt() * x0_hat + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def ddim_step(x_t: Tensor, t: int, t_prev: int, eps_hat: Tensor, alpha_bar: Tensor, eta: float = 0.0,
              noise: Tensor | None = None, *, set_alpha_to_one: bool = True,
              generator: torch.Generator | None = None) -> Tensor:
    """One DDIM step t -> t_prev, DDIM Eq. (12) with sigma from Eq. (16).

    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
    x0_hat from Eq. (9). eta = 0: deterministic. t_prev < 0 means the data end
    (a_prev = 1 or alpha_bar[0] as ``set_alpha_to_one`` chooses, like diffusers' DDIMScheduler).
    With eta = 0 the same map also runs forward in t (t_prev > t): that is DDIM inversion.
    ``noise`` z (default: drawn from ``generator`` when eta > 0) plays diffusers' ``variance_noise``.
    Returns x_prev; the x0_hat it used is :func:`predict_x0` ``(x_t, t, eps_hat, alpha_bar)``."""
    ab_t = _alpha_bar_at(alpha_bar, t, x_t, set_alpha_to_one)
    ab_prev = _alpha_bar_at(alpha_bar, t_prev, x_t, set_alpha_to_one)
    x0_hat = _x0_from_eps(x_t, ab_t, eps_hat)
    if eta == 0:
        return ddim_update(x0_hat, eps_hat, ab_prev)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if bool((torch.as_tensor(t_prev) > torch.as_tensor(t)).any()):
        raise ValueError("eta > 0 is only defined for denoising steps (t_prev < t); "
                         "DDIM inversion (t_prev > t) must use eta = 0.")
    sigma = ddim_sigma(ab_t, ab_prev, eta)
    if noise is None:
        noise = _randn_like(x_t, generator)
    return ddim_update(x0_hat, eps_hat, ab_prev, sigma, noise)


def ddpm_step(x_t: Tensor, t: int, t_prev: int, eps_hat: Tensor, alpha_bar: Tensor,
              noise: Tensor | None = None, *, sigma2: str = "beta",
              generator: torch.Generator | None = None) -> Tensor:
    """One ancestral DDPM step t -> t_prev, Ho et al. 2020 Eq. (11) / Algorithm 2:

    x_prev = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) + sigma_t z,

    with alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t (for t_prev = t - 1 these
    are the schedule's own; for a strided sub-sequence they are the effective ones).
    ``sigma2="beta"``: sigma_t^2 = beta_t; ``"beta_tilde"``: the posterior variance
    (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t (Sec. 3.2, Eq. 7). No noise on the last
    step (t_prev < 0, where alpha_bar_prev = 1), as in Algorithm 2."""
    ab_t = _alpha_bar_at(alpha_bar, t, x_t, set_alpha_to_one=True)
    ab_prev = _alpha_bar_at(alpha_bar, t_prev, x_t, set_alpha_to_one=True)
    alpha_t = ab_t / ab_prev
    beta_t = 1 - alpha_t
    mean = (x_t - beta_t / (1 - ab_t).sqrt() * eps_hat) / alpha_t.sqrt()
    if int(torch.as_tensor(t_prev).max()) < 0:
        return mean
    if sigma2 == "beta":
        var = beta_t
    elif sigma2 == "beta_tilde":
        var = (1 - ab_prev) / (1 - ab_t) * beta_t
    else:
        raise ValueError(f"sigma2 must be 'beta' or 'beta_tilde', got {sigma2!r}.")
    if noise is None:
        noise = _randn_like(x_t, generator)
    return mean + var.sqrt() * noise


# --------------------------------------------------------------------------------------------
# Timestep sub-sequences (DDIM Sec. 4.2) with diffusers' spacing conventions
# --------------------------------------------------------------------------------------------

def timesteps(num_inference_steps: int, num_train_steps: int = 1000, spacing: str = "leading",
              offset: int = 0) -> Tensor:
    """The descending sub-sequence tau of training steps that sampling visits (DDIM Sec. 4.2).

    Same conventions as diffusers' ``DDIMScheduler.set_timesteps`` (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2), N = num_inference_steps:

    * ``"leading"``: ``arange(N) * (T // N) + offset`` reversed (diffusers' default; ``offset`` is its
      ``steps_offset``, Stable Diffusion uses 1);
    * ``"trailing"``: ``round(arange(T, 0, -T / N)) - 1``: starts at T - 1;
    * ``"linspace"``: ``round(linspace(0, T - 1, N))`` reversed.
    """
    N, T = int(num_inference_steps), int(num_train_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_steps={T}, got {N}.")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}.")
    if offset and spacing != "leading":
        raise ValueError("offset (diffusers' steps_offset) applies to spacing='leading' only.")
    if spacing == "leading":
        ts = torch.arange(N, dtype=torch.float64) * (T // N)
        ts = ts.round().long().flip(0) + int(offset)
    elif spacing == "trailing":
        ts = torch.arange(T, 0, -T / N, dtype=torch.float64).round().long() - 1
    else:
        ts = torch.linspace(0, T - 1, N, dtype=torch.float64).round().long().flip(0)
    if int(ts.max()) >= T or int(ts.min()) < 0:
        raise ValueError(f"offset={offset} pushes timesteps outside 0..{T - 1}; use a smaller offset.")
    return ts


def previous_timesteps(ts: Tensor, num_train_steps: int = 1000, rule: str = "sequence") -> Tensor:
    """t_prev for each t in the descending sequence ``ts``.

    * ``"sequence"``: the next entry of ``ts`` and -1 (the data) after the last: DDIM's tau_{i-1}.
    * ``"stride"``: ``t - T // len(ts)``, what diffusers' ``DDIMScheduler.step`` uses. Both agree for
      ``"leading"`` spacing (any offset) and for ``"trailing"`` when N divides T; for ``"linspace"``
      diffusers' rule steps to noise levels that are not in the sequence.
    """
    ts = torch.as_tensor(ts).long()
    if rule == "sequence":
        return torch.cat([ts[1:], ts.new_tensor([-1])])
    if rule == "stride":
        return ts - int(num_train_steps) // ts.numel()
    raise ValueError(f"rule must be 'sequence' or 'stride', got {rule!r}.")


def _sequence(steps, alpha_bar: Tensor, spacing: str, offset: int) -> Tensor:
    """``steps`` as a descending LongTensor: an int -> :func:`timesteps`; a sequence is checked."""
    T = alpha_bar.numel()
    if isinstance(steps, int):
        return timesteps(steps, T, spacing, offset)
    ts = torch.as_tensor(steps).long().flatten()
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= T or bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"steps must be an int or a strictly decreasing sequence in 0..{T - 1}.")
    return ts


def _eps(model: EpsModel, x: Tensor, t: int) -> Tensor:
    t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    eps_hat = model(x, t_batch)
    if not isinstance(eps_hat, Tensor) or eps_hat.shape != x.shape:
        raise TypeError("model(x_t, t) must return a tensor eps_hat shaped like x_t "
                        f"{tuple(x.shape)}; for a diffusers UNet2DModel pass "
                        "`lambda x, t: unet(x, t).sample`.")
    return eps_hat


def _progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from adlab.progress import progress as bar  # a text line when outputs are recorded headless
    return bar(it, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def ddim_sample(model: EpsModel, x_T: Tensor, steps: int | Sequence[int], alpha_bar=None, *,
                eta: float = 0.0, spacing: str = "leading", offset: int = 0,
                set_alpha_to_one: bool = True, prev_rule: str = "sequence",
                generator: torch.Generator | None = None, progress: bool = False,
                return_trajectory: bool = False):
    """DDIM sampling (Song et al. 2021, Sec. 4.2): x_T -> x_0 on the sub-sequence tau, one
    :func:`ddim_step` (Eq. 12, sigma Eq. 16) per entry.

    ``steps``: the number of inference steps (spaced by ``spacing`` / ``offset``, see
    :func:`timesteps`) or an explicit descending sequence of training steps.
    ``alpha_bar``: a tensor or :class:`Schedule` (default DDPM's linear schedule).
    ``prev_rule``: see :func:`previous_timesteps` ("stride" reproduces diffusers' DDIMScheduler
    for every spacing). With ``return_trajectory`` also returns (xs, x0_hats): the x_t visited,
    [len(tau) + 1, ...], and the x0 predicted at each step, [len(tau), ...]."""
    alpha_bar = _as_alpha_bar(alpha_bar)
    ts = _sequence(steps, alpha_bar, spacing, offset)
    prevs = previous_timesteps(ts, alpha_bar.numel(), prev_rule)
    x, xs, x0s = x_T, [x_T], []
    for t, t_prev in _progress(list(zip(ts.tolist(), prevs.tolist())), progress, "DDIM"):
        eps_hat = _eps(model, x, t)
        if return_trajectory:
            x0s.append(predict_x0(x, t, eps_hat, alpha_bar))
        x = ddim_step(x, t, t_prev, eps_hat, alpha_bar, eta,
                      set_alpha_to_one=set_alpha_to_one, generator=generator)
        xs.append(x)
    return (x, torch.stack(xs), torch.stack(x0s)) if return_trajectory else x


@torch.no_grad()
def ddpm_sample(model: EpsModel, x_T: Tensor, steps: int | Sequence[int] | None = None, alpha_bar=None, *,
                sigma2: str = "beta", spacing: str = "leading", offset: int = 0,
                generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with :func:`ddpm_step` (Eq. 11).

    ``steps=None`` visits all T training steps (the paper); fewer steps use the strided
    sub-sequence of :func:`timesteps` with effective betas (as diffusers' DDPMScheduler)."""
    alpha_bar = _as_alpha_bar(alpha_bar)
    ts = _sequence(alpha_bar.numel() if steps is None else steps, alpha_bar, spacing, offset)
    prevs = previous_timesteps(ts, alpha_bar.numel(), "sequence")
    x = x_T
    for t, t_prev in _progress(list(zip(ts.tolist(), prevs.tolist())), progress, "DDPM"):
        x = ddpm_step(x, t, t_prev, _eps(model, x, t), alpha_bar, sigma2=sigma2, generator=generator)
    return x


@torch.no_grad()
def ddim_invert(model: EpsModel, x0: Tensor, steps: int | Sequence[int], alpha_bar=None, *,
                spacing: str = "leading", offset: int = 0, set_alpha_to_one: bool = True,
                progress: bool = False, return_trajectory: bool = False):
    """Deterministic DDIM inversion (Song et al. 2021, Sec. 5.4, Eq. 13): run the eta = 0 update
    forward in t, x0 -> x_{tau_1} -> ... -> x_{tau_N}.

    The step tau_{i-1} -> tau_i evaluates eps_hat(x_{tau_{i-1}}, tau_i): the noise the matching
    sampling step tau_i -> tau_{i-1} will predict, approximated at the point we know (as diffusers'
    ``DDIMInverseScheduler``). Then ``ddim_sample(model, x_T, steps, ...)`` with the same
    ``steps``/``spacing``/``offset`` maps back to approximately x0; exact only in the limit of small
    steps or when eps_hat is constant along the path (e.g. data that is a single point)."""
    alpha_bar = _as_alpha_bar(alpha_bar)
    ts = _sequence(steps, alpha_bar, spacing, offset)
    sources = previous_timesteps(ts, alpha_bar.numel(), "sequence")
    x, xs = x0, [x0]
    for t_src, t in _progress(list(zip(sources.flip(0).tolist(), ts.flip(0).tolist())), progress, "invert"):
        x = ddim_step(x, t_src, t, _eps(model, x, t), alpha_bar, 0.0, set_alpha_to_one=set_alpha_to_one)
        xs.append(x)
    return (x, torch.stack(xs)) if return_trajectory else x


@torch.no_grad()
def reconstruct(model: EpsModel, x0: Tensor, t_start: int, steps: int, alpha_bar=None,
                eps: Tensor | None = None, generator: torch.Generator | None = None, *,
                eta: float = 0.0, set_alpha_to_one: bool = True, progress: bool = False) -> Tensor:
    """Noise-and-denoise reconstruction, the diffusion baseline for anomaly detection:
    x_{t_start} = q_sample(x0, t_start, eps) (DDPM Eq. 4), then ``steps`` DDIM steps
    (Eq. 12) down to the data along t_start, ..., evenly spaced ("trailing" spacing of [0, t_start]).

    A model of normal data pulls an anomalous region toward normal appearance, so
    |x0 - reconstruction| highlights it; t_start trades keeping detail (small) against removing
    large defects (big). ``eps`` defaults to N(0, I) from ``generator``."""
    alpha_bar = _as_alpha_bar(alpha_bar)
    T = alpha_bar.numel()
    if not 0 <= int(t_start) < T:
        raise ValueError(f"t_start must be in 0..{T - 1}, got {t_start}.")
    if not 1 <= int(steps) <= int(t_start) + 1:
        raise ValueError(f"steps must be between 1 and t_start + 1 = {int(t_start) + 1}, got {steps}.")
    if eps is None:
        eps = _randn_like(x0, generator)
    x_t = q_sample(x0, int(t_start), eps, alpha_bar)
    ts = timesteps(int(steps), int(t_start) + 1, "trailing")
    return ddim_sample(model, x_t, ts, alpha_bar, eta=eta, set_alpha_to_one=set_alpha_to_one,
                       generator=generator, progress=progress)


# --------------------------------------------------------------------------------------------
# An exact noise predictor for toy data (tests and notebooks: no training needed)
# --------------------------------------------------------------------------------------------

class GaussianMixtureEps:
    """The optimal noise predictor eps*(x_t, t) = E[eps | x_t] for data x0 ~ sum_k w_k N(mu_k, s_k^2 I).

    The minimiser of DDPM's loss (Ho et al. 2020, Eq. 14) is E[eps | x_t] =
    -sqrt(1 - alpha_bar_t) grad log q_t(x_t) (Tweedie). Noising a Gaussian component gives
    q_t(x_t | k) = N(sqrt(alpha_bar_t) mu_k, v_k I) with v_k = alpha_bar_t s_k^2 + 1 - alpha_bar_t, so

        eps*(x_t, t) = sqrt(1 - alpha_bar_t) sum_k r_k(x_t) (x_t - sqrt(alpha_bar_t) mu_k) / v_k,

    r_k the posterior responsibilities. ``means`` [K, *shape] (a point set, an image set...),
    ``stds`` a float or [K] (0 allowed: a point mass), ``weights`` [K] (default uniform).
    Call it like a trained model: ``eps_hat = model(x_t, t)``."""

    def __init__(self, means: Tensor, stds=0.0, weights=None, alpha_bar=None):
        self.means = torch.as_tensor(means)
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=self.means.dtype).expand(K).clone()
        w = torch.ones(K, dtype=self.means.dtype) if weights is None else torch.as_tensor(weights, dtype=self.means.dtype)
        if w.shape != (K,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum.")
        self.weights = w / w.sum()
        self.alpha_bar = _as_alpha_bar(alpha_bar)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws x0 from the mixture."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k].view(-1, *([1] * (z.ndim - 1))) * z

    def _noised_components(self, x_t: Tensor, t):
        """alpha_bar_t [B,1], d_k = x_t - sqrt(ab) mu_k [B,K,D], v_k [B,K], responsibilities r_k [B,K]."""
        ab = _alpha_bar_at(self.alpha_bar, t, x_t).reshape(-1, 1)            # [B or 1, 1]
        x = x_t.reshape(x_t.shape[0], 1, -1)                                   # [B, 1, D]
        mu = self.means.to(x_t).reshape(1, self.means.shape[0], -1)            # [1, K, D]
        v = ab * self.stds.to(x_t) ** 2 + 1 - ab                               # [B, K]
        d = x - ab.sqrt().unsqueeze(-1) * mu                                   # [B, K, D]
        log_r = (self.weights.to(x_t).log() - 0.5 * x.shape[-1] * v.log()
                 - 0.5 * (d ** 2).sum(-1) / v)                                 # log w_k N(x_t; ...)
        return ab, d, v, torch.softmax(log_r, dim=1)

    def responsibilities(self, x_t: Tensor, t) -> Tensor:
        """r_k(x_t) = P(component k | x_t), [B, K]: which mode the noisy sample belongs to."""
        return self._noised_components(x_t, t)[3]

    def __call__(self, x_t: Tensor, t) -> Tensor:
        ab, d, v, r = self._noised_components(x_t, t)
        eps = (1 - ab).sqrt() * (r.unsqueeze(-1) * d / v.unsqueeze(-1)).sum(1)
        return eps.reshape(x_t.shape)
