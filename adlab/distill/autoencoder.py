"""EfficientAD's autoencoder for logical anomalies (Batzner et al., WACV 2024, Sec. 3.3).

A defect can be made of normal-looking patches: a missing pin, an extra one, a part in the
wrong place. A local PDN cannot see that; an autoencoder that squeezes the whole image
through a 64-number bottleneck can only reconstruct the *global* layouts it saw in training.
It predicts the teacher's features of the whole image, ``A(x) ~ T(x)`` (``L_AE``), and the
student learns a second set of channels that predicts the autoencoder, ``S'(x) ~ A(x)``
(``L_STAE``). On normal images both fail in the same places (fine detail the bottleneck
loses), so their difference is small there; on a logical defect the autoencoder
reconstructs the normal layout while the local student follows the image: the difference is
large.

Layout (paper Sec. 3.3; nelson1425/EfficientAD ``common.py:6-62``): encoder = stride-2
convolutions (kernel 4, padding 1) with 32, 32, 64, 64, 64 channels and ReLU, down to
8 x 8, then Conv(64, 64, 8) to a 1 x 1 code, no ReLU; decoder = bilinear upsampling to
3, 8, 15, 32, 63, 127 pixels, each followed by Conv(64, 64, 4, padding 2) ReLU Dropout(0.2),
then upsampling to the PDN's map size, Conv(64, 64, 3, padding 1) ReLU, Conv(64, C, 3,
padding 1). Smaller inputs (the quick profile) use fewer stride-2 stages (log2(size / 8))
and the sizes given in ``decoder_sizes``.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

#: Upsampling sizes of the decoder for 256 px inputs (common.py:26-51).
PAPER_DECODER_SIZES = (3, 8, 15, 32, 63, 127)
ENCODER_CHANNELS = (32, 32, 64, 64, 64)


class Upsample(nn.Module):
    """Bilinear resize to a fixed ``size`` (align_corners=False, torch's default)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def autoencoder(out_channels: int = 384, image_size: int = 256, map_size: int = 56,
                decoder_sizes=PAPER_DECODER_SIZES, dropout: float = 0.2) -> nn.Sequential:
    """The EfficientAD autoencoder: images ``[B, 3, S, S]`` -> ``[B, C, map_size, map_size]``."""
    stages = math.log2(image_size / 8)
    if stages != int(stages) or not 1 <= stages <= len(ENCODER_CHANNELS):
        raise ValueError(f"The autoencoder needs an image size of 8 * 2^k (16 .. 256 px); got "
                         f"{image_size}. Resize the images (e.g. image_size=128 or 256).")
    layers, c_in = [], 3
    for c in ENCODER_CHANNELS[:int(stages)]:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]
        c_in = c
    layers.append(nn.Conv2d(c_in, 64, 8))                       # the 1 x 1 code
    for size in decoder_sizes:
        layers += [Upsample(size), nn.Conv2d(64, 64, 4, padding=2), nn.ReLU(), nn.Dropout(dropout)]
    layers += [Upsample(map_size), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
               nn.Conv2d(64, out_channels, 3, padding=1)]
    return nn.Sequential(*layers)


__all__ = ["autoencoder", "Upsample", "PAPER_DECODER_SIZES"]
