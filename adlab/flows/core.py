"""The normalizing-flow layer contract and the sequential flow that adds up log|det J|.

A normalizing flow is a bijection ``f`` from data ``x`` to a latent ``z`` whose
Jacobian determinant is cheap. The change-of-variables formula (RealNVP, Dinh et
al. 2017, Sec. 3.1; Glow, Kingma & Dhariwal 2018, Sec. 2) gives the exact density

    log p_X(x) = log p_Z(f(x)) + log |det(df(x) / dx^T)|.

For a composition ``f = f_K o ... o f_1`` the chain rule makes the Jacobian a
product of Jacobians and the determinant of a product is the product of the
determinants, so (Glow Sec. 2)

    log |det J_f(x)| = sum_k log |det J_{f_k}(h_{k-1})|,   h_0 = x, h_k = f_k(h_{k-1}).

Every adlab flow layer follows one contract (direction data -> latent):

* ``forward(x, cond=None) -> (z, logdet)`` with ``logdet`` of shape ``[B]``
  (one value per sample, summed over every non-batch dimension);
* ``inverse(z, cond=None) -> x`` (latent -> data, used for sampling).

Inputs are vectors ``[B, D]`` (DifferNet, CFlow) or feature maps ``[B, C, H, W]``
(FastFlow, CS-Flow); layers act on dimension 1 (features / channels) and, for maps,
the same way at every spatial position.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

from torch import Tensor, nn


class FlowLayer(nn.Module):
    """Base of every invertible layer: ``forward(x, cond) -> (z, logdet[B])``, ``inverse(z, cond) -> x``.

    ``cond`` is an optional condition (CFlow's positional encoding); layers that do
    not use it ignore it, so a :class:`SequentialFlow` can pass it to every layer.
    """

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def sum_except_batch(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``[B, ...] -> [B]`` (log-dets sum over C, H, W)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def spatial_size(x: Tensor) -> int:
    """Number of positions a per-channel operation is repeated at: ``H * W`` for maps, 1 for vectors.

    A per-channel map applied at every pixel has a block-diagonal Jacobian with
    ``H * W`` identical blocks, hence Glow Table 1's factor ``h * w`` in the log-det.
    """
    return math.prod(x.shape[2:])


def per_channel(p: Tensor, x: Tensor) -> Tensor:
    """View a per-channel ``[C]`` parameter to broadcast against ``x`` (``[B, C]``, ``[B, C, H, W]``)."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def check_features(x: Tensor, channels: int, who: str) -> None:
    """Raise a clear error unless ``x`` is ``[B, channels]`` or ``[B, channels, H, W]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}.")
    if x.dim() < 2:
        raise ValueError(
            f"{who} expects a batch of vectors [B, {channels}] or of feature maps "
            f"[B, {channels}, H, W], got shape {tuple(x.shape)}; add a batch dimension "
            "with x.unsqueeze(0).")
    if x.shape[1] != channels:
        raise ValueError(
            f"{who} was built for {channels} channels (dimension 1) but got input of shape "
            f"{tuple(x.shape)}; build the layer with channels={x.shape[1]} or fix the input.")


def expand_condition(cond: Tensor | None, x: Tensor, cond_channels: int, who: str) -> Tensor:
    """Check a condition and broadcast a vector condition ``[B, Cc]`` over the positions of a map ``x``.

    CFlow conditions every feature vector on its positional encoding; a condition
    may be given per position (``[B, Cc, H, W]``) or once per sample (``[B, Cc]``).
    """
    if cond is None:
        raise ValueError(
            f"{who} is conditional (cond_channels={cond_channels}) and needs cond=...; pass "
            f"a tensor [B, {cond_channels}] or [B, {cond_channels}, H, W], or build the layer "
            "with cond_channels=0.")
    if cond.shape[0] != x.shape[0] or cond.dim() < 2 or cond.shape[1] != cond_channels:
        raise ValueError(
            f"{who} expects cond of shape [B={x.shape[0]}, {cond_channels}, ...], got "
            f"{tuple(cond.shape)}.")
    if cond.dim() == 2 and x.dim() > 2:
        cond = cond.view(*cond.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    if cond.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"{who}: cond has spatial shape {tuple(cond.shape[2:])} but the input has "
            f"{tuple(x.shape[2:])}; resize the condition to the feature map.")
    return cond.to(dtype=x.dtype)


class SequentialFlow(FlowLayer):
    """A chain of flow layers ``f = f_K o ... o f_1`` that accumulates ``log|det J|``.

    ``forward`` applies the layers in order and sums their per-sample log-dets
    (chain rule, RealNVP Sec. 3.5 "combining coupling layers"; Glow Sec. 2);
    ``inverse`` applies the layers' inverses in reverse order. Indexing and slicing
    give sub-flows that share the same modules (``flow[:k]`` = first ``k`` layers).
    """

    def __init__(self, *layers: FlowLayer | Iterable[FlowLayer]):
        super().__init__()
        if len(layers) == 1 and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "forward") and hasattr(layer, "inverse")):
                raise TypeError(f"layer {i} ({type(layer).__name__}) has no inverse(); "
                                "a SequentialFlow takes invertible FlowLayer modules only.")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, cond)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z, cond)
        return z

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[FlowLayer]:
        return iter(self.layers)

    def __getitem__(self, index: int | slice) -> FlowLayer:
        if isinstance(index, slice):
            return SequentialFlow(*list(self.layers)[index])
        return self.layers[index]
