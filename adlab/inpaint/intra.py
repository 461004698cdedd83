"""InTra: the Inpainting Transformer detector (Pirnay & Chai, ICIAP 2021, arXiv:2104.13897).

No official code exists, and the public re-implementations we know of do not reproduce the
paper's numbers: everything here is written from the paper; each choice it leaves open is
marked "paper silent" below and in :mod:`adlab.inpaint.model`. The paper's settings (K 16,
L 7, D 512, 13 blocks, 8 heads, 256 px, MS-GMS at 4 scales with c = 0.0026) are those of our
notes on the paper (``METHODS.md``); the section numbers and the loss weights
(``alpha = beta = 0.01``) are from our reading of the paper and were not re-checked against
its text when this file was written: check them before quoting them.

* Training (Sec. 3): random windows of ``L x L`` patches from defect-free images, one random
  patch of each hidden; the network (:class:`~adlab.inpaint.model.InTraNet`) inpaints it,
  loss ``L2 + alpha MS-GMS + beta SSIM`` (:class:`~adlab.inpaint.model.InTraLoss`).
* Inference (Sec. 3, "Inference"): every patch is inpainted from a window placed around it,
  centred where the grid allows and shifted inwards at the borders
  (:func:`centred_windows`); the inpainted patches form the inpainted image; the anomaly map
  is the multi-scale GMS difference between image and inpainted image (4 scales,
  :func:`~adlab.inpaint.similarity.msgms_difference`; per colour channel, maximum over
  channels, by default: paper silent on colour, see ``per_channel_map``), smoothed by a mean filter and then a
  Gaussian (:func:`smooth`); the image score is the maximum of the map.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pathlib import Path

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.flows.pyramidflow import one_thread
from adlab.inpaint.model import InTraLoss, InTraNet, patchify, unpatchify
from adlab.inpaint.similarity import gaussian_filter, msgms_difference


#: Small detectors shipped with the package (notebook 30 loads them): ``intra_stone.pt`` and
#: ``autoencoder_stone.pt``, each written by ``python -m adlab train METHOD --category stone
#: --out adlab/checkpoints/METHOD_stone.pt`` with the quick profile's defaults and seed 0.
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@dataclass
class InTraConfig:
    """InTra hyperparameters; defaults follow the active profile."""

    # Side the images are resized to. Paper: 256 px (Sec. 4). Quick: 128 px (the synthetic data's
    # size; at 64 px the weave pattern is too fine to inpaint: weave image AUROC 0.51 vs 0.85).
    image_size: int = field(default_factory=lambda: by_profile(quick=128, paper=256))
    # Patch side K. Paper: 16 (Sec. 4). Quick: 4 (a 32 x 32 grid). Our runs on stone, 300 steps,
    # L2 only: K = 8, L = 5 stayed at the "mean colour" plateau (0.0093, the MSE of predicting the
    # mean colour); K = 8, L = 3 reached 0.0084; K = 4, L = 3 reached 0.0045.
    patch_size: int = field(default_factory=lambda: by_profile(quick=4, paper=16))
    # Window side L in patches. Paper: 7 (Sec. 4). Quick: 3, the hidden patch and its 8
    # neighbours (see patch_size).
    window: int = field(default_factory=lambda: by_profile(quick=3, paper=7))
    # Embedding size D, blocks, heads. Paper: 512, 13, 8 (Sec. 4). Quick: 64, 5, 4.
    dim: int = field(default_factory=lambda: by_profile(quick=64, paper=512))
    depth: int = field(default_factory=lambda: by_profile(quick=5, paper=13))
    heads: int = field(default_factory=lambda: by_profile(quick=4, paper=8))
    # "mfsa" (the paper's multihead feature self-attention) or "msa" (plain; the ablation).
    attention: str = "mfsa"
    # Long residual connections early -> late blocks (paper Sec. 3); off for the ablation.
    long_residual: bool = True
    # "global" (the paper: learned embedding over the whole image grid) or "local" (ablation).
    position: str = "global"
    # Loss weights of MS-GMS and SSIM next to L2 (paper: alpha = beta = 0.01, as we read it;
    # the unofficial jhy12/inpainting-transformer keeps `mse + 0.01 * msgms + 0.01 * ssim` as a
    # commented-out line of model.py `_compute_loss` and trains with all weights 1).
    alpha: float = 0.01
    beta: float = 0.01
    # GMS scales for the loss and the map (paper: 4, following RIAD).
    scales: int = 4
    # Map from the GMS difference of each colour channel, maximum over channels (True), or of
    # the grey image (False). Paper silent on colour: our choice. Measured on the synthetic
    # data, quick profile, seed 0, image AUROC grey -> per channel: weave 0.848 -> 0.878,
    # stone 0.889 -> 0.964, nut 0.647 -> 0.714, pins 0.655 -> 0.755.
    per_channel_map: bool = True
    # Adam. Paper silent as far as our notes go: lr 1e-4 is the usual transformer choice;
    # quick: 2e-3, since the tiny model trains for a few hundred steps only.
    lr: float = field(default_factory=lambda: by_profile(quick=2e-3, paper=1e-4))
    # Images per step and windows drawn per image (paper silent: our choice; 256 windows per
    # step in the paper profile). Quick: 16 x 32 = 512 windows per step. Measured on the
    # synthetic data, 600 steps, seed 0, image AUROC pins / nut: 4 windows per image
    # 0.755 / 0.714, 16: 0.822 / 0.762, 32: 0.914 / 0.814 (fit ~130 s with one thread on the
    # shared machine); 64 windows for 300 steps 0.848 / 0.734; 16 for 1200 steps 0.869 / 0.844;
    # 32 with lr 4e-3 0.886 / 0.802. K = 8 with L = 5 (16 windows): 0.898 / 0.656.
    batch_size: int = field(default_factory=lambda: by_profile(quick=16, paper=32))
    windows_per_image: int = field(default_factory=lambda: by_profile(quick=32, paper=8))
    # Optimiser steps (paper: trained to convergence, number of steps not in our notes).
    # Quick: 600 steps (see windows_per_image).
    steps: int = field(default_factory=lambda: by_profile(quick=600, paper=20000))
    # Smoothing of the map (paper: a mean filter, then a Gaussian; sizes silent in our notes).
    # Our choice: mean filter of K + 1 px (odd; 17 at 256 px), Gaussian sigma K / 4 (4 at 256 px).
    # (Quick, 5 px / sigma 1: the best or near it of 5 settings on weave and stone, our runs.)
    mean_filter: int | None = None
    sigma: float | None = None
    seed: int = 0
    predict_batch: int = 256    # windows per forward pass at test time (memory only)
    # One CPU thread for training and predicting (the quick model is tiny; see pyramidflow).
    single_thread: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))


def random_windows(n: int, grid: tuple[int, int], window: int, generator=None):
    """``n`` random windows ``(top, left)`` inside the grid and a random hidden position each."""
    top = torch.randint(grid[0] - window + 1, (n,), generator=generator)
    left = torch.randint(grid[1] - window + 1, (n,), generator=generator)
    hidden = torch.randint(window ** 2, (n,), generator=generator)
    return top, left, hidden


def centred_windows(grid: tuple[int, int], window: int):
    """For every patch ``(i, j)`` of the grid (row-major): the window that inpaints it.

    ``top = clamp(i - L // 2, 0, G_h - L)``: centred on the patch where possible, shifted
    inwards at the borders; ``hidden`` is the patch's position inside that window.
    """
    gh, gw = grid
    i, j = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    top = (i - window // 2).clamp(0, gh - window)
    left = (j - window // 2).clamp(0, gw - window)
    return top, left, (i - top) * window + (j - left)


def resized(images: Tensor, side: int, device) -> Tensor:
    """``images`` as float on ``device``, resized (bilinear, antialiased) to ``side x side``."""
    images = images.to(device).float()
    if images.shape[-2:] != (side, side):
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                               antialias=True)
    return images


def smooth(maps: Tensor, mean_filter: int, sigma: float) -> Tensor:
    """Mean filter (``mean_filter`` px square, borders averaged over the pixels inside), then a
    Gaussian (``sigma``, scipy ``reflect`` borders): ``[B, H, W] -> [B, H, W]``."""
    x = maps[:, None]
    if mean_filter > 1:
        x = F.avg_pool2d(x, mean_filter, stride=1, padding=mean_filter // 2, count_include_pad=False)
    if sigma > 0:
        x = gaussian_filter(x, sigma, truncate=4.0)
    return x[:, 0]


class InTra:
    """InTra detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``net`` (the :class:`~adlab.inpaint.model.InTraNet`) and ``history`` (the
    loss per step). :meth:`inpaint` returns the inpainted images.
    """

    Config = InTraConfig

    def __init__(self, config: InTraConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(InTraConfig, config, overrides)
        self.device = device()
        self.net = None
        c = self.config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size={c.image_size} must be a multiple of patch_size="
                             f"{c.patch_size}; change one of them.")
        self.grid = (c.image_size // c.patch_size,) * 2

    def _build(self) -> None:
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.net = InTraNet(self.grid, c.patch_size, c.window, c.dim, c.depth, c.heads,
                                c.attention, c.long_residual, c.position).to(self.device)
        # a K-px patch has log2(K) + 1 scales (16 px: 4, the paper's; 4 px: 3)
        self.criterion = InTraLoss(c.alpha, c.beta, min(c.scales, c.patch_size.bit_length()))

    def _input(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InTra expects images [B, 3, H, W] in [0, 1]; got shape "
                             f"{tuple(images.shape)}.")
        return resized(images, self.config.image_size, self.device)

    def loss(self, images: Tensor) -> Tensor:
        """Random windows of ``images``, one hidden patch each; the inpainting loss."""
        c = self.config
        x = self._input(images)
        grid, raw = patchify(self._normalize(x), c.patch_size), patchify(x, c.patch_size)
        image = torch.arange(len(images)).repeat_interleave(c.windows_per_image)
        image, top, left, hidden = (t.to(self.device) for t in
                                    (image, *random_windows(len(image), self.grid, c.window)))
        pred = self.net(grid, top, left, hidden, image)
        rows, cols = top + hidden // c.window, left + hidden % c.window
        shape = (-1, 3, c.patch_size, c.patch_size)
        return self.criterion(raw[image, rows, cols].reshape(shape),
                              self._denormalize(pred.reshape(shape)))

    def _normalize(self, x: Tensor) -> Tensor:
        """Pixels standardised by the training images' channel mean and std (paper silent: ours,
        so the linear patch embedding sees zero-mean inputs); the head predicts in these units."""
        return (x - self.pixel_mean) / self.pixel_std

    def _denormalize(self, x: Tensor) -> Tensor:
        return x * self.pixel_std + self.pixel_mean

    def fit(self, train, progress: bool = True) -> "InTra":
        """Train the inpainting transformer on defect-free images."""
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress)

    def training_run(self, train, steps: int | None = None):
        """Network, Adam, the inpainting loss on random image batches, for :func:`adlab.train.train`."""
        from adlab.features import images_of
        from adlab.train import RandomBatches, TrainingRun

        c = self.config
        images = images_of(train)
        self._build()
        self.pixel_mean = images.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).to(self.device)
        self.pixel_std = images.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, 3, 1, 1).to(self.device)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        batches_ = RandomBatches(images, min(c.batch_size, len(images)), c.seed)
        return TrainingRun(self.loss, batches_, steps or c.steps, optimizer, {"net": self.net},
                           seed=c.seed, desc="InTra", context=lambda: one_thread(c.single_thread))

    def finish_training(self, run) -> None:
        self.history = run.history
        self.net.eval()

    def state_dict(self) -> dict:
        """Network weights and the loss history (see ``adlab.detector.save_detector``)."""
        return get_state(self, ("net", "pixel_mean", "pixel_std", "history"))

    def load_state_dict(self, state: dict) -> None:
        self._build()
        set_state(self, state)
        self.net.eval()

    @torch.no_grad()
    def inpaint(self, images: Tensor) -> Tensor:
        """Every patch inpainted from its centred window: ``[B, 3, S, S]`` at ``image_size``."""
        if self.net is None:
            raise RuntimeError("Call fit(train) before predict(images) or inpaint(images).")
        c = self.config
        self.net.eval()
        grid = patchify(self._normalize(self._input(images)), c.patch_size)
        top, left, hidden = centred_windows(self.grid, c.window)
        n = len(top)
        image = torch.arange(len(images)).repeat_interleave(n)
        top, left, hidden = top.repeat(len(images)), left.repeat(len(images)), hidden.repeat(len(images))
        out = []
        for s in range(0, len(image), c.predict_batch):
            part = slice(s, s + c.predict_batch)
            out.append(self.net(grid, top[part].to(self.device), left[part].to(self.device),
                                hidden[part].to(self.device), image[part].to(self.device)))
        patches = torch.cat(out).reshape(len(images), *self.grid, -1)
        return self._denormalize(unpatchify(patches, c.patch_size)).clamp(0, 1)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Map = MS-GMS difference of image and inpainted image, mean filter, Gaussian, upsampled
        (bilinear) to the input size; image score = the map's maximum."""
        c = self.config
        mean_filter = c.mean_filter or c.patch_size + 1
        sigma = c.sigma if c.sigma is not None else c.patch_size / 4
        with one_thread(c.single_thread):
            x = self._input(images)
            diff = msgms_difference(x, self.inpaint(images), c.scales, c.per_channel_map)
            maps = smooth(diff, mean_filter, sigma)
        maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)


__all__ = ["InTra", "InTraConfig", "random_windows", "centred_windows", "smooth", "resized"]
