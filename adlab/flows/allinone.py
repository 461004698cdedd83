"""FrEIA's ``AllInOneBlock``, written out: the coupling step FastFlow and CFlow are built from.

Both FastFlow (gathierry/FastFlow ``fastflow.py``, ``nf_fast_flow``) and CFlow
(gudovskiy/cflow-ad ``model.py``, ``cflow_head``) stack ``Ff.AllInOneBlock``
modules of the FrEIA library (vislearn/FrEIA
``FrEIA/modules/all_in_one_block.py``). One block is three invertible steps:

1. an affine coupling: ``x = [x1, x2]`` with ``x1`` the first ``ceil(C/2)``
   channels; ``a = 0.1 * NN([x1, c])`` (the whole subnet output is scaled by 0.1,
   shift included); ``s = clamp * tanh(a_s)``; ``x2' = x2 * exp(s) + a_t``;
2. a learned global affine map per channel, ``y = x * g + b`` with
   ``g = 0.1 * softplus_{beta=0.5}(gamma)`` initialised to ``g = 1`` and ``b = 0``;
   its log-det is ``H W sum_c log g_c``;
3. a fixed channel mixing ``z = W y``: a random permutation matrix (FastFlow,
   ``permute_soft=False``) or a random rotation (CFlow, ``permute_soft=True``),
   ``|det W| = 1``.

The clamp is FrEIA's form up to its version 0.2 (``clamp * tanh(0.1 a)``, the
installed PyPI release and the commits FastFlow and CFlow pin); FrEIA's master
since 2023 uses ``clamp * tanh(0.1 a / clamp)``. ``tests/test_flows_allinone.py``
checks that this block and FrEIA's ``AllInOneBlock`` give the same ``z`` and
log-det on the same weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.flows.core import (FlowLayer, check_features, expand_condition, spatial_size,
                              sum_except_batch)
from adlab.flows.coupling import SubnetConstructor

#: FrEIA's ``global_affine_init=1`` with ``SOFTPLUS``: ``0.1 * softplus_{0.5}(gamma_0) = 1``.
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)


def mixing_matrix(channels: int, soft: bool, seed: int | None = None) -> Tensor:
    """A fixed ``C x C`` channel mixing: a permutation matrix, or a random rotation if ``soft``.

    The rotation is the Q of a Gaussian matrix's QR with the signs fixed (Haar-distributed,
    as ``scipy.stats.special_ortho_group`` that FrEIA draws from, det = +1 up to a flip).
    """
    g = None if seed is None else torch.Generator().manual_seed(seed)
    if not soft:
        return torch.eye(channels)[torch.randperm(channels, generator=g)]
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class AllInOneBlock(FlowLayer):
    """Coupling + global affine + fixed mixing, as FrEIA's ``AllInOneBlock`` (see the module doc).

    Args:
        channels: size of dimension 1 of the input (vectors ``[B, C]`` or maps ``[B, C, H, W]``).
        subnet_constructor: ``f(in, out) -> nn.Module`` with ``in = ceil(C/2) + cond_channels``
            and ``out = 2 floor(C/2)`` (scale logits, then shifts).
        cond_channels: channels of a condition concatenated to ``x1`` (CFlow's positional code).
        clamp: ``alpha`` of ``s = alpha tanh(0.1 a_s)`` (FastFlow 2.0, CFlow 1.9).
        permute_soft: a random rotation instead of a permutation after the block (CFlow: True).
        seed: seeds the mixing matrix.
    """

    def __init__(self, channels: int, subnet_constructor: SubnetConstructor,
                 cond_channels: int = 0, clamp: float = 2.0, permute_soft: bool = False,
                 seed: int | None = None):
        super().__init__()
        if channels < 2:
            raise ValueError(f"AllInOneBlock needs at least 2 channels to split (got {channels}).")
        self.channels, self.cond_channels, self.clamp = channels, cond_channels, clamp
        self.splits = (channels - channels // 2, channels // 2)
        self.subnet = subnet_constructor(self.splits[0] + cond_channels, 2 * self.splits[1])
        self.global_scale = nn.Parameter(torch.full((channels,), GLOBAL_SCALE_INIT))
        self.global_offset = nn.Parameter(torch.zeros(channels))
        w = mixing_matrix(channels, permute_soft, seed)
        self.register_buffer("w", w)
        self.register_buffer("w_inv", w.T.contiguous())

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def scale(self) -> Tensor:
        """The global per-channel scale ``g = 0.1 softplus_{beta=0.5}(gamma)`` (> 0)."""
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling_params(self, x1: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        h = x1
        if self.cond_channels:
            h = torch.cat([x1, expand_condition(cond, x1, self.cond_channels, "AllInOneBlock")], 1)
        a = 0.1 * self.subnet(h)
        n2 = self.splits[1]
        return self.clamp * torch.tanh(a[:, :n2]), a[:, n2:]

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.channels, "AllInOneBlock")
        x1, x2 = torch.split(x, self.splits, dim=1)
        s, t = self._coupling_params(x1, cond)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        g = self.scale()
        y = y * self._view(g, y) + self._view(self.global_offset, y)
        logdet = sum_except_batch(s) + spatial_size(x) * torch.log(g).sum()
        return self._mix(self.w, y), logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        check_features(z, self.channels, "AllInOneBlock")
        y = self._mix(self.w_inv, z)
        y = (y - self._view(self.global_offset, y)) / self._view(self.scale(), y)
        x1, y2 = torch.split(y, self.splits, dim=1)
        s, t = self._coupling_params(x1, cond)
        return torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=1)
