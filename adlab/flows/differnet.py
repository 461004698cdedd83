"""DifferNet: "Same Same But DifferNet" (Rudolph, Wandt & Rosenhahn, WACV 2021).

A normalizing flow estimates the density of *image-level* CNN features; an image
whose features are unlikely is defective. Where the paper leaves a detail open this
file does what the official code does (marco-rudolph/differnet, commit 9bdf026;
cited below as file:line):

1. Multi-scale features (Sec. 3.1): AlexNet's convolutional part (``.features``) at
   three input scales (448, 224, 112 px; nearest resizing), each output map
   average-pooled over space, the three 256-vectors concatenated: y in R^768
   (``model.py:39-44``).
2. The flow (Sec. 3.2, Eq. (1)-(2)): 8 blocks of [fixed random permutation, GLOW double
   affine coupling] (``model.py:16-27``), log-scales soft-clamped by
   ``alpha * 0.636 * atan(s / alpha)``, alpha = 3 (Eq. (2); ``config.py:26``,
   ``freia_funcs.py:105-106``); each s-t subnet is Linear-ReLU x 3 with 2048 units,
   then Linear (``freia_funcs.py:20-49``).
3. Training (Sec. 3.3, Eq. (4)): maximum likelihood of z = f(y) under N(0, I),
   loss ``mean(0.5 ||z||^2 - log|det J|) / D`` (``utils.py:43-45``), every training
   image seen under random rotations (``utils.py:10-22``; 4 per image and batch,
   ``config.py:34``).
4. Scoring (Sec. 3.4): the negative log-likelihood ``0.5 ||z||^2`` averaged over a
   set of transformed copies of the test image (64 in the code, ``config.py:35``).
5. Localisation (Sec. 3.5): the gradient of that score with respect to the input,
   Gaussian-smoothed per channel, absolute values summed over channels:
   ``g_x = sum_c |G * d score / d x_c|``, averaged over the transforms.

Our differences, and why:

* The backbone is frozen, so the features of a rotated training image never change.
  ``fit`` computes them once for ``train_pool`` random rotations per image and
  training draws ``n_transforms`` of those per image and step; the official loader
  draws fresh rotations every epoch (192 epochs x 4 = 768 per image). Same
  distribution, far less backbone work on a CPU.
* Test transforms are the evenly spaced rotations ``i * 360 / T`` (deterministic
  scores); the official training-time evaluation draws them at random
  (``utils.py:105``), its gradient maps use the evenly spaced ones
  (``localization.py:35``).
* The official code reports the best epoch by test-set AUROC (``train.py:88-91``).
  We select nothing from data: a fixed number of steps, no test images involved. The
  quick profile's feature standardisation uses the training features only.
* Quick profile (never loads weights): a random-init AlexNet's pooled features do not
  separate the synthetic defects (image AUROC about 0.6-0.75 on weave and stone, and at
  32 px AlexNet has no output left). It uses timm's ResNet-18 stem and first stage
  (``act1``, ``layer1``; random init), pooled at 128, 64 and 32 px, and rotations in
  steps of 90 degrees: on a pixel grid these are exact and add no black corners, which
  for random features dominate the pooled statistics of a 128 px image.
"""
from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile, device, seed_everything
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.features import PretrainedWeightsWarning, batches, gaussian_blur, images_of
from adlab.flows.core import SequentialFlow
from adlab.flows.coupling import GlowCoupling
from adlab.flows.permute import RandomPermutation
from adlab.progress import progress as progress_bar
from adlab.train import RandomBatches, TrainingRun, train_detector

#: AlexNet ``.features`` ends with 256 channels (torchvision ``alexnet.py``; DifferNet
#: ``config.py:31``: ``n_feat = 256 * n_scales``).
ALEXNET_CHANNELS = 256
#: The smallest input AlexNet ``.features`` accepts: its third max-pool needs a 3 x 3 map.
ALEXNET_MIN_SIZE = 63


@dataclass
class DifferNetConfig:
    """DifferNet hyperparameters; defaults follow the active profile."""

    # Sec. 3.1 / model.py:33: AlexNet (torchvision architecture, ImageNet weights). Quick: the
    # timm ResNet-18 stages in ``layers``, random init (see the module docstring).
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18", paper="alexnet"))
    # timm backbones only: the pooled stages. AlexNet always gives its whole ``.features``.
    layers: tuple = field(default_factory=lambda: by_profile(quick=("act1", "layer1"), paper=()))
    # Sec. 4.2 / config.py:14: images resized to 448 x 448. Quick: 128 px (profile size).
    input_size: int = field(default_factory=lambda: by_profile(quick=128, paper=448))
    # Sec. 3.1 / config.py:25: 3 scales, input_size / 2^s (448, 224, 112 px).
    n_scales: int = 3
    # Sec. 4.2 / config.py:27: 8 coupling blocks.
    n_blocks: int = 8
    # Eq. (2) / config.py:26: soft-clamp alpha = 3.
    clamp: float = 3.0
    # config.py:28: 2048 hidden units per s-t layer (freia_funcs.py:20-49: three hidden
    # Linear-ReLU layers). Quick: 256, about 60x fewer flow weights for a CPU.
    hidden: int = field(default_factory=lambda: by_profile(quick=256, paper=2048))
    # train.py:36: Adam, lr 2e-4, betas (0.8, 0.8), eps 1e-4, weight decay 1e-5.
    lr: float = 2e-4
    # config.py:34: 4 random transforms per image in training; config.py:36: 24 images/batch.
    n_transforms: int = 4
    batch_size: int = 24
    # config.py:41-42: 24 x 8 = 192 epochs; with ~250 MVTec training images in batches of
    # 24 that is ~2000 steps. Quick: 300 steps (seed 0, weave / stone image AUROC 0.892 / 0.803
    # after 150 steps, 0.906 / 0.834 after 300).
    steps: int = field(default_factory=lambda: by_profile(quick=300, paper=2000))
    # config.py:35: 64 transforms per test image. Quick: 4 (0, 90, 180, 270 degrees: the
    # quick training angles; each costs a backbone pass and, for the map, a backward pass).
    n_transforms_test: int = field(default_factory=lambda: by_profile(quick=4, paper=64))
    # Random rotations at training time (utils.py:13, RandomRotation(180): uniform over
    # 360 degrees). False trains on the unrotated images only (the paper's ablation).
    rotate_train: bool = True
    # 0: any angle (official); quick: multiples of 90 degrees (see the module docstring).
    angle_step: float = field(default_factory=lambda: by_profile(quick=90.0, paper=0.0))
    # Ours (see module docstring): rotated copies per training image whose features are
    # computed once. Paper: 64 (the official loader draws new ones each epoch).
    train_pool: int = field(default_factory=lambda: by_profile(quick=8, paper=64))
    # Ours, quick only (the official code does not): standardise each feature with the mean
    # and std of the training features. Random-init features are tiny and strongly
    # correlated; unscaled, the flow learns a near-singular density whose score follows
    # noise directions (quick image AUROC ~0.65-0.75 on weave / stone without, ~0.85 with).
    standardize: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))
    # localization.py:62: Gaussian sigma 3 px on each gradient channel.
    sigma: float = 3.0
    # None: the profile's choice (ImageNet AlexNet in the paper profile, random in quick).
    pretrained: bool | None = None
    seed: int = 0
    feature_batch: int = 32       # images per backbone pass (memory only)


# ------------------------------------------------------------------ backbone (Sec. 3.1)

def _alexnet_weights_file() -> Path:
    """Where torchvision looks for AlexNet's ImageNet weights: ``$TORCH_HOME/hub/checkpoints``."""
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def alexnet_features(pretrained: bool, seed: int = 0) -> tuple[nn.Module, bool]:
    """torchvision's AlexNet ``.features`` (the official ``model.py:33``); returns (module, loaded).

    With ``pretrained``, ImageNet weights load through torchvision's weights API from
    ``$TORCH_HOME/hub/checkpoints`` (downloaded once if missing, with a 20 s network
    timeout; with ``HF_HUB_OFFLINE=1`` no download is tried). If they cannot be had, a
    :class:`PretrainedWeightsWarning` says where to put the file and the seeded random
    initialisation is used instead, as :mod:`adlab.features` does for timm backbones.
    """
    from torchvision.models import AlexNet_Weights, alexnet

    with torch.random.fork_rng(devices=[]):
        if pretrained:
            target = _alexnet_weights_file()
            try:
                if not target.exists() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
                    raise FileNotFoundError("offline (HF_HUB_OFFLINE is set) and not cached")
                old = socket.getdefaulttimeout()
                socket.setdefaulttimeout(20)
                try:
                    model = alexnet(weights=AlexNet_Weights.IMAGENET1K_V1)
                finally:
                    socket.setdefaulttimeout(old)
                return model.features, True
            except Exception as exc:  # offline, corrupt file, ...
                warnings.warn(
                    f"AlexNet ImageNet weights could not be loaded ({type(exc).__name__}: "
                    f"{str(exc)[:120]}). Using a RANDOMLY INITIALISED AlexNet (seeded). To use "
                    f"the weights, copy {os.path.basename(target)} (from "
                    f"{AlexNet_Weights.IMAGENET1K_V1.url}) to {target}.",
                    PretrainedWeightsWarning, stacklevel=2)
        torch.manual_seed(seed)
        return alexnet(weights=None).features, False


class MapList(nn.Module):
    """Wrap a module returning one map so it returns ``[map]``, as timm's ``features_only`` models."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.module(x)]


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image ``[B, 3, H, W]`` by its angle (degrees, counter-clockwise) about its centre.

    Bilinear sampling, zero (black) fill outside the original frame, size kept: as
    torchvision's ``rotate(..., expand=False)`` the official code applies (``utils.py:13``
    and ``26``, on PIL images, nearest interpolation). Differentiable in ``images``.
    """
    theta = torch.deg2rad(torch.as_tensor(degrees, dtype=images.dtype, device=images.device))
    theta = theta.expand(images.shape[0])
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    # affine_grid maps output to input coordinates (y pointing down): a counter-clockwise
    # turn of the picture samples the input at the clockwise-turned position.
    matrix = torch.stack([torch.stack([cos, -sin, zero], -1),
                          torch.stack([sin, cos, zero], -1)], -2)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def multiscale_features(backbone: nn.Module, images: Tensor, n_scales: int) -> Tensor:
    """Sec. 3.1: ``y = [pool(f_ex(x_s)) for s in scales]``, ``[B, 3, S, S]`` in [0, 1] -> ``[B, D]``.

    Scale ``s`` is the image resized (nearest, as ``model.py:40``) to ``S / 2^s``; each
    map the backbone returns (a list) is averaged over its positions (``model.py:42``) and
    all are concatenated: ``D = n_scales * sum(C)`` (768 for AlexNet at 3 scales).
    Normalised with the ImageNet mean and standard deviation first (``utils.py:19``).
    """
    from adlab.data.mvtec import normalize

    x = normalize(images)
    pooled = []
    for s in range(n_scales):
        x_s = F.interpolate(x, size=x.shape[-1] // 2 ** s, mode="nearest") if s > 0 else x
        pooled.extend(m.mean(dim=(2, 3)) for m in backbone(x_s))
    return torch.cat(pooled, dim=1)


# ------------------------------------------------------------------ flow (Sec. 3.2)

def st_subnet(hidden: int):
    """s-t network constructor ``(in, out) -> [Linear(h) - ReLU] x 3 - Linear(out)`` (``freia_funcs.py:20-49``).

    The official class also builds a BatchNorm and dropout (rate 0) that its forward never
    uses; they are left out.
    """
    def construct(n_in: int, n_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                             nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_out))
    return construct


def official_permutation(dim: int, seed: int) -> Tensor:
    """The permutation of block ``seed``: ``np.random.seed(seed); np.random.permutation(dim)`` (``freia_funcs.py:58-59``)."""
    return torch.from_numpy(np.random.RandomState(seed).permutation(dim))


def differnet_flow(dim: int, n_blocks: int = 8, hidden: int = 2048, clamp: float = 3.0) -> SequentialFlow:
    """Sec. 3.2: ``n_blocks`` x [fixed permutation (seed k), GLOW coupling with atan clamp] (``model.py:16-27``).

    Each :class:`~adlab.flows.coupling.GlowCoupling` transforms both halves in turn
    (Eq. (1)); the log-scales are clamped by Eq. (2), ``alpha * 0.636 * atan(s / alpha)``.
    For even ``dim`` the halves are the official ones (``freia_funcs.py:92-93``).
    """
    layers = []
    for k in range(n_blocks):
        layers.append(RandomPermutation(dim, perm=official_permutation(dim, k)))
        layers.append(GlowCoupling(dim, st_subnet(hidden), clamp=clamp, clamp_activation="atan"))
    return SequentialFlow(layers)


# ------------------------------------------------------------------ loss and score (Sec. 3.3-3.5)

def nll_loss(z: Tensor, logdet: Tensor) -> Tensor:
    """Eq. (4): ``L(y) = 0.5 ||z||^2 - log|det dz/dy|``, averaged over the batch and divided by ``D``.

    The negative log-likelihood of ``y`` under the flow without the constant
    ``D/2 log(2 pi)``; the division by the dimension ``D`` is the official scaling
    (``utils.py:45``), it only rescales the gradient.
    """
    return torch.mean(0.5 * torch.sum(z ** 2, dim=1) - logdet) / z.shape[1]


def anomaly_score(z: Tensor) -> Tensor:
    """Sec. 3.4: ``tau(x) = mean_i 0.5 ||z_i||^2`` over the transforms ``T_i(x)``; ``z`` is ``[B, T, D]`` -> ``[B]``.

    The log-det term is left out as in the paper's score; the official code computes
    ``mean(z^2)`` (``train.py:89``), the same ranking (ours = its value x D / 2).
    """
    return 0.5 * (z ** 2).sum(dim=2).mean(dim=1)


def gradient_map(grad: Tensor, sigma: float) -> Tensor:
    """Sec. 3.5: ``g_x = sum_c |G * grad_c|`` for gradients ``[B, C, H, W]`` -> ``[B, H, W]``.

    ``G`` is a Gaussian of ``sigma`` px applied to each channel of the signed gradient
    (``localization.py:62``). The official code then takes the mean over transforms and
    channels and squares it for its pictures (``localization.py:66-67``): a monotone
    change that leaves every ranking metric unchanged; we keep the paper's sum.
    """
    b, c, h, w = grad.shape
    smooth = gaussian_blur(grad.reshape(b * c, h, w), sigma).reshape(b, c, h, w)
    return smooth.abs().sum(dim=1)


def test_angles(n: int) -> Tensor:
    """The evenly spaced test rotations ``i * 360 / n`` (``localization.py:35``)."""
    return torch.arange(n, dtype=torch.float32) * 360.0 / n


# ------------------------------------------------------------------ the detector

class DifferNet:
    """DifferNet detector: ``fit(train)`` on defect-free images, ``predict(images) -> Prediction``.

    ``predict`` scores each image by :func:`anomaly_score` over ``n_transforms_test``
    evenly spaced rotations and maps it by :func:`gradient_map` of that score with
    respect to the image (through the rotations, so each transform's gradient is in the
    image's own frame), averaged over the transforms.
    """

    Config = DifferNetConfig

    def __init__(self, config: DifferNetConfig | None = None, **overrides):
        self.config = make_config(DifferNetConfig, config, overrides)
        self.device = device()
        self.backbone = None
        self.flow = None
        self.history: list[float] = []
        self.mean = self.std = None  # feature standardisation (config.standardize)
        self.weights_loaded = False

    # -- pieces the notebook uses too
    def build(self) -> "DifferNet":
        """Create the frozen backbone and an untrained flow (seeded)."""
        c = self.config
        smallest = c.input_size // 2 ** (c.n_scales - 1)
        if c.backbone == "alexnet" and smallest < ALEXNET_MIN_SIZE:
            raise ValueError(
                f"DifferNet: input_size={c.input_size} with n_scales={c.n_scales} feeds AlexNet "
                f"{smallest} px at the smallest scale, below its minimum of {ALEXNET_MIN_SIZE} px; "
                f"use fewer scales or input_size >= {ALEXNET_MIN_SIZE * 2 ** (c.n_scales - 1)}.")
        pretrained = c.pretrained
        if pretrained is None:
            from adlab.config import profile
            pretrained = profile().pretrained
        if c.backbone == "alexnet":
            features, self.weights_loaded = alexnet_features(pretrained, c.seed)
            backbone = MapList(features)
        else:
            from adlab.features import create_backbone, layer_indices
            backbone, self.weights_loaded = create_backbone(
                c.backbone, layer_indices(c.backbone, c.layers), pretrained, c.seed)
        self.backbone = backbone.to(self.device).eval().requires_grad_(False)
        with torch.no_grad():
            probe = torch.zeros(1, 3, c.input_size, c.input_size, device=self.device)
            dim = multiscale_features(self.backbone, probe, c.n_scales).shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.flow = differnet_flow(dim, c.n_blocks, c.hidden, c.clamp).to(self.device)
        return self

    def _resize(self, images: Tensor) -> Tensor:
        size = self.config.input_size
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    @torch.no_grad()
    def features(self, images: Tensor, angles: Tensor) -> Tensor:
        """Features of every image under every angle: ``[B, 3, H, W]``, ``[B, T]`` -> ``[B, T, D]``."""
        out = []
        for start in range(0, len(images), max(1, self.config.feature_batch // angles.shape[1])):
            x = self._resize(images[start:start + max(1, self.config.feature_batch
                                                          // angles.shape[1])])
            a = angles[start:start + len(x)].to(self.device)
            t = a.shape[1]
            rotated = rotate(x.repeat_interleave(t, dim=0), a.reshape(-1))
            y = multiscale_features(self.backbone, rotated, self.config.n_scales)
            out.append(y.view(len(x), t, -1))
        return torch.cat(out)

    def train_features(self, images: Tensor) -> Tensor:
        """Sec. 4.2: features of ``train_pool`` random rotations per image (``[N, P, D]``)."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        if c.rotate_train and c.angle_step > 0:
            steps = round(360 / c.angle_step)
            angles = torch.randint(0, steps, (len(images), c.train_pool), generator=g) * c.angle_step
        elif c.rotate_train:
            angles = torch.rand(len(images), c.train_pool, generator=g) * 360.0
        else:
            angles = torch.zeros(len(images), 1)
        return self.features(images, angles)

    def fit_flow(self, pool: Tensor, progress: bool = True) -> list[float]:
        """Train the flow on pooled features ``[N, P, D]`` with Eq. (4) through :func:`adlab.train.train`."""
        train_detector(self, self.flow_run(pool), progress)
        return self.history

    def flow_run(self, pool: Tensor, steps: int | None = None) -> TrainingRun:
        """Standardise the pooled features ``[N, P, D]``; the loss (Eq. (4)), batches and
        optimiser of the flow, for :func:`adlab.train.train`."""
        c = self.config
        n_t = min(c.n_transforms, pool.shape[1])  # without train transforms the pool is 1 wide
        flat = pool.reshape(-1, pool.shape[2])
        if c.standardize:
            self.mean, self.std = flat.mean(0), flat.std(0) + 1e-6
        else:
            self.mean, self.std = torch.zeros_like(flat[0]), torch.ones_like(flat[0])
        pool = (pool - self.mean) / self.std

        def loss_fn(batch: Tensor) -> Tensor:
            # n_t distinct rotations per image, drawn from the global RNG (seeded and
            # checkpointed by adlab.train.train)
            cols = torch.rand(batch.shape[:2]).argsort(dim=1)[:, :n_t].to(batch.device)
            y = torch.gather(batch, 1, cols[..., None].expand(-1, -1, batch.shape[2]))
            z, logdet = self.flow(y.reshape(-1, batch.shape[2]))
            return nll_loss(z, logdet)

        optimizer = torch.optim.Adam(self.flow.parameters(), lr=c.lr, betas=(0.8, 0.8),
                                     eps=1e-4, weight_decay=1e-5)
        return TrainingRun(loss_fn, RandomBatches(pool.to(self.device), c.batch_size, c.seed),
                           steps or c.steps, optimizer, {"flow": self.flow}, seed=c.seed,
                           desc="differnet")

    def finish_training(self, run: TrainingRun) -> None:
        self.history = run.history
        self.flow.eval()

    def fit(self, train_data, progress: bool = True) -> "DifferNet":
        """Train on defect-free images only (an ADDataset or a tensor ``[N, 3, H, W]``)."""
        return train_detector(self, self.training_run(train_data), progress)

    def training_run(self, train_data, steps: int | None = None) -> TrainingRun:
        """Backbone, flow and the training features of ``train_data``, then :meth:`flow_run`."""
        images = images_of(train_data)
        seed_everything(self.config.seed)
        self.build()
        return self.flow_run(self.train_features(images), steps)

    def state_dict(self) -> dict:
        """Backbone and flow weights, the feature statistics (see ``adlab.detector.save_detector``)."""
        return get_state(self, ("backbone", "flow", "mean", "std", "history"))

    def load_state_dict(self, state: dict) -> None:
        self.build()
        set_state(self, state)
        self.flow.eval()

    def _check_fitted(self):
        if self.flow is None:
            raise RuntimeError("DifferNet is not fitted: call fit(train_images) before predict.")

    @torch.no_grad()
    def score_features(self, feats: Tensor) -> Tensor:
        """Sec. 3.4 on precomputed test features ``[B, T, D]`` -> scores ``[B]``."""
        self._check_fitted()
        y = (feats.reshape(-1, feats.shape[2]).to(self.device) - self.mean) / self.std
        z, _ = self.flow(y)
        return anomaly_score(z.view(feats.shape))

    def predict(self, images: Tensor) -> Prediction:
        """Scores (Sec. 3.4) and gradient maps (Sec. 3.5) at the input resolution."""
        self._check_fitted()
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DifferNet.predict expects images [B, 3, H, W] in [0, 1]; got "
                             f"shape {tuple(images.shape)}.")
        c = self.config
        angles = test_angles(c.n_transforms_test).to(self.device)
        t = len(angles)
        scores, maps = [], []
        for chunk in batches(images, max(1, c.feature_batch // t)):
            x = self._resize(chunk)
            # one leaf per transform, so each transform's gradient can be smoothed on its own
            x_t = x.repeat_interleave(t, dim=0).requires_grad_(True)
            with torch.enable_grad():
                y = multiscale_features(self.backbone, rotate(x_t, angles.repeat(len(x))),
                                        c.n_scales)
                z, _ = self.flow((y - self.mean) / self.std)
                score = anomaly_score(z.view(len(x), t, -1))
                (grad,) = torch.autograd.grad(score.sum(), x_t)
            g = gradient_map(grad, c.sigma).view(len(x), t, *x.shape[-2:]).mean(dim=1)
            if g.shape[-2:] != chunk.shape[-2:]:
                g = F.interpolate(g[:, None], size=chunk.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0]
            scores.append(score.detach())
            maps.append(g.detach())
        return Prediction(torch.cat(scores), torch.cat(maps))


__all__ = ["DifferNet", "DifferNetConfig", "alexnet_features", "rotate", "multiscale_features",
           "st_subnet", "official_permutation", "differnet_flow", "nll_loss", "anomaly_score",
           "gradient_map", "test_angles"]
