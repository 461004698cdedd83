"""Texture sources for training-time anomaly synthesis: DTD, or offline stand-ins for it.

DRAEM (Zavrtanik et al., ICCV 2021, Sec. 3.3), GLAD's anomaly synthesis (Yao et al., ECCV
2024) and TDAD make a fake defect by pasting a *texture image* into a normal image inside a
Perlin-noise mask (:class:`adlab.data.synthesis.AnomalySynthesizer`). The papers take their
textures from the Describable Textures Dataset (DTD; Cimpoi et al., "Describing Textures in
the Wild", CVPR 2014): 5640 photos of 47 texture classes (banded, cracked, woven, ...).
DTD is a 0.6 GB download, which the quick profile and CI cannot make, so there are two
sources with one format, ``float32 [N, 3, size, size]`` in [0, 1] (what
``AnomalySynthesizer(textures=...)`` takes):

* :func:`dtd_textures` — DTD itself (paper profile), as
  ``python data_scripts/download.py dtd --root ROOT`` leaves it: ``ROOT/dtd/<class>/*.jpg``;
* :func:`offline_textures` — stand-ins that need no download (quick profile): scikit-image's
  bundled brick, grass and gravel photos, each cropped and tinted in three colourways, and
  the synthetic factory's weave and stone renderers recoloured, 13 textures in all;
* :func:`texture_bank` — either, chosen by name (``source="offline"`` or ``"dtd"``).

What the stand-ins deliberately do *not* use: :func:`adlab.data.synthetic.foreign_texture`
and the factory's defect functions (``defect_*``). Those draw the *test* set's defects
(``foreign_texture`` is the very material of the ``foreign_patch`` defect); training on them
would leak the test defects' appearance into training, and a method's score would then say
how well it memorised the factory's defects rather than how well it detects the unknown.
The weave and stone renderers draw *normal* images; they are recoloured here (other colour
ramps, other seeds) so that no stand-in equals a normal image of those categories.

The offline bank is deterministic (fixed crops, fixed seeds, no randomness elsewhere):
the same call gives the same tensor. Every resize is bilinear with antialiasing.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adlab.data import synthetic
from adlab.data.mvtec import IMAGE_EXTENSIONS, DatasetError, load_image
from adlab.progress import progress

__all__ = ["offline_textures", "dtd_textures", "texture_bank", "TEXTURE_SOURCES",
           "DTD_FOLDER"]

TEXTURE_SOURCES = ("offline", "dtd")
DTD_FOLDER = "dtd"              # download(): <root>/dtd/<class>/*.jpg (catalogue name "dtd")

# scikit-image's bundled grayscale 512 x 512 photos (skimage.data, no download needed): each
# gives three square crops, 3/4 of the photo wide, at different places, each tinted with its
# own colour ramp (dark colour -> light colour) so the bank has colour variety.
_CROP = 384
_SKIMAGE_TINTS = {
    "brick": [((0, 0), ((0.30, 0.10, 0.06), (0.88, 0.52, 0.36))),     # terracotta
              ((128, 128), ((0.10, 0.13, 0.25), (0.62, 0.72, 0.88))),  # slate blue
              ((0, 128), ((0.25, 0.18, 0.05), (0.96, 0.82, 0.42)))],   # ochre
    "grass": [((0, 0), ((0.04, 0.18, 0.04), (0.56, 0.86, 0.36))),      # green
              ((128, 128), ((0.26, 0.20, 0.08), (0.92, 0.86, 0.56))),  # straw
              ((128, 0), ((0.15, 0.05, 0.22), (0.78, 0.56, 0.88)))],   # violet
    "gravel": [((0, 0), ((0.20, 0.17, 0.14), (0.82, 0.76, 0.68))),     # grey-brown
               ((128, 128), ((0.02, 0.15, 0.17), (0.50, 0.86, 0.80))),  # teal
               ((64, 64), ((0.26, 0.08, 0.02), (0.96, 0.56, 0.26)))],  # rust
}
# The synthetic factory's texture renderers (normal weave / stone images), rendered at
# _RENDER px from seeds of their own and mapped through colour ramps the factory never uses
# (its weave is linen, its stone grey granite).
_RENDER = 256
_SYNTHETIC_TINTS = {
    "weave": [(101, ((0.03, 0.05, 0.22), (0.46, 0.62, 0.96))),         # navy
              (102, ((0.22, 0.02, 0.06), (0.96, 0.42, 0.46)))],        # crimson
    "stone": [(201, ((0.04, 0.20, 0.12), (0.70, 0.92, 0.76))),         # green marble
              (202, ((0.30, 0.08, 0.24), (1.00, 0.76, 0.46)))],        # sunset
}
_RENDERERS = {"weave": "texture_weave", "stone": "texture_stone"}   # synthetic.<name>


# --------------------------------------------------------------------------- helpers

def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``[3, H, W]`` to a square, then resize it to ``[3, size, size]``
    (bilinear, antialiased, clamped to [0, 1])."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[:, top:top + side, left:left + side]
    if side == size:
        return image.contiguous()
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def _tint(gray: np.ndarray, dark, light) -> torch.Tensor:
    """A grayscale array mapped through the colour ramp ``dark -> light``: ``[3, H, W]``.

    The gray levels are stretched first (1st to 99th percentile -> 0 to 1), so every
    source uses its ramp's full range.
    """
    low, high = np.percentile(gray, [1, 99])
    t = np.clip((gray - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
    dark, light = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    rgb = dark[:, None, None] + t[None] * (light - dark)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray(rgb))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``[H, W, 3]`` array."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)


# --------------------------------------------------------------------------- offline

@lru_cache(maxsize=4)
def _offline_bank(size: int) -> torch.Tensor:
    """The offline bank at ``size`` px, computed once per size (callers get a copy)."""
    import skimage.data

    textures = []
    for name, crops in _SKIMAGE_TINTS.items():
        gray = getattr(skimage.data, name)().astype(np.float32) / 255.0      # [512, 512]
        for (top, left), (dark, light) in crops:
            crop = gray[top:top + _CROP, left:left + _CROP]
            textures.append(_resize_square(_tint(crop, dark, light), size))
    for name, renders in _SYNTHETIC_TINTS.items():
        render = getattr(synthetic, _RENDERERS[name])
        for seed, (dark, light) in renders:
            rgb = render(np.random.default_rng([seed, _RENDER]), _RENDER)   # [H, W, 3] in [0, 1]
            textures.append(_resize_square(_tint(_luminance(rgb), dark, light), size))
    return torch.stack(textures).float()


def offline_textures(size: int = 128) -> torch.Tensor:
    """Stand-ins for DTD that need no download: ``float32 [13, 3, size, size]`` in [0, 1].

    In this order: nine from scikit-image's bundled grayscale photos ``skimage.data.brick()``,
    ``grass()`` and ``gravel()`` (512 x 512): three crops of each, tinted with three colour
    ramps; then four (two weave, two stone) from the synthetic factory's normal-texture renderers
    (:func:`adlab.data.synthetic.texture_weave`, :func:`~adlab.data.synthetic.texture_stone`)
    drawn from fixed seeds of their own and recoloured, so none equals a normal image of the
    ``weave`` or ``stone`` category.

    Not used, on purpose: :func:`adlab.data.synthetic.foreign_texture` and the factory's
    defect functions, which draw the test set's defects; training on them would leak the
    test defects' appearance into training (see the module docstring).

    Deterministic: the same ``size`` gives the same tensor (a fresh copy each call).
    """
    return _offline_bank(_check_positive_int("size", size)).clone()


# --------------------------------------------------------------------------- DTD

def _dtd_files(root) -> list[Path]:
    """The image files of ``<root>/dtd/<class>/``, sorted by class and name."""
    root = Path(root).expanduser()
    folder = root / DTD_FOLDER
    if not folder.is_dir():
        hint = (f" ({root} looks like the dtd folder itself: pass its parent {root.parent} "
                "as root.)" if root.name == DTD_FOLDER and root.is_dir() else "")
        raise DatasetError(
            f"No DTD textures at {folder}: download them (about 0.6 GB) with "
            f"`python data_scripts/download.py dtd --root {root}`, or use the offline "
            f"stand-ins, texture_bank(size, source='offline').{hint}")
    files = [p for cls in sorted(folder.iterdir()) if cls.is_dir() and not cls.name.startswith(".")
             for p in sorted(cls.iterdir())
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not p.name.startswith(".")]
    if not files:
        raise DatasetError(
            f"{folder} holds no images in <class>/ folders ({', '.join(IMAGE_EXTENSIONS)}). "
            f"Delete {folder} and run `python data_scripts/download.py dtd --root {root}` "
            "again.")
    return files


def dtd_textures(root, size: int = 256, limit: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """DTD texture images, ``float32 [N, 3, size, size]`` in [0, 1].

    Reads ``<root>/dtd/<class>/*.jpg``, the layout ``python data_scripts/download.py dtd
    --root ROOT`` leaves (``root`` is that ``ROOT``, the folder that holds ``dtd/``). Each
    image (DTD's are a few hundred pixels a side, rarely square) is centre-cropped to a
    square and resized (bilinear, antialiased). ``limit`` keeps a random subset of that
    many images, drawn with ``seed`` (same seed, same subset; order by class and file name):
    all 5640 images take 4.4 GB as float32 at 256 px, so pass e.g. ``limit=1000`` (0.8 GB)
    unless you need them all. Grayscale images are converted to RGB; a missing ``dtd/``
    folder, or a corrupt image, raises :class:`adlab.data.mvtec.DatasetError` saying what
    to do.
    """
    size = _check_positive_int("size", size)
    if limit is not None:
        limit = _check_positive_int("limit", limit)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    files = _dtd_files(root)
    if limit is not None and limit < len(files):
        keep = np.random.default_rng(int(seed)).choice(len(files), size=limit, replace=False)
        files = [files[i] for i in sorted(keep)]
    out = torch.empty(len(files), 3, size, size)        # filled in place: one copy in memory
    for i, path in enumerate(progress(files, desc="DTD textures", unit="img",
                                      disable=len(files) < 100)):
        out[i] = _resize_square(load_image(path), size)
    return out


# --------------------------------------------------------------------------- either

def texture_bank(size: int, source: str = "offline", root: str | os.PathLike | None = None,
                 limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """Textures for anomaly synthesis, ``float32 [N, 3, size, size]`` in [0, 1].

    ``source="offline"``: :func:`offline_textures` (no download; ``root``, ``limit`` and
    ``seed`` are not used). ``source="dtd"``: :func:`dtd_textures` from ``root``, the folder
    given to ``data_scripts/download.py dtd --root`` (required), with ``limit`` and ``seed``.
    """
    choice = source.strip().lower() if isinstance(source, str) else source
    if choice == "offline":
        return offline_textures(size)
    if choice == "dtd":
        if root is None:
            raise DatasetError(
                "texture_bank(source='dtd') needs root=, the folder that holds dtd/ (the one "
                "given to `python data_scripts/download.py dtd --root ROOT`).")
        return dtd_textures(root, size=size, limit=limit, seed=seed)
    raise ValueError(f"Unknown texture source {source!r}; choose one of "
                     f"{', '.join(repr(s) for s in TEXTURE_SOURCES)}.")
