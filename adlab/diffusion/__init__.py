"""Diffusion models from scratch: schedules, DDPM/DDIM sampling, inversion, reconstruction."""
from adlab.diffusion.ddim import (GaussianMixtureEps, ddim_invert, ddim_sample, ddim_sigma,
                                  ddim_step, ddim_update, ddpm_sample, ddpm_step, predict_x0,
                                  previous_timesteps, q_sample, reconstruct, timesteps)
from adlab.diffusion.schedules import (Schedule, alpha_bar_from_betas, linear_betas,
                                       scaled_linear_betas, snr)

__all__ = ["GaussianMixtureEps", "ddim_invert", "ddim_sample", "ddim_sigma", "ddim_step",
           "ddim_update", "ddpm_sample", "ddpm_step", "predict_x0", "previous_timesteps",
           "q_sample", "reconstruct", "timesteps", "Schedule", "alpha_bar_from_betas",
           "linear_betas", "scaled_linear_betas", "snr"]
