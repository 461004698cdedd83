"""Affine coupling layers (RealNVP / Glow) with the soft clamps the anomaly-detection flows use.

RealNVP (Dinh et al. 2017, Sec. 3.2-3.3) splits ``x`` into ``x_a = x_{1:d}`` and
``x_b = x_{d+1:D}`` and maps

    y_a = x_a                                              (Eq. (4))
    y_b = x_b * exp(s(x_a)) + t(x_a)                       (Eq. (5))

The Jacobian is lower block-triangular with ``diag(exp(s(x_a)))`` on the diagonal
of the transformed block (Eq. (6)), so ``log|det J| = sum_j s_j(x_a)``: no D x D
determinant is ever formed. The inverse needs no inverse of ``s`` or ``t``
(Eq. (7)-(8)): ``x_b = (y_b - t(y_a)) * exp(-s(y_a))``. Splitting along channels is
RealNVP's channel-wise mask (Eq. (9) with ``b`` = 1 on the first channels); Glow
(Kingma & Dhariwal 2018, Table 1, "affine coupling layer") uses the same layer with
one network ``NN()`` that outputs both ``log s`` and ``t``.

The anomaly-detection flows bound the log-scale ``s`` with a soft clamp so that no
dimension is amplified or attenuated by more than ``exp(+-clamp)`` (see
:func:`soft_clamp`). A condition ``c`` (CFlow's positional encoding) is concatenated
to the subnet input: ``(s, t) = NN([x_a, c])``; the Jacobian with respect to ``x`` is
still triangular because ``c`` is not transformed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from adlab.flows.core import FlowLayer, check_features, expand_condition, sum_except_batch

SubnetConstructor = Callable[[int, int], nn.Module]

#: ``0.636 ~ 2/pi`` keeps ``clamp * 0.636 * atan(.)`` inside ``(-clamp, clamp)``; the constant
#: as written in CS-Flow (marco-rudolph/cs-flow, ``freia_funcs.py``,
#: ``parallel_glow_coupling_layer.log_e``) and DifferNet's FrEIA copy.
ATAN_SCALE = 0.636

#: Soft-clamp forms, by name (see :func:`soft_clamp`).
CLAMP_ACTIVATIONS = ("atan", "tanh", "allinone", "none")


def soft_clamp(s: Tensor, clamp: float | None = 2.0, activation: str = "atan") -> Tensor:
    """Bound the raw log-scale ``s`` softly to ``(-clamp, clamp)``; the forms used by the papers' code.

    * ``"atan"``: ``clamp * 0.636 * atan(s / clamp)``: CS-Flow (Rudolph et al. 2022, clamp 3)
      and DifferNet (Rudolph et al. 2021) via their FrEIA copy (``freia_funcs.py``, ``log_e``);
      PyramidFlow uses it with clamp 2. Slope 0.636 at ``s = 0``.
    * ``"tanh"``: ``clamp * tanh(s / clamp)``: the same shape with tanh (slope 1 at 0; FrEIA's
      coupling blocks offer TANH as "like the original RealNVP").
    * ``"allinone"``: ``clamp * tanh(0.1 * s)``: FrEIA ``AllInOneBlock._affine`` (the subnet
      output is scaled by 0.1 first); used by FastFlow (clamp 2.0) and CFlow (clamp 1.9).
    * ``"none"`` (or ``clamp=None``): ``s`` unchanged, RealNVP Eq. (5) as printed.

    Note the current FrEIA ``GLOWCouplingBlock`` computes ``clamp * 0.636 * atan(s)`` (no
    division by ``clamp``); the form above is the one in the CS-Flow / DifferNet code.
    """
    if clamp is None or activation == "none":
        return s
    if clamp <= 0:
        raise ValueError(f"clamp must be positive (got {clamp}); use clamp=None for no clamp.")
    if activation == "atan":
        return clamp * ATAN_SCALE * torch.atan(s / clamp)
    if activation == "tanh":
        return clamp * torch.tanh(s / clamp)
    if activation == "allinone":
        return clamp * torch.tanh(0.1 * s)
    raise ValueError(f"Unknown clamp activation {activation!r}; use one of {CLAMP_ACTIVATIONS}.")


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    """Glow Sec. 3.3: zero the last layer of ``NN()`` so the coupling starts as the identity."""
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def mlp_subnet(hidden: int | None = None, hidden_ratio: float = 2.0,
               zero_init: bool = False) -> SubnetConstructor:
    """Subnet constructor ``f(in, out) -> Linear(in, h) - ReLU - Linear(h, out)`` for vector inputs.

    ``h = hidden`` if given, else ``int(hidden_ratio * in)``; the default ratio 2 is
    CFlow's ``subnet_fc`` (Linear(D, 2D) - ReLU - Linear; gudovskiy/cflow-ad).
    ``zero_init`` zeroes the last layer (Glow Sec. 3.3: each coupling starts as the identity).
    """
    def construct(in_features: int, out_features: int) -> nn.Module:
        h = hidden if hidden is not None else max(1, int(hidden_ratio * in_features))
        net = nn.Sequential(nn.Linear(in_features, h), nn.ReLU(), nn.Linear(h, out_features))
        return _zero_last(net) if zero_init else net
    return construct


def conv_subnet(hidden_ratio: float = 1.0, kernel_size: int = 3,
                zero_init: bool = False) -> SubnetConstructor:
    """Subnet constructor ``f(in, out) -> Conv(k) - ReLU - Conv(k)`` for feature maps (size-preserving).

    ``hidden = int(hidden_ratio * in)`` channels, as FastFlow's subnet
    (gathierry/FastFlow: Conv(k)-ReLU-Conv(k), ``hidden_ratio`` 1.0 for ResNets).
    ``zero_init`` zeroes the last conv (Glow Sec. 3.3).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd to keep the map size (got {kernel_size}).")

    def construct(in_channels: int, out_channels: int) -> nn.Module:
        h = max(1, int(hidden_ratio * in_channels))
        pad = kernel_size // 2
        net = nn.Sequential(nn.Conv2d(in_channels, h, kernel_size, padding=pad), nn.ReLU(),
                            nn.Conv2d(h, out_channels, kernel_size, padding=pad))
        return _zero_last(net) if zero_init else net
    return construct


class AffineCoupling(FlowLayer):
    """One affine coupling layer, RealNVP Eq. (4)-(8) / Glow Table 1, optionally conditional (CFlow).

    The input is split along dimension 1 into a first part of ``channels - channels // 2``
    and a second part of ``channels // 2`` entries (FrEIA's ``AllInOneBlock`` and
    ``torch.chunk`` split the same way). By default the first part ``x_a`` passes
    unchanged and the second part ``x_b`` is transformed; ``transform_first=True`` swaps
    the roles. With ``(s~, t) = NN([x_a, c])`` and ``s = soft_clamp(s~)``:

        z_b = x_b * exp(s) + t,     log|det J| = sum s   (over C, H, W)
        x_b = (z_b - t) * exp(-s)                          (inverse)

    Args:
        channels: size of dimension 1 of the input (features or channels), at least 2.
        subnet_constructor: ``f(in, out) -> nn.Module`` (FrEIA convention), called with
            ``in = |x_a| + cond_channels`` and ``out = 2 |x_b|``; the first ``|x_b|``
            outputs are ``s~``, the rest ``t``. Use :func:`mlp_subnet` for vectors and
            :func:`conv_subnet` for maps.
        cond_channels: channels of the condition concatenated to the subnet input
            (0 = unconditional; then ``cond`` is ignored).
        clamp, clamp_activation: the soft clamp, see :func:`soft_clamp`.
        transform_first: transform the first part instead of the second.
    """

    def __init__(self, channels: int, subnet_constructor: SubnetConstructor,
                 cond_channels: int = 0, clamp: float | None = 2.0,
                 clamp_activation: str = "atan", transform_first: bool = False):
        super().__init__()
        if channels < 2:
            raise ValueError(f"A coupling layer needs at least 2 channels to split (got {channels}).")
        if clamp_activation not in CLAMP_ACTIVATIONS:
            raise ValueError(f"Unknown clamp activation {clamp_activation!r}; "
                             f"use one of {CLAMP_ACTIVATIONS}.")
        self.channels = channels
        self.cond_channels = cond_channels
        self.clamp = clamp
        self.clamp_activation = clamp_activation
        self.transform_first = transform_first
        self.split_sizes = (channels - channels // 2, channels // 2)
        n_active = self.split_sizes[0] if transform_first else self.split_sizes[1]
        n_passive = channels - n_active
        self.n_active = n_active
        self.subnet = subnet_constructor(n_passive + cond_channels, 2 * n_active)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(passive x_a, active x_b)``."""
        first, second = torch.split(x, self.split_sizes, dim=1)
        return (second, first) if self.transform_first else (first, second)

    def _merge(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        return torch.cat((x_b, x_a) if self.transform_first else (x_a, x_b), dim=1)

    def scale_and_shift(self, x_a: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(s, t)`` from the passive part (and condition), ``s = soft_clamp(s~)``: Glow's ``NN()``."""
        h = x_a
        if self.cond_channels > 0:
            h = torch.cat([x_a, expand_condition(cond, x_a, self.cond_channels,
                                                 type(self).__name__)], dim=1)
        hint = ("the subnet must map [B, in, ...] to [B, 2 * n_active, ...] keeping the spatial "
                "size: use mlp_subnet for vectors [B, D] and conv_subnet for maps [B, C, H, W]")
        try:
            out = self.subnet(h)
        except RuntimeError as err:
            raise ValueError(f"The coupling subnet failed on input {tuple(h.shape)}: {hint}.") from err
        if out.shape[:2] != (h.shape[0], 2 * self.n_active) or out.shape[2:] != x_a.shape[2:]:
            raise ValueError(f"The coupling subnet returned shape {tuple(out.shape)} for input "
                             f"{tuple(h.shape)} (n_active={self.n_active}): {hint}.")
        s_raw, t = out[:, :self.n_active], out[:, self.n_active:]
        return soft_clamp(s_raw, self.clamp, self.clamp_activation), t

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """RealNVP Eq. (4)-(5): ``z_b = x_b * exp(s(x_a)) + t(x_a)``; log-det ``sum s`` (Eq. (6))."""
        check_features(x, self.channels, type(self).__name__)
        x_a, x_b = self._split(x)
        s, t = self.scale_and_shift(x_a, cond)
        z_b = x_b * torch.exp(s) + t
        return self._merge(x_a, z_b), sum_except_batch(s)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """RealNVP Eq. (7)-(8): ``x_b = (z_b - t(z_a)) * exp(-s(z_a))`` (``z_a = x_a``)."""
        check_features(z, self.channels, type(self).__name__)
        z_a, z_b = self._split(z)
        s, t = self.scale_and_shift(z_a, cond)
        x_b = (z_b - t) * torch.exp(-s)
        return self._merge(z_a, x_b)


class GlowCoupling(FlowLayer):
    """Two affine couplings in one block, each half transformed once (FrEIA ``GLOWCouplingBlock``).

    With ``x = [x_1, x_2]``:

        y_1 = x_1 * exp(s_2(x_2, c)) + t_2(x_2, c)
        y_2 = x_2 * exp(s_1(y_1, c)) + t_1(y_1, c)

    log|det J| is the sum of both couplings' ``sum s``. This is the block DifferNet
    (``glow_coupling_layer``) and CS-Flow (``parallel_glow_coupling_layer``) stack; the
    name follows FrEIA (one network per half predicts ``[s, t]`` jointly, as Glow's
    ``NN()``), although the Glow paper itself transforms one half per step.
    Arguments as :class:`AffineCoupling`; two subnets are built.
    """

    def __init__(self, channels: int, subnet_constructor: SubnetConstructor,
                 cond_channels: int = 0, clamp: float | None = 2.0,
                 clamp_activation: str = "atan"):
        super().__init__()
        kw = dict(cond_channels=cond_channels, clamp=clamp, clamp_activation=clamp_activation)
        self.first = AffineCoupling(channels, subnet_constructor, transform_first=True, **kw)
        self.second = AffineCoupling(channels, subnet_constructor, transform_first=False, **kw)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet_1 = self.first(x, cond)
        y, logdet_2 = self.second(y, cond)
        return y, logdet_1 + logdet_2

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.first.inverse(self.second.inverse(z, cond), cond)
