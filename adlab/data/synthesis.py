"""Training-time anomaly synthesis: Perlin-noise masks, texture / self-patch blending.

Methods that learn to *see* defects without ever seeing a real one paste a fake
anomaly into a normal image and train on the result:

* DRAEM (Zavrtanik et al., ICCV 2021, Sec. 3.3 and Fig. 4): a Perlin noise map
  ``P`` at random scales, rotated and thresholded, gives the mask ``M_a``; a texture
  image ``A`` (DTD) is blended into the image ``I`` inside the mask,
  ``I_a = (1 - M_a) * I + (1 - beta) * (M_a * A) + beta * (M_a * I)``,  beta ~ U(0, 0.8).
  Half the training samples are left normal.
* MemSeg (Yang et al. 2023) and GLAD (Yao et al., ECCV 2024, ATP) restrict the mask to
  the object's foreground (Otsu) and take the source either from a texture or from
  the image itself shuffled on a grid; GLAD thresholds the Perlin noise at 0.3.
* TDAD (two-stage diffusion, :mod:`adlab.diffusion.tdad`) uses the same ingredients with
  masks at several scales: fine and medium Perlin blobs plus large irregular regions
  (:class:`MultiScaleSynthesizer`), so that the segmentation network meets both pin-prick and
  large defects.

Every random choice draws from an optional ``torch.Generator``: the same generator
state gives the same anomalies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _pair(value) -> tuple:
    """``v`` -> ``(v, v)``; a pair stays a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# --------------------------------------------------------------------------- Perlin noise

def fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic interpolant ``6 t^5 - 15 t^4 + 10 t^3`` (Perlin, SIGGRAPH 2002)."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def random_gradients(cells: tuple[int, int], generator: torch.Generator | None = None):
    """Unit gradient vectors at the ``(cells_y + 1) x (cells_x + 1)`` lattice corners."""
    angles = 2 * math.pi * torch.rand(cells[0] + 1, cells[1] + 1, generator=generator)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def perlin_from_gradients(y: torch.Tensor, x: torch.Tensor, gradients: torch.Tensor):
    """2-D gradient (Perlin) noise at lattice coordinates ``(y, x)`` (any shape, >= 0).

    Each point lies in a lattice cell with corners ``(y0 + dy, x0 + dx)``; every corner
    contributes the dot product of its gradient ``g`` with the offset from the corner,
    ``g . (fy - dy, fx - dx)``, and the four are blended with :func:`fade` weights.
    The noise is 0 at every lattice point and lies within ``[-sqrt(2)/2, sqrt(2)/2]``.
    """
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    u, v = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), v)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), v)
    return torch.lerp(top, bottom, u)


def _lattice_coordinates(shape, scale, angle: float):
    """Pixel centres of an ``H x W`` image in lattice units (``scale`` cells per side).

    The pixel grid is rotated by ``angle`` degrees about the image centre first, which
    is the same as rotating the noise image (DRAEM rotates it by U(-90, 90) degrees)
    without blank corners. Unrotated, pixel ``(i, j)`` sits at ``(i ry / H, j rx / W)``;
    rotated coordinates are shifted to start in cell 0.
    """
    (H, W), (ry, rx) = shape, scale
    py = torch.arange(H, dtype=torch.float64) - (H - 1) / 2
    px = torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    py, px = torch.meshgrid(py, px, indexing="ij")
    a = math.radians(angle)
    qy = math.cos(a) * py - math.sin(a) * px
    qx = math.sin(a) * py + math.cos(a) * px
    y, x = (qy + (H - 1) / 2) * ry / H, (qx + (W - 1) / 2) * rx / W
    return y - y.min().floor(), x - x.min().floor()


def perlin_noise(shape, scale, generator: torch.Generator | None = None,
                 angle: float = 0.0) -> torch.Tensor:
    """2-D Perlin noise, ``float32 [H, W]``, with ``scale = (cells_y, cells_x)`` lattice
    cells across the image (an int means the same along both axes), optionally rotated
    by ``angle`` degrees.

    The raw noise is multiplied by ``sqrt(2)`` so that it lies in ``[-1, 1]``, as in
    DRAEM's official code: mask thresholds (0.5 DRAEM, 0.3 GLAD) refer to this range.
    """
    shape, scale = _pair(shape), _pair(scale)
    if min(shape) < 1 or min(scale) <= 0:
        raise ValueError(f"perlin_noise needs a positive shape and scale; got {shape}, {scale}.")
    y, x = _lattice_coordinates(shape, scale, angle)
    cells = (int(y.max().floor()) + 1, int(x.max().floor()) + 1)
    gradients = random_gradients(cells, generator).double()
    return (math.sqrt(2) * perlin_from_gradients(y, x, gradients)).float()


def perlin_mask(size, threshold: float = 0.5, min_scale_exp: int = 0, max_scale_exp: int = 5,
                rotate: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """A binary anomaly mask ``float32 [H, W]`` from thresholded Perlin noise.

    DRAEM (Sec. 3.3; official code): scale ``2^k`` per axis with ``k`` uniform in
    ``[min_scale_exp, max_scale_exp]`` (0..5), noise rotated by U(-90, 90) degrees,
    ``M = P > threshold`` with threshold 0.5. GLAD uses threshold 0.3 (larger blobs).
    """
    exps = torch.randint(min_scale_exp, max_scale_exp + 1, (2,), generator=generator)
    scale = (2 ** int(exps[0]), 2 ** int(exps[1]))
    angle = float(torch.empty(1).uniform_(-90, 90, generator=generator)) if rotate else 0.0
    noise = perlin_noise(_pair(size), scale, generator=generator, angle=angle)
    return (noise > threshold).float()


def irregular_mask(size, min_area: float = 0.08, max_area: float = 0.3, vertices: int = 12,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One large irregular region, ``float32 [H, W]`` in {0, 1}: a random star-shaped blob.

    ``vertices`` directions around a random centre get random radii; the boundary radius at
    every angle is the periodic linear interpolation between them, so the region is a lumpy,
    closed, simply connected blob (a dent, a large stain, a missing piece). Its mean radius is
    set so that the blob would cover a fraction of the image drawn uniformly in
    ``[min_area, max_area]`` (a little less when it reaches the border).
    """
    H, W = _pair(size)
    if not 0 < min_area <= max_area < 1:
        raise ValueError(f"irregular_mask needs 0 < min_area <= max_area < 1; got "
                         f"{min_area}, {max_area}.")
    u = torch.rand(3 + vertices, generator=generator, dtype=torch.float64)
    area = min_area + (max_area - min_area) * float(u[0])
    cy, cx = (0.25 + 0.5 * float(u[1])) * (H - 1), (0.25 + 0.5 * float(u[2])) * (W - 1)
    lumps = 0.6 + 0.8 * u[3:]                      # relative radii in [0.6, 1.4]
    # mean area of the blob ~ pi r^2 E[lump^2]; E[lump^2] = 1 + 0.8^2 / 12
    radius = math.sqrt(area * H * W / (math.pi * (1 + 0.8 ** 2 / 12)))
    py = torch.arange(H, dtype=torch.float64)[:, None] - cy
    px = torch.arange(W, dtype=torch.float64)[None, :] - cx
    angle = torch.atan2(py, px) % (2 * math.pi)    # [H, W] in [0, 2 pi)
    pos = angle / (2 * math.pi) * vertices
    k = pos.floor().long() % vertices
    frac = pos - pos.floor()
    boundary = radius * torch.lerp(lumps[k], lumps[(k + 1) % vertices], frac)
    return (torch.sqrt(py ** 2 + px ** 2) <= boundary).float()


#: TDAD-style mask scales (our reading; TDAD's authors released no code): Perlin with
#: ``2^k`` lattice cells, ``k`` in the given range (more cells, smaller blobs), or one large
#: irregular region.
MASK_SCALES = {
    "fine": {"kind": "perlin", "min_scale_exp": 4, "max_scale_exp": 5},
    "medium": {"kind": "perlin", "min_scale_exp": 1, "max_scale_exp": 3},
    "large": {"kind": "irregular"},
}


def scaled_mask(size, scale: str, threshold: float = 0.5,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A mask of one :data:`MASK_SCALES` scale (``"fine"``, ``"medium"``, ``"large"``)."""
    if scale not in MASK_SCALES:
        raise ValueError(f"Unknown mask scale {scale!r}; choose from {', '.join(MASK_SCALES)}.")
    spec = MASK_SCALES[scale]
    if spec["kind"] == "irregular":
        return irregular_mask(size, generator=generator)
    return perlin_mask(size, threshold, spec["min_scale_exp"], spec["max_scale_exp"],
                       generator=generator)


# --------------------------------------------------------------------------- foreground

def _grayscale(image: torch.Tensor) -> np.ndarray:
    """ITU-R 601 luma of a ``[3, H, W]`` (or ``[1, H, W]`` / ``[H, W]``) image."""
    if image.ndim == 3 and image.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
        image = (image * weights[:, None, None]).sum(0)
    elif image.ndim == 3:
        image = image[0]
    return image.detach().float().cpu().numpy()


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """The object's foreground, ``float32 [H, W]`` in {0, 1}, by Otsu's threshold.

    Otsu (1979) splits the grayscale histogram in two; the foreground is the side that
    covers less of the image border (objects sit inside the frame on a background that
    touches it), as MemSeg / GLAD restrict synthetic anomalies to the object.
    A constant image has no foreground (all zeros).
    """
    from skimage.filters import threshold_otsu

    gray = _grayscale(image)
    if gray.max() == gray.min():
        return torch.zeros(gray.shape)
    bright = gray > threshold_otsu(gray)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    foreground = ~bright if border.mean() > 0.5 else bright
    return torch.from_numpy(foreground.astype(np.float32))


def looks_like_object(images: torch.Tensor, max_border: float = 0.05, sample: int = 8) -> bool:
    """Whether the images show an object on a background (restrict anomalies to it) rather than
    a texture: the Otsu foreground (:func:`foreground_mask`) of the first ``sample`` images
    covers at most ``max_border`` of the image border on average. An object sits inside the
    frame; a texture's Otsu split runs through the border (about half of it either side)."""
    touching = []
    for image in images[:sample]:
        fg = foreground_mask(image)
        border = torch.cat([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
        touching.append(float(border.mean()) if fg.sum() > 0 else 1.0)
    return bool(touching) and sum(touching) / len(touching) <= max_border


# --------------------------------------------------------------------------- sources and blend

def grid_shuffle(image: torch.Tensor, grid: int = 8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The image cut into ``grid x grid`` tiles placed in a random order (self-patch source).

    GLAD / MemSeg use the shuffled image as an anomaly source that keeps the image's own
    colours and texture. When ``H`` or ``W`` is not a multiple of ``grid`` the remainder
    rows / columns at the bottom / right stay in place.
    """
    C, H, W = image.shape
    th, tw = H // grid, W // grid
    if th == 0 or tw == 0:
        raise ValueError(f"grid_shuffle: a {H}x{W} image cannot be cut into {grid}x{grid} tiles.")
    core = image[:, :th * grid, :tw * grid]
    tiles = core.reshape(C, grid, th, grid, tw).permute(1, 3, 0, 2, 4)   # [grid, grid, C, th, tw]
    tiles = tiles.reshape(grid * grid, C, th, tw)[torch.randperm(grid * grid, generator=generator)]
    core = tiles.reshape(grid, grid, C, th, tw).permute(2, 0, 3, 1, 4)
    core = core.reshape(C, th * grid, tw * grid)
    out = image.clone()
    out[:, :th * grid, :tw * grid] = core
    return out


def blend(image: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, beta) -> torch.Tensor:
    """DRAEM's blend (Sec. 3.3): ``I_a = I (1 - M) + (1 - beta) A M + beta I M``.

    ``image`` and ``source`` are ``[3, H, W]`` or ``[B, 3, H, W]``; ``mask`` ``[H, W]``,
    ``[B, H, W]`` or with a channel axis; ``beta`` a number or ``[B]`` (opacity of the
    original image inside the mask: 0 pastes the source, 1 keeps the image).
    """
    m = mask if mask.ndim == image.ndim else mask.unsqueeze(-3)
    beta = torch.as_tensor(beta, dtype=image.dtype, device=image.device)
    if beta.ndim == 1:
        beta = beta.view(-1, *([1] * (image.ndim - 1)))
    return image * (1 - m) + (1 - beta) * source * m + beta * image * m


# --------------------------------------------------------------------------- synthesizer

@dataclass
class AnomalySynthesizer:
    """Turn a batch of normal images into ``(augmented, masks)`` training pairs.

    Per sample (DRAEM Sec. 3.3; GLAD's ATP data): with probability ``normal_fraction``
    the image is returned unchanged with an empty mask; otherwise a Perlin mask
    (:func:`perlin_mask`, optionally intersected with :func:`foreground_mask`) marks the
    anomaly, the source is a random texture (probability ``texture_prob`` when textures
    are given; DTD in the papers) or the image shuffled on a ``grid x grid`` grid, and
    :func:`blend` pastes it with ``beta ~ U(0, beta_max)``. DRAEM additionally applies
    random colour augmentations to the source; that is left out here.
    """

    textures: Sequence[torch.Tensor] | torch.Tensor | None = None  # [3, h, w] in [0, 1]
    texture_prob: float = 0.5     # GLAD: 50% DTD texture, 50% self-shuffled image
    threshold: float = 0.5        # DRAEM 0.5; GLAD 0.3
    beta_max: float = 0.8         # beta ~ U(0, 0.8), DRAEM Sec. 3.3
    normal_fraction: float = 0.5  # DRAEM / GLAD: half the samples stay normal
    foreground: bool = False      # restrict to the Otsu foreground (objects)
    grid: int = 8                 # self-patch shuffle grid (GLAD 8x8)
    min_scale_exp: int = 0        # Perlin scale 2^k, k in [0, 5] (DRAEM)
    max_scale_exp: int = 5
    rotate: bool = True
    max_tries: int = 10           # resample an empty Perlin mask this many times

    def _source(self, image: torch.Tensor, generator) -> torch.Tensor:
        """A texture resized to the image, or the image shuffled on a grid."""
        n_textures = 0 if self.textures is None else len(self.textures)
        coin = float(torch.rand(1, generator=generator)) if n_textures else 1.0
        use_texture = coin < self.texture_prob
        if not use_texture:
            return grid_shuffle(image, self.grid, generator)
        texture = self.textures[int(torch.randint(n_textures, (1,), generator=generator))]
        texture = texture.to(image)[None]  # same dtype and device
        return F.interpolate(texture, size=image.shape[-2:], mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0, 1)

    def _mask(self, image: torch.Tensor, generator) -> torch.Tensor:
        """A non-empty Perlin mask (within the foreground if asked), or zeros after max_tries."""
        region = foreground_mask(image) if self.foreground else None
        if region is not None and region.sum() == 0:
            region = None  # no foreground found: do not restrict
        for _ in range(max(1, self.max_tries)):
            mask = perlin_mask(image.shape[-2:], self.threshold, self.min_scale_exp,
                               self.max_scale_exp, self.rotate, generator)
            if region is not None:
                mask = mask * region
            if mask.sum() > 0:
                return mask
        return mask

    def synthesize(self, image: torch.Tensor, generator: torch.Generator | None = None):
        """One image ``[3, H, W]`` -> ``(augmented [3, H, W], mask [H, W])``."""
        if float(torch.rand(1, generator=generator)) < self.normal_fraction:
            return image.clone(), image.new_zeros(image.shape[-2:])
        mask = self._mask(image, generator).to(image)
        beta = float(torch.rand(1, generator=generator)) * self.beta_max
        return blend(image, self._source(image, generator), mask, beta), mask

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """A batch ``[B, 3, H, W]`` (or one ``[3, H, W]``) -> ``(augmented, masks [B, H, W])``."""
        if images.ndim == 3:
            return self.synthesize(images, generator)
        pairs = [self.synthesize(image, generator) for image in images]
        return torch.stack([a for a, _ in pairs]), torch.stack([m for _, m in pairs])


@dataclass
class MultiScaleSynthesizer(AnomalySynthesizer):
    """TDAD's multi-scale synthesis: like :class:`AnomalySynthesizer`, but each anomalous sample
    first draws one of ``scales`` uniformly (:data:`MASK_SCALES`: fine and medium Perlin blobs,
    large irregular regions), so small and large defects are equally common. DRAEM's single
    draw of ``2^k, k in [0, 5]`` mostly yields medium blobs; TDAD adds the large regions a
    reconstruction model finds hardest to repair. Foreground restriction, sources and the
    blend are the parent's."""

    scales: tuple = ("fine", "medium", "large")

    def _mask(self, image: torch.Tensor, generator) -> torch.Tensor:
        region = foreground_mask(image) if self.foreground else None
        if region is not None and region.sum() == 0:
            region = None
        scale = self.scales[int(torch.randint(len(self.scales), (1,), generator=generator))]
        for _ in range(max(1, self.max_tries)):
            mask = scaled_mask(image.shape[-2:], scale, self.threshold, generator)
            if region is not None:
                mask = mask * region
            if mask.sum() > 0:
                return mask
        return mask
