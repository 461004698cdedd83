"""Exact log-likelihood of a flow with a standard-normal base, and the NLL in nats or bits per dimension.

Change of variables (RealNVP, Dinh et al. 2017, Sec. 3.1; Glow Sec. 2) with
``p_Z = N(0, I)`` and ``z = f(x)``:

    log p(x) = log N(z; 0, I) + log|det J_f(x)|
             = -D/2 log(2 pi) - ||z||^2 / 2 + logdet,      D = dimensions per sample.

Units: natural logarithms give **nats**. Dividing the NLL by ``D ln 2`` gives **bits
per dimension**, the unit RealNVP and Glow report (Glow Sec. 2).
The anomaly-detection flows train on the NLL per dimension without the constant
(CS-Flow: ``mean(0.5 sum z^2 - logdet) / D``; CFlow divides by C): the constant does
not change the gradients, so :func:`nll_nats` keeps it and says so.
"""
from __future__ import annotations

import math

from torch import Tensor

from adlab.flows.core import sum_except_batch

LOG_2PI = math.log(2 * math.pi)


def n_dims(z: Tensor) -> int:
    """Dimensions per sample, ``D = C * H * W`` (or ``D`` for vectors)."""
    return math.prod(z.shape[1:])


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per sample: ``-D/2 log(2 pi) - ||z||^2 / 2`` -> ``[B]`` (nats)."""
    return -0.5 * (n_dims(z) * LOG_2PI + sum_except_batch(z ** 2))


def log_likelihood(z: Tensor, logdet: Tensor) -> Tensor:
    """``log p(x) = log N(z; 0, I) + log|det J_f(x)|`` per sample, in nats; ``(z, logdet) = flow(x)``."""
    return standard_normal_log_prob(z) + logdet


def nll_nats(z: Tensor, logdet: Tensor, per_dim: bool = False) -> Tensor:
    """Negative log-likelihood averaged over the batch, in nats (the training loss).

    ``per_dim=True`` divides by ``D`` (nats per dimension, the scale CS-Flow and CFlow
    train on). Use as ``loss = nll_nats(*flow(x))``.
    """
    nll = -log_likelihood(z, logdet).mean()
    return nll / n_dims(z) if per_dim else nll


def bits_per_dim(z: Tensor, logdet: Tensor, n_bins: int | None = None) -> Tensor:
    """Batch-mean NLL in bits per dimension: ``NLL_nats / (D ln 2)`` (RealNVP / Glow's unit).

    For images quantised to ``n_bins`` levels and scaled to ``[0, 1]`` (e.g. ``n_bins=256``),
    the discrete likelihood of the original integers adds ``log(n_bins)`` nats per
    dimension (change of variables for the scaling ``x / n_bins``; Glow Sec. 2), so
    ``bits_per_dim(..., n_bins=256)`` is the number the papers report. With
    ``n_bins=None`` the data are taken as continuous.
    """
    nll_per_dim = nll_nats(z, logdet, per_dim=True)
    if n_bins is not None:
        nll_per_dim = nll_per_dim + math.log(n_bins)
    return nll_per_dim / math.log(2)
