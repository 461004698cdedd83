"""Noise schedules of the forward (noising) process: beta_t, alpha_bar_t, SNR.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (DDPM):
the forward process adds Gaussian noise with variances beta_1..beta_T (Eq. 2), and with
alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s it has the closed form
q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Eq. 4).

Indexing follows diffusers: the training steps are t = 0..T-1 (the paper's t = 1..T), so
``alpha_bar[0]`` is the paper's alpha_bar_1 and the clean data sits "before" index 0.
Schedules are computed in float64 and cast to the sample's dtype where they are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["linear_betas", "scaled_linear_betas", "alpha_bar_from_betas", "snr", "Schedule"]


def linear_betas(num_train_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4: T = 1000, beta_1 = 1e-4 to beta_T = 0.02)."""
    _check_range(num_train_steps, beta_1, beta_T)
    return torch.linspace(beta_1, beta_T, num_train_steps, dtype=torch.float64)


def scaled_linear_betas(num_train_steps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's schedule (Rombach et al. 2022, LDM config linear_start 0.00085,
    linear_end 0.012): linear in sqrt(beta), ``betas = linspace(sqrt(b0), sqrt(b1), T) ** 2``
    (diffusers calls it ``beta_schedule="scaled_linear"``)."""
    _check_range(num_train_steps, beta_start, beta_end)
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_steps, dtype=torch.float64) ** 2


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, notation above Eq. 4)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a 1-D sequence with every value in (0, 1).")
    return torch.cumprod(1.0 - betas, dim=0)


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio of x_t: SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
    (Kingma et al. 2021, "Variational Diffusion Models", Eq. 2-3 in DDPM's parametrisation)."""
    return alpha_bar / (1.0 - alpha_bar)


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule: ``betas`` and the derived ``alpha_bar`` (float64, length T).

    >>> sched = Schedule.linear()            # DDPM, T = 1000
    >>> sched.alpha_bar[-1] < 1e-4           # x_T is almost pure noise
    tensor(True)
    """

    betas: Tensor

    def __post_init__(self):
        object.__setattr__(self, "betas", torch.as_tensor(self.betas, dtype=torch.float64))
        alpha_bar_from_betas(self.betas)  # validates

    @classmethod
    def linear(cls, num_train_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> "Schedule":
        """DDPM's linear schedule (Ho et al. 2020, Sec. 4)."""
        return cls(linear_betas(num_train_steps, beta_1, beta_T))

    @classmethod
    def scaled_linear(cls, num_train_steps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "Schedule":
        """Stable Diffusion's schedule (diffusers' ``"scaled_linear"``)."""
        return cls(scaled_linear_betas(num_train_steps, beta_start, beta_end))

    @property
    def num_train_steps(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas(self) -> Tensor:
        """alpha_t = 1 - beta_t."""
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> Tensor:
        """alpha_bar_t = prod_{s<=t} alpha_s: the signal fraction of x_t (DDPM Eq. 4)."""
        return alpha_bar_from_betas(self.betas)

    @property
    def snr(self) -> Tensor:
        """alpha_bar_t / (1 - alpha_bar_t) for every t."""
        return snr(self.alpha_bar)


def _check_range(num_train_steps: int, start: float, end: float) -> None:
    if int(num_train_steps) < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}.")
    if not (0 < start < 1 and 0 < end < 1):
        raise ValueError(f"beta values must lie in (0, 1), got start={start}, end={end}.")
