"""Structural similarity (SSIM) and multi-scale gradient magnitude similarity (MS-GMS), from scratch.

InTra (Pirnay & Chai 2021) trains with ``L2 + SSIM + MS-GMS`` and scores with the MS-GMS
difference between an image and its inpainted version, as RIAD (Zavrtanik et al. 2021) did.

* SSIM (Wang et al. 2004, Eq. (13)): local means, variances and covariance under an
  11 x 11 Gaussian window (sigma 1.5), ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2`` for data range
  ``R``. :func:`ssim` reproduces ``skimage.metrics.structural_similarity(x, y,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R,
  channel_axis=...)``: scipy's ``reflect`` borders (edge sample repeated), then the mean over
  the map without a border of 5 px. The loss uses the whole map (:func:`ssim_map`): a 16 px
  patch would keep only its central 6 x 6 after that crop.
* GMS (Xue et al. 2014, GMSD, Eq. (4)): gradient magnitudes ``m`` from the Prewitt filters
  (``[1 0 -1]`` columns / 3, zero padding), ``GMS = (2 m_x m_y + c) / (m_x^2 + m_y^2 + c)``
  with ``c = 0.0026`` for images in [0, 1] (GMSD's 170 for [0, 255], divided by 255^2). On
  colour images we take the channel mean first (GMSD works on luminance; the InTra paper does
  not say). Multi-scale (RIAD, Sec. 3): 4 scales, each a 2 x 2 average pooling of the last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adlab.features import gaussian_kernel1d

GMS_C = 0.0026


def _reflect_index(n: int, radius: int, device) -> Tensor:
    """Indices that pad a length-``n`` axis by ``radius`` as scipy's ``reflect`` (d c b a | a b c d | d c b a)."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_filter(x: Tensor, sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    """Each channel of ``x [B, C, H, W]`` smoothed by a separable Gaussian, scipy ``reflect`` borders."""
    k = gaussian_kernel1d(sigma, truncate).to(x)
    r = (len(k) - 1) // 2
    c = x.shape[1]
    x = x[..., _reflect_index(x.shape[-2], r, x.device), :]
    x = x[..., _reflect_index(x.shape[-1], r, x.device)]
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim_map(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5,
             truncate: float = 3.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Wang et al. 2004, Eq. (13), at every pixel: ``[B, C, H, W]`` in [-1, 1], 1 where ``x = y``."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two [B, C, H, W] tensors of one shape; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}.")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = gaussian_filter(x, sigma, truncate), gaussian_filter(y, sigma, truncate)
    var_x = gaussian_filter(x * x, sigma, truncate) - mu_x ** 2
    var_y = gaussian_filter(y * y, sigma, truncate) - mu_y ** 2
    cov = gaussian_filter(x * y, sigma, truncate) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5,
         truncate: float = 3.5) -> Tensor:
    """Mean SSIM per image ``[B]``, scikit-image's convention: the map without its border of
    ``int(truncate * sigma + 0.5)`` px (5 px for sigma 1.5), averaged over channels and pixels."""
    r = int(truncate * sigma + 0.5)
    s = ssim_map(x, y, data_range, sigma, truncate)
    return s[..., r:s.shape[-2] - r, r:s.shape[-1] - r].mean(dim=(1, 2, 3))


def ssim_loss(x: Tensor, y: Tensor) -> Tensor:
    """``1 - mean SSIM`` over the whole map (no border crop, see the module docstring)."""
    return 1 - ssim_map(x, y).mean()


def prewitt_magnitude(x: Tensor) -> Tensor:
    """Gradient magnitude of the channel mean of ``x [B, C, H, W]`` -> ``[B, 1, H, W]``.

    Prewitt kernels ``h_x = [[1, 0, -1]] * 3 / 3`` and ``h_y = h_x^T`` (GMSD, Eq. (1)),
    zero padding of 1 px (cross-correlation; the sign does not change the magnitude).
    """
    gray = x.mean(1, keepdim=True)
    hx = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=x.dtype, device=x.device) / 3
    kernels = torch.stack([hx, hx.T])[:, None]                          # [2, 1, 3, 3]
    g = F.conv2d(gray, kernels, padding=1)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + 1e-12)


def gms_map(x: Tensor, y: Tensor, c: float = GMS_C) -> Tensor:
    """GMSD Eq. (4): ``(2 m_x m_y + c) / (m_x^2 + m_y^2 + c)``, ``[B, 1, H, W]``, 1 where equal."""
    mx, my = prewitt_magnitude(x), prewitt_magnitude(y)
    return (2 * mx * my + c) / (mx ** 2 + my ** 2 + c)


def msgms_maps(x: Tensor, y: Tensor, scales: int = 4, c: float = GMS_C) -> list[Tensor]:
    """``1 - GMS`` at ``scales`` scales, finest first; each next scale is a 2 x 2 average pooling."""
    maps = []
    for s in range(scales):
        if s:
            if min(x.shape[-2:]) < 2:
                raise ValueError(f"MS-GMS with {scales} scales needs images of at least "
                                 f"{2 ** (scales - 1)} px; lower the number of scales.")
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        maps.append(1 - gms_map(x, y, c))
    return maps


def msgms_loss(x: Tensor, y: Tensor, scales: int = 4) -> Tensor:
    """RIAD's multi-scale GMS loss: the mean of ``1 - GMS`` over pixels, averaged over scales."""
    return torch.stack([m.mean() for m in msgms_maps(x, y, scales)]).mean()


def msgms_difference(x: Tensor, y: Tensor, scales: int = 4, per_channel: bool = False) -> Tensor:
    """The anomaly map before smoothing: ``1 - GMS`` of each scale upsampled (bilinear) to the
    input size, averaged over scales: ``[B, H, W]``.

    ``per_channel=True``: the map of each colour channel on its own, then the maximum over
    channels (a colour defect with little grey-level gradient shows in one channel).
    """
    if per_channel:
        return torch.stack([msgms_difference(x[:, c:c + 1], y[:, c:c + 1], scales)
                            for c in range(x.shape[1])]).amax(0)
    size = x.shape[-2:]
    maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in msgms_maps(x, y, scales)]
    return torch.stack(maps).mean(0)[:, 0]


__all__ = ["GMS_C", "gaussian_filter", "ssim_map", "ssim", "ssim_loss", "prewitt_magnitude",
           "gms_map", "msgms_maps", "msgms_loss", "msgms_difference"]
