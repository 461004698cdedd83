"""ActNorm: per-channel affine map, data-dependent init (Glow, Kingma & Dhariwal 2018, Sec. 3.1).

    z = s * x + b   per channel,   log|det J| = h * w * sum_c log|s_c|   (Table 1)

Glow initialises ``b`` and ``s`` from the first minibatch so that the outputs have
zero mean and unit variance per channel, then trains them as ordinary parameters
(a batch-norm replacement that works with small batches). ``s`` is stored as
``log_s`` so it stays positive.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from adlab.flows.core import FlowLayer, check_features, per_channel, spatial_size


class ActNorm(FlowLayer):
    """Glow's activation normalisation (Sec. 3.1, Table 1), vectors ``[B, C]`` or maps ``[B, C, H, W]``.

    The first ``forward`` call (while ``initialized`` is false) sets, per channel,
    ``s = 1 / (std + eps)`` and ``b = -mean * s`` from that batch (statistics over the
    batch and spatial dimensions), so that batch's output has zero mean and unit
    variance. ``initialized`` is a buffer, so a loaded ``state_dict`` is not re-initialised.
    Set ``data_init=False`` to start from the identity instead.
    """

    def __init__(self, channels: int, eps: float = 1e-6, data_init: bool = True):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.log_s = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(not data_init))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Glow Sec. 3.1: per-channel ``b, s`` giving ``s * x + b`` zero mean, unit variance on ``x``."""
        values = x.transpose(0, 1).reshape(self.channels, -1)  # [C, B*H*W]
        if values.shape[1] < 2:
            raise ValueError(
                "ActNorm's data-dependent initialisation needs at least 2 values per channel; "
                "call it first with a batch of 2 or more samples (or use data_init=False).")
        mean, std = values.mean(dim=1), values.std(dim=1, unbiased=False)
        self.log_s.copy_(-torch.log(std + self.eps))
        self.b.copy_(-mean * torch.exp(self.log_s))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.channels, type(self).__name__)
        if not bool(self.initialized):
            self.initialize(x)
        z = x * per_channel(torch.exp(self.log_s), x) + per_channel(self.b, x)
        logdet = spatial_size(x) * self.log_s.sum()
        return z, logdet.expand(x.shape[0]).clone()

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        check_features(z, self.channels, type(self).__name__)
        return (z - per_channel(self.b, z)) * per_channel(torch.exp(-self.log_s), z)
