"""The patch description network (PDN) of EfficientAD (Batzner et al., WACV 2024, Sec. 3.1).

A PDN is four (small) or six (medium) convolutions and two 2x2 average poolings, **without
padding**. Every output cell therefore sees exactly one 33 x 33 patch of the input and
nothing else: a defect can only change the outputs whose patch contains it, which is why
the PDN localises (Sec. 3.1, Fig. 3). A 256 px image gives a 56 x 56 map.

Layouts (paper Sec. 3.1; nelson1425/EfficientAD ``common.py:64-101``):

* PDN-S: Conv(3, 128, 4) ReLU AvgPool(2, 2) · Conv(128, 256, 4) ReLU AvgPool(2, 2) ·
  Conv(256, 256, 3) ReLU · Conv(256, C, 4)
* PDN-M: Conv(3, 256, 4) ReLU AvgPool · Conv(256, 512, 4) ReLU AvgPool · Conv(512, 512, 1)
  ReLU · Conv(512, 512, 3) ReLU · Conv(512, C, 4) ReLU · Conv(C, C, 1)

``width`` is the first convolution's channels of PDN-S (128 in the paper; PDN-M doubles it).
Only the quick profile changes it, to make the network cheap on a CPU; the layout is the same.
``padding=True`` is used only while the teacher is pretrained: the reference pads the first
three convolutions (3, 3, 1) and the two poolings (1) so 256 px gives 64 x 64
(``common.py:64-79``, used by ``pretraining.py:71``).
"""
from __future__ import annotations

from torch import nn

#: Receptive field (pixels) of one PDN output cell, S and M alike (Sec. 3.1).
RECEPTIVE_FIELD = 33
#: Input pixels between neighbouring output cells (two 2x2 poolings).
STRIDE = 4


def pdn(size: str = "small", out_channels: int = 384, width: int = 128,
        padding: bool = False) -> nn.Sequential:
    """A PDN-S (``size="small"``) or PDN-M (``"medium"``) with ``out_channels`` outputs."""
    if size not in ("small", "medium"):
        raise ValueError(f"PDN size must be 'small' or 'medium'; got {size!r}.")
    p = 1 if padding else 0
    w = width if size == "small" else 2 * width
    layers = [nn.Conv2d(3, w, 4, padding=3 * p), nn.ReLU(),
              nn.AvgPool2d(2, 2, padding=p),
              nn.Conv2d(w, 2 * w, 4, padding=3 * p), nn.ReLU(),
              nn.AvgPool2d(2, 2, padding=p)]
    if size == "small":
        layers += [nn.Conv2d(2 * w, 2 * w, 3, padding=p), nn.ReLU(),
                   nn.Conv2d(2 * w, out_channels, 4)]
    else:
        layers += [nn.Conv2d(2 * w, 2 * w, 1), nn.ReLU(),
                   nn.Conv2d(2 * w, 2 * w, 3, padding=p), nn.ReLU(),
                   nn.Conv2d(2 * w, out_channels, 4), nn.ReLU(),
                   nn.Conv2d(out_channels, out_channels, 1)]
    return nn.Sequential(*layers)


def output_size(image_size: int) -> int:
    """Side of the PDN's map for a square input without padding (256 -> 56, 128 -> 24)."""
    side = ((image_size - 3) // 2 - 3) // 2 - 2 - 3
    if side < 1:
        raise ValueError(f"A PDN needs images of at least {RECEPTIVE_FIELD} px; got {image_size}.")
    return side


__all__ = ["pdn", "output_size", "RECEPTIVE_FIELD", "STRIDE"]
