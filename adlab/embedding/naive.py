"""A naive per-pixel baseline: distance to the mean training image.

No paper: the simplest thing that could work, so that the embedding methods can
be judged against it. Every pixel of a test image is compared with the same
pixel of the mean defect-free image:

    a(x)_ij = 1/C sum_c (x_cij - mu_cij)^2 / (sigma_cij^2 + eps)

(``normalize_std=False`` drops the division by the per-pixel variance). The image
score is the maximum of the map, or the mean of its ``top_k`` largest pixels.

It works for aligned objects on a plain background and fails on textures, where
every pixel varies from image to image: the gap to PaDiM / PatchCore shows what
learned features buy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adlab.detector import Prediction, make_config
from adlab.features import gaussian_blur, images_of, topk_mean


@dataclass
class MeanImageConfig:
    """Hyperparameters of the mean-image baseline (our choices; there is no paper)."""

    normalize_std: bool = True   # divide by the per-pixel variance (a per-pixel z-score)
    eps: float = 1e-3            # variance floor for pixels that never change in training
    top_k: int = 1               # image score: mean of the k largest map values (1 = max)
    sigma: float = 0.0           # optional Gaussian blur of the map (0 = none)


def pixel_distance(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor | None = None,
                   eps: float = 1e-3) -> torch.Tensor:
    """``1/C sum_c (x - mu)^2 / (var + eps)`` per pixel: ``[B, C, H, W]`` -> ``[B, H, W]``.

    ``var=None`` gives the plain mean squared difference over channels.
    """
    d2 = (x - mu) ** 2
    if var is not None:
        d2 = d2 / (var + eps)
    return d2.mean(1)


class MeanImageDetector:
    """Distance to the mean training image: ``fit(train)`` then ``predict(images)``."""

    Config = MeanImageConfig

    def __init__(self, config: MeanImageConfig | None = None, **overrides):
        self.config = make_config(MeanImageConfig, config, overrides)
        self.mu = None

    def fit(self, train, progress: bool = False) -> "MeanImageDetector":
        """Per-pixel mean and variance of the defect-free training images.

        One vectorised pass, so there is no progress to show (``progress`` is accepted
        for the same ``fit`` signature as the other detectors).
        """
        images = images_of(train).double()
        self.mu = images.mean(0).float()
        self.var = images.var(0, unbiased=False).float()
        return self

    def state_dict(self) -> dict:
        """The fitted mean and variance images (see :func:`adlab.detector.save_detector`)."""
        return {"mu": self.mu, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.var = state["mu"], state["var"]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        if self.mu is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        if tuple(images.shape[1:]) != tuple(self.mu.shape):
            raise ValueError(f"The mean image has shape {tuple(self.mu.shape)}; got images "
                             f"{tuple(images.shape[1:])}. Load test images at the training size.")
        c = self.config
        maps = pixel_distance(images.float(), self.mu, self.var if c.normalize_std else None, c.eps)
        maps = gaussian_blur(maps, c.sigma)
        return Prediction(topk_mean(maps, c.top_k), maps)


__all__ = ["MeanImageDetector", "MeanImageConfig", "pixel_distance"]
