"""A plain convolutional autoencoder: the baseline InTra is compared with (issue #13).

The autoencoder sees the *whole* image, defects included, and may learn to copy them; InTra
never sees the pixels it predicts. To compare only that difference, the autoencoder is scored
exactly as InTra: multi-scale GMS difference of image and reconstruction, the same mean filter
and Gaussian, image score = maximum (:func:`adlab.inpaint.intra.smooth`).

Architecture (our choice, the usual small one): four stride-2 3 x 3 convolutions
(3 -> 32 -> 64 -> 128 -> 128, LeakyReLU 0.2), a 1 x 1 bottleneck of ``bottleneck`` channels
at 1/16 of the side, and the mirror image with transposed convolutions, sigmoid output.
Trained with the L2 loss and Adam.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.flows.pyramidflow import one_thread
from adlab.inpaint.intra import resized, smooth
from adlab.inpaint.similarity import msgms_difference


@dataclass
class AutoencoderConfig:
    image_size: int = field(default_factory=lambda: by_profile(quick=128, paper=256))  # as InTra
    bottleneck: int = 16          # channels at 1/16 of the side (quick: 8 x 8 x 16 = 1024 numbers)
    lr: float = 1e-3
    batch_size: int = 16
    steps: int = field(default_factory=lambda: by_profile(quick=600, paper=20000))  # as InTra
    mean_filter: int = 5          # as InTra's quick map smoothing (K + 1, sigma K / 4, K = 4)
    sigma: float = 1.0
    scales: int = 4
    per_channel_map: bool = True  # as InTra's map (GMS per colour channel, max over channels)
    seed: int = 0
    single_thread: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))


def conv_autoencoder(bottleneck: int = 16) -> nn.Sequential:
    act = lambda: nn.LeakyReLU(0.2)
    widths = [3, 32, 64, 128, 128]
    enc = [m for a, b in zip(widths, widths[1:]) for m in (nn.Conv2d(a, b, 3, 2, 1), act())]
    dec = [m for a, b in zip(widths[::-1], widths[::-1][1:])
           for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), act())]
    return nn.Sequential(*enc, nn.Conv2d(128, bottleneck, 1), act(), nn.Conv2d(bottleneck, 128, 1),
                         act(), *dec[:-1], nn.Sigmoid())


class ConvAutoencoder:
    """``fit(train)`` / ``predict(images) -> Prediction``, the detector protocol."""

    Config = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(AutoencoderConfig, config, overrides)
        self.device = device()
        self.net = None

    def _build(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = conv_autoencoder(self.config.bottleneck).to(self.device)

    def _input(self, images):
        return resized(images, self.config.image_size, self.device)

    def reconstruct(self, images):
        return self.net(self._input(images))

    def fit(self, train, progress: bool = True):
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress)

    def training_run(self, train, steps: int | None = None):
        from adlab.features import images_of
        from adlab.train import RandomBatches, TrainingRun

        c = self.config
        images = images_of(train)
        self._build()
        loss = lambda b: F.mse_loss(self.reconstruct(b), self._input(b))
        return TrainingRun(loss, RandomBatches(images, min(c.batch_size, len(images)), c.seed),
                           steps or c.steps, torch.optim.Adam(self.net.parameters(), lr=c.lr),
                           {"net": self.net}, seed=c.seed, desc="autoencoder",
                           context=lambda: one_thread(c.single_thread))

    def finish_training(self, run):
        self.history = run.history
        self.net.eval()

    def state_dict(self):
        return get_state(self, ("net", "history"))

    def load_state_dict(self, state):
        self._build()
        set_state(self, state)
        self.net.eval()

    @torch.no_grad()
    def predict(self, images):
        if self.net is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        c = self.config
        self.net.eval()
        with one_thread(c.single_thread):
            x = self._input(images)
            diff = msgms_difference(x, self.net(x), c.scales, c.per_channel_map)
            maps = smooth(diff, c.mean_filter, c.sigma)
        maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)


__all__ = ["ConvAutoencoder", "AutoencoderConfig", "conv_autoencoder"]
