"""Teacher pretraining by distillation (EfficientAD, Batzner et al., WACV 2024, Sec. 3.1).

The teacher is a PDN trained once, before any inspection data is seen, to reproduce the
features of a big pretrained CNN: WideResNet-101 layers 2 and 3, aggregated as PatchCore
does (nelson1425/EfficientAD ``pretraining.py``):

1. each layer's map is cut into 3 x 3 neighbourhoods (``unfold``, padding 1;
   ``pretraining.py:249-281``); layer 3's neighbourhoods are resized bilinearly to layer 2's
   grid (``pretraining.py:211-235``);
2. each layer's ``C x 3 x 3`` vector is average-pooled to 1024 numbers
   (``adaptive_avg_pool1d``, ``pretraining.py:302-310``), the layers are concatenated and
   pooled again to the teacher's C = 384 channels (``pretraining.py:313-323``);
3. the target is normalised per channel with its mean and std over the pretraining images
   (10,000 ImageNet images, ``pretraining.py:123-164``);
4. the PDN (with padding, so 256 px -> 64 x 64, the grid of layer 2 at 512 px) minimises the
   MSE to the target; the extractor sees the image at 512 px, the PDN at 256 px; one random
   grayscale (p = 0.1) is applied to both views (``pretraining.py:37-51``); Adam, lr 1e-4,
   weight decay 1e-5, 60,000 steps of 16 images (``pretraining.py:79, 90-92``).

Offline (this repository's machines), there is neither ImageNet nor pretrained weights.
:func:`offline_images` cuts random crops from the photographs bundled with scikit-image
(``skimage.data``) as the stand-in for ImageNet, and the quick profile's backbone is a
randomly initialised ResNet-18: the teacher then learns to reproduce *random* convolutional
features of natural-image patches, which is a real distillation (local, multi-scale,
image-independent features) but carries none of ImageNet's semantics.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.data.mvtec import normalize
from adlab.features import FeatureExtractor

#: Colour photographs bundled with scikit-image (no download needed; ``skimage/data/*.png``).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                  "retina", "hubble_deep_field")
#: Greyscale ones, used as three equal channels.
SKIMAGE_GREY = ("camera", "brick", "grass", "gravel", "moon", "page", "coins", "text", "clock")


@functools.lru_cache(maxsize=1)
def _bundled_photos() -> list[Tensor]:
    try:
        import skimage.data as data
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("The offline image source needs scikit-image: "
                          "`pip install 'scikit-image>=0.22,<1'`.") from exc
    photos = []
    for name in SKIMAGE_PHOTOS + SKIMAGE_GREY:
        img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(torch.from_numpy(img[..., :3]).permute(2, 0, 1).contiguous())
    return photos


def offline_images(n: int, size: int, seed: int = 0, grayscale_p: float = 0.0) -> Tensor:
    """``n`` random square crops ``[n, 3, size, size]`` in [0, 1] of scikit-image's photographs.

    A crop covers 25-100 % of the shorter side, at a random place, resized to ``size``; a
    fraction ``grayscale_p`` is turned grey (the reference applies RandomGrayscale(0.1) to
    its pretraining images, ``pretraining.py:37``). Deterministic in ``seed``.
    """
    photos = _bundled_photos()
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.25 + 0.75 * torch.rand(1, generator=g).item()))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = img[None, :, top:top + side, left:left + side]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[0]
        if torch.rand(1, generator=g).item() < grayscale_p:
            out[i] = to_grayscale(out[i])
    return out.clamp(0, 1)


def to_grayscale(images: Tensor) -> Tensor:
    """ITU-R 601 luma ``0.2989 R + 0.587 G + 0.114 B`` copied to three channels (torchvision's)."""
    weights = torch.tensor([0.2989, 0.587, 0.114], dtype=images.dtype).view(3, 1, 1)
    return (images * weights).sum(-3, keepdim=True).expand_as(images).clone()


class DistillationTarget(nn.Module):
    """What the teacher learns to output: PatchCore-style aggregated backbone features.

    ``forward(images in [0, 1]) -> [B, out_channels, h, w]`` on the grid of the first layer
    (unnormalised; see :func:`channel_stats`). ``feature_dim`` is the per-layer pooled size
    (1024 in the reference, ``pretraining.py:183``).
    """

    def __init__(self, backbone: str = "wide_resnet101_2", layers=("layer2", "layer3"),
                 out_channels: int = 384, feature_dim: int = 1024, pretrained: bool | None = None,
                 seed: int = 0):
        super().__init__()
        self.extractor = FeatureExtractor(backbone, layers, pretrained, seed)
        self.out_channels, self.feature_dim = out_channels, feature_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        feats = self.extractor(images)
        grid = feats[0].shape[-2:]
        pooled = []
        for f in feats:
            patches = F.unfold(f, 3, padding=1).view(len(f), -1, *f.shape[-2:])  # [B, C*9, h, w]
            if patches.shape[-2:] != grid:
                patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
            vectors = patches.flatten(2).transpose(1, 2).reshape(-1, 1, patches.shape[1])
            pooled.append(F.adaptive_avg_pool1d(vectors, self.feature_dim))   # [B*h*w, 1, 1024]
        joint = torch.cat(pooled, dim=2)                                     # layers side by side
        out = F.adaptive_avg_pool1d(joint, self.out_channels)[:, 0]          # [B*h*w, C]
        return out.view(len(images), *grid, self.out_channels).permute(0, 3, 1, 2).contiguous()


def channel_stats(maps) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[1, C, 1, 1]`` over an iterable of ``[B, C, h, w]`` maps.

    Two passes as the reference (``efficientad.py:341-366``, ``pretraining.py:123-164``): the
    mean of per-batch means, then the root of the mean of per-batch mean squared deviations.
    """
    maps = list(maps)
    mean = torch.stack([m.mean(dim=(0, 2, 3)) for m in maps]).mean(0)[None, :, None, None]
    var = torch.stack([((m - mean) ** 2).mean(dim=(0, 2, 3)) for m in maps]).mean(0)
    return mean, var.sqrt()[None, :, None, None]


def pretrain_teacher(teacher: nn.Module, target: DistillationTarget, images: Tensor, steps: int,
                     batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 1e-5,
                     seed: int = 0, target_scale: int = 2, cache_targets: bool = True,
                     stats_images: int = 1000, progress: bool = True) -> list[float]:
    """Train a padded PDN ``teacher`` to output ``target``'s normalised features; returns the
    loss per step.

    ``images`` ``[N, 3, S, S]`` in [0, 1] are the pretraining images at the PDN's size; the
    extractor sees them ``target_scale`` times larger (512 vs 256 px in the reference).
    The normalisation statistics come from the targets of the first ``stats_images`` images
    (the reference: 10,000). ``cache_targets`` computes every target once (small image sets,
    the quick profile); otherwise each batch's targets are computed when drawn, as the
    reference does.
    """
    from adlab.features import batches
    from adlab.train import RandomBatches, train

    def target_of(x: Tensor) -> Tensor:
        return target(F.interpolate(x, scale_factor=target_scale, mode="bilinear",
                                    align_corners=False))

    first = images if cache_targets else images[:stats_images]
    computed = torch.cat([target_of(b) for b in batches(first, 16)])
    mean, std = channel_stats([computed])
    inputs = normalize(images)

    def loss_fn(i: Tensor) -> Tensor:
        goal = computed[i] if cache_targets else target_of(images[i])
        prediction = teacher(inputs[i])
        if prediction.shape != goal.shape:
            raise ValueError(f"The teacher outputs {tuple(prediction.shape[1:])} but the target is "
                             f"{tuple(goal.shape[1:])}: build it with padding=True and the same "
                             "out_channels.")
        return F.mse_loss(prediction, (goal - mean) / std)

    optimizer = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    teacher.train()
    index = torch.arange(len(images))
    history = train(loss_fn, RandomBatches(index, min(batch_size, len(index)), seed), steps,
                    optimizer, {"teacher": teacher}, seed=seed, desc="teacher distillation",
                    progress=progress)
    teacher.eval()
    return history


__all__ = ["offline_images", "to_grayscale", "DistillationTarget", "channel_stats",
           "pretrain_teacher", "SKIMAGE_PHOTOS", "SKIMAGE_GREY"]
