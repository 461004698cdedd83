"""PaDiM: a Patch Distribution Modeling framework (Defard et al., ICPR workshops 2020).

Each patch position (i, j) of the training images gets its own multivariate
Gaussian over CNN patch embeddings; a test patch is scored by its Mahalanobis
distance to the Gaussian of its position.

1. Embedding (Sec. 3.1): the feature maps of layer1, layer2, layer3 of an
   ImageNet CNN, the deeper ones upsampled to layer1's grid and concatenated, so
   each position carries several semantic levels; then a *random* subset of d
   channels (the paper's "Rd" random dimensionality reduction: as good as PCA in
   its ablation, and cheaper).
2. Learning (Sec. 3.2, Eq. 1): per position, the mean mu_ij and the sample
   covariance plus a regulariser,
   Sigma_ij = 1/(N-1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T + eps I,  eps = 0.01.
3. Inference (Sec. 3.3, Eq. 2): M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij)),
   the map upsampled to the image and smoothed (Gaussian, sigma 4, as in the
   reference code); the image score is the map's maximum.

All positions are handled at once: batched covariances and inverses via
``torch.linalg``. Memory: the P inverse covariances take P d^2 floats (quick profile:
1024 x 100^2, 41 MB; paper profile at 256 px: 4096 x 550^2, 5 GB).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, set_state
from adlab.features import FeatureDetector, batches, images_of, smooth_map, topk_mean
from adlab.progress import progress as progress_bar


@dataclass
class PaDiMConfig:
    """PaDiM hyperparameters; defaults follow the active profile."""

    # Sec. 4 (experimental setups): ResNet-18 and Wide ResNet-50-2, ImageNet-pretrained.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="wide_resnet50_2"))
    # Sec. 3.1 and the layer ablation: layers 1-3 (fine and semantic levels together).
    # Quick profile: layers 1-2. At 128 px layer3 is a coarse 8 x 8 grid, and a random-init
    # network's deeper layers carry no learned semantics (see notebook 03's comparison).
    layers: tuple = field(default_factory=lambda: by_profile(
        quick=("layer1", "layer2"), paper=("layer1", "layer2", "layer3")))
    # Experiments ("Rd" reduction): d = 100 of 448 dims (R18) or 550 of 1792 (WR50);
    # quick: 100 of the 192 dims of ResNet-18 layers 1-2.
    d: int = field(default_factory=lambda: by_profile(quick=100, paper=550))
    # Sec. 3.2, Eq. (1): regularisation term eps I with eps = 0.01.
    epsilon: float = 0.01
    # Reference code: scipy gaussian_filter(sigma=4) on the upsampled map.
    sigma: float = 4.0
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    # Seed of the random channel subset (and of a random-init backbone).
    seed: int = 0
    batch_size: int = 32       # feature extraction batch (memory only)
    chunk: int = 256           # positions per batched covariance inverse (memory only)


# ----------------------------------------------------------------------------- equations

def embedding_concat(features: list[torch.Tensor]) -> torch.Tensor:
    """Sec. 3.1: upsample every map to the first (finest) one's grid and concatenate channels.

    Nearest-neighbour upsampling copies each coarse vector into the block of fine
    positions it covers, which is what the reference code's unfold / fold does.
    ``features``: list of ``[B, C_l, h_l, w_l]`` -> ``[B, sum_l C_l, h_1, w_1]``.
    """
    size = features[0].shape[-2:]
    return torch.cat([features[0]] + [F.interpolate(f, size=size, mode="nearest")
                                      for f in features[1:]], dim=1)


def random_channels(total: int, d: int, seed: int = 0) -> torch.Tensor:
    """Sec. 3.1 "random dimensionality reduction": d of ``total`` channels, seeded, sorted."""
    if not 0 < d <= total:
        raise ValueError(f"PaDiM keeps d of the {total} embedding channels; d={d} is out of range "
                         f"(use 0 < d <= {total}).")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:d].sort().values


def covariance(x: torch.Tensor, epsilon: float = 0.01) -> torch.Tensor:
    """Sec. 3.2, Eq. (1): ``Sigma_ij = 1/(N-1) sum_k (x^k - mu)(x^k - mu)^T + eps I`` per position.

    ``x``: ``[N, P, d]`` embeddings of N training images at P positions -> ``[P, d, d]``
    (in ``x``'s dtype).
    """
    n, _, d = x.shape
    if n < 2:
        raise ValueError(f"PaDiM needs at least 2 training images to estimate a covariance; got {n}.")
    xc = (x - x.mean(0)).transpose(0, 1)                                  # [P, N, d]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return xc.transpose(1, 2) @ xc / (n - 1) + epsilon * eye


def gaussian_parameters(x: torch.Tensor, epsilon: float = 0.01, chunk: int = 256):
    """Fit the per-position Gaussians: ``mu [P, d]`` and ``Sigma^-1 [P, d, d]`` (Sec. 3.2).

    The covariance (Eq. 1) and its batched inverse are computed in float64, ``chunk``
    positions at a time, so only the inverses are kept (memory ``P d^2`` floats).
    ``Sigma + eps I`` is symmetric positive definite, so the inverse goes through its
    Cholesky factor (the official code calls ``np.linalg.inv``: the same matrix to float64
    rounding). A general LU inverse (``torch.linalg.inv``) failed here once on 256 matrices
    of 550 x 550 inside a multi-threaded pytest worker ("Intel oneMKL ERROR: Parameter 6
    was incorrect on entry to DLASWP", then "Pivots given to lu_solve must all be greater
    or equal to 1"); Cholesky uses no pivots.
    """
    mu = x.mean(0)
    p, d = mu.shape
    sigma_inv = torch.empty(p, d, d, dtype=x.dtype, device=x.device)
    for s in range(0, p, chunk):
        sigma = covariance(x[:, s:s + chunk].double(), epsilon)
        factor, info = torch.linalg.cholesky_ex(sigma)
        if info.any():
            raise ValueError("PaDiM: a covariance is not positive definite (its Cholesky "
                             "factorisation failed); the embeddings hold NaN or infinite values, "
                             "or epsilon is <= 0. Check the images and the backbone's output.")
        sigma_inv[s:s + chunk] = torch.cholesky_inverse(factor).to(x.dtype)
    return mu, sigma_inv


def mahalanobis(x: torch.Tensor, mu: torch.Tensor, sigma_inv: torch.Tensor) -> torch.Tensor:
    """Sec. 3.3, Eq. (2): ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))``.

    ``x [B, P, d]``, ``mu [P, d]``, ``sigma_inv [P, d, d]`` -> distances ``[B, P]``.
    """
    delta = x - mu
    m2 = torch.einsum("bpi,pij,bpj->bp", delta, sigma_inv, delta)
    return m2.clamp_min(0).sqrt()


# ----------------------------------------------------------------------------- detector

class PaDiM(FeatureDetector):
    """PaDiM detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``channels`` (the d kept channel indices), ``mu [P, d]``,
    ``sigma_inv [P, d, d]`` and ``grid`` (h, w) of the embedding positions.
    """

    Config = PaDiMConfig

    def __init__(self, config: PaDiMConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.image_size = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> reduced embeddings ``[B, P, d]`` (Sec. 3.1)."""
        e = embedding_concat(self._extractor()(images))          # [B, C, h, w]
        self.grid = tuple(e.shape[-2:])
        e = e.index_select(1, self.channels.to(e.device))
        return e.flatten(2).transpose(1, 2)                      # [B, h*w, d]

    def fit(self, train, progress: bool = True) -> "PaDiM":
        """Learn mu_ij and Sigma_ij^-1 from defect-free images (an ADDataset or a tensor)."""
        c = self.config
        images = images_of(train)
        self.image_size = tuple(images.shape[-2:])
        extractor = self._extractor()
        self.channels = random_channels(sum(extractor.channels), c.d, c.seed)
        x = torch.cat([self.embed(b) for b in progress_bar(list(batches(images, c.batch_size)),
                                                           desc="PaDiM: embed train",
                                                           disable=not progress)])
        self.mu, self.sigma_inv = gaussian_parameters(x, c.epsilon, c.chunk)
        return self

    def state_dict(self) -> dict:
        """Backbone weights, the kept channels, mu and Sigma^-1 (see ``adlab.detector.save_detector``)."""
        return get_state(self, ("extractor", "channels", "mu", "sigma_inv", "grid", "image_size"))

    def load_state_dict(self, state: dict) -> None:
        self._extractor()
        set_state(self, state)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Mahalanobis map (Eq. 2) upsampled + blurred; image score = max of the map."""
        if self.image_size is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"PaDiM models each position of a {self.image_size} image; got images "
                             f"of size {tuple(images.shape[-2:])}. Resize them (load_dataset(..., "
                             f"image_size=...)) to the training size.")
        distances = mahalanobis(self.embed(images), self.mu, self.sigma_inv)   # [B, P]
        maps = smooth_map(distances.view(len(images), *self.grid), self.image_size,
                          self.config.sigma)
        return Prediction(topk_mean(maps, 1), maps)


__all__ = ["PaDiM", "PaDiMConfig", "embedding_concat", "random_channels", "covariance",
           "gaussian_parameters", "mahalanobis"]
