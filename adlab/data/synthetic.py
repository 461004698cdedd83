"""The synthetic dataset factory: small MVTec-AD-like datasets drawn from a seed.

Real inspection datasets (MVTec AD, VisA, MPDD) are large downloads; the
``quick`` profile instead draws a small dataset of its own, in exactly the
MVTec AD folder layout, so every loader, notebook and test works unchanged on
either::

    <root>/<category>/train/good/000.png            defect-free training images
    <root>/<category>/test/good/000.png             defect-free test images
    <root>/<category>/test/<defect>/000.png         defective test images
    <root>/<category>/ground_truth/<defect>/000_mask.png
                                                    0/255 masks (L mode)

Four categories, two textures and two objects (``CATEGORIES``)::

    weave   texture   plain-weave fabric: over/under threads, small jitter
    stone   texture   granite-like stone: fractal (multi-octave) noise + grains
    nut     object    a hexagon nut on a plain background, small pose/light change
    pins    object    a connector board with exactly 2 x 4 identical pins
                      (a *logical* category: wrong count / wrong place is a defect)

Defect kinds (``DEFECTS``) are drawn on top of a normal image. Each defect is
drawn from an *alpha map* (a per-pixel opacity computed from the geometry:
a curve, a blob, a disc); the ground-truth mask is the support of that alpha
map (``alpha > 0``). So the mask is exactly the set of pixels the drawing may
change: it is computed from the drawing, not thresholded from an image
difference afterwards. For the logical defects the mask of a missing part is
where it should be, of an extra part where it is, and of a misplaced part both.
Size and contrast are drawn per image from a range
(from a few pixels to a large region, from faint to obvious, mostly
log-uniform so small and faint defects are as common as large, obvious ones),
as in MVTec AD, so that methods are separated rather than all scoring 1.0.
Normal images vary as real ones do (the weave's phase, period and rotation,
an object's pose and lighting), so a per-pixel model of the mean image is not
enough; many logical pins defects are locally plausible (a pin in a socket
of its own, a position with neither pin nor socket), so a model of local
appearance alone is not enough either.

Everything is deterministic: each image uses its own
``numpy.random.Generator`` seeded with ``(seed, category, split, index)``, the
PNGs are written by Pillow with fixed options and no time-dependent metadata,
so the same seed and size give byte-identical files.

Main entry points: :func:`generate` (write a dataset to a folder),
:func:`ensure_synthetic` (the cached dataset the quick profile uses),
:func:`sample` (one image and mask in memory, e.g. to show in a notebook).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from adlab.config import remove_stale_temps, temp_path

#: category name -> "texture" or "object"
CATEGORIES: dict[str, str] = {
    "weave": "texture",
    "stone": "texture",
    "nut": "object",
    "pins": "object",
}

#: category name -> the defect kinds of its test set (folder names under ``test/``)
DEFECTS: dict[str, list[str]] = {
    "weave": ["scratch", "hole", "stain", "foreign_patch"],
    "stone": ["crack", "hole", "stain", "foreign_patch"],
    "nut": ["scratch", "chip", "stain", "foreign_patch"],
    "pins": ["missing_pin", "extra_pin", "misplaced_pin", "stain"],
}

#: categories whose defects include logical ones (wrong count / wrong place)
LOGICAL_DEFECTS: dict[str, list[str]] = {
    "pins": ["missing_pin", "extra_pin", "misplaced_pin"],
}

# Default counts per category: the whole set (448 images + 128 masks) takes ~4 s at 128 px
# on one core.
N_TRAIN = 60
N_TEST_GOOD = 20
N_PER_DEFECT = 8

MIN_SIZE, MAX_SIZE = 64, 512
#: on textures a defect is centred at least this fraction of the image away from the border
EDGE_MARGIN = 0.08
#: bump when the drawing changes, so cached datasets from an older factory are redrawn
FACTORY_VERSION = 3
MARKER = ".adlab-synthetic.json"

# A colour image is a float32 array [H, W, 3] in [0, 1] while drawing.
Array = np.ndarray


# --------------------------------------------------------------------------------------
# Small drawing helpers: coordinates, noise, shapes as signed distances, alpha blending
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(y, x)``, each ``[size, size]`` float32 (read-only)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """White noise blurred by a Gaussian of width ``sigma`` px, rescaled to zero mean, unit std.

    The blur wraps around, so the field tiles; its blobs are about ``2 sigma`` px wide.
    """
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                    sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _fractal_noise(rng: np.random.Generator, size: int, base_sigma: float,
                   octaves: int = 4, persistence: float = 0.55) -> Array:
    """Fractal (multi-octave) noise: a sum of smooth noises, each octave half as wide and
    ``persistence`` times as strong as the previous one. Zero mean, unit std."""
    total = np.zeros((size, size), np.float32)
    amplitude, sigma = 1.0, base_sigma
    for _ in range(octaves):
        total += amplitude * _smooth_noise(rng, size, max(sigma, 0.5))
        amplitude *= persistence
        sigma /= 2.0
    return (total - total.mean()) / (total.std() + 1e-8)


def _coverage(signed_distance: Array) -> Array:
    """Anti-aliased opacity from a signed distance in pixels (negative inside the shape).

    Opacity ramps linearly from 1 (0.5 px inside the edge) to 0 (0.5 px outside), so a
    shape's support ``coverage > 0`` is the set of pixels within half a pixel of it.
    """
    return np.clip(0.5 - signed_distance, 0.0, 1.0).astype(np.float32)


def _blend(image: Array, paint, alpha: Array) -> Array:
    """``image * (1 - alpha) + paint * alpha`` with ``alpha [H, W]``; paint is a colour or image."""
    a = alpha[..., None]
    return (image * (1.0 - a) + np.asarray(paint, np.float32) * a).astype(np.float32)


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A value between ``low`` and ``high`` whose log is uniform (small values as likely as large)."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _blob_distance(size: int, centre: tuple[float, float], radius: float,
                   rng: np.random.Generator, roughness: float = 0.25,
                   aspect: float = 1.0, angle: float = 0.0) -> Array:
    """Approximate signed distance to an irregular blob (a star-shaped, wobbly ellipse).

    The boundary radius is ``radius * (1 + sum_k a_k cos(k theta + phi_k))`` for k = 2..5,
    with random amplitudes ``a_k`` scaled by ``roughness``.
    """
    y, x = _grid(size)
    dy, dx = y - centre[0], x - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, (-s * dx + c * dy) * aspect
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    boundary = np.ones_like(rho)
    for k in range(2, 6):
        boundary += roughness * rng.uniform(0, 1) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rho - radius * np.maximum(boundary, 0.3)


def _segment_distance(size: int, points: Array) -> Array:
    """Distance from every pixel centre to a polyline given as ``[n, 2]`` (y, x) points."""
    y, x = _grid(size)
    best = np.full((size, size), np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
        np.minimum(best, np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)), out=best)
    return best


def _random_curve(rng: np.random.Generator, start: tuple[float, float], length: float,
                  bend: float, n: int = 16) -> Array:
    """A random curve of ``n`` segments: a walk whose heading turns by ``N(0, bend)`` per step."""
    heading = rng.uniform(0, 2 * np.pi)
    step = length / n
    points = [np.asarray(start, np.float64)]
    for _ in range(n):
        heading += rng.normal(0.0, bend)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    return np.stack(points)


def _pick_point(rng: np.random.Generator, allowed: Array | None, size: int,
                margin: float = 0.0) -> tuple[float, float]:
    """A random pixel centre, uniform over ``allowed`` (a boolean mask) or the whole image
    less ``margin`` pixels along each border (textures: a defect centred on the border
    would be mostly out of view)."""
    if allowed is None:
        return tuple(rng.uniform(margin, size - 1 - margin, 2))
    ys, xs = np.nonzero(allowed)
    i = rng.integers(len(ys))
    return float(ys[i]), float(xs[i])


def _rotate(u: Array, v: Array, angle: float) -> tuple[Array, Array]:
    """Rotate coordinates by ``angle`` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return c * u - s * v, s * u + c * v


# --------------------------------------------------------------------------------------
# Textures: the whole image is one stationary pattern
# --------------------------------------------------------------------------------------

def texture_weave(rng: np.random.Generator, size: int) -> Array:
    """A plain-weave fabric: vertical (warp) and horizontal (weft) threads crossing over and
    under each other in a checkerboard order.

    Each cell of the thread grid shows the thread on top: the warp where ``(i + j)`` is even,
    the weft where it is odd. A thread is shaded as a round cord (bright along its middle)
    that rises in the middle of the cell where it is on top and dips at the crossings.
    Natural variation per image, as between photos of a real fabric: a random phase
    (shift) of the whole pattern, thread period (+-4 %), rotation (+-1.5 deg), a smooth
    displacement field (threads are not perfectly straight, up to ~0.1 period), brightness
    (+-5 %), per-thread brightness, and fibre noise along each thread. The random phase and
    rotation mean no pixel sees the same part of the pattern in every image: a per-pixel
    model (the mean image) learns little, while a shift-invariant patch model (PatchCore)
    still sees only normal patches.
    """
    y, x = _grid(size)
    period = size / 10.5 * rng.uniform(0.96, 1.04)     # ~12 px at 128 px
    angle = np.deg2rad(rng.uniform(-1.5, 1.5))
    wobble = 0.08 * period
    u, v = _rotate(x, y, angle)
    u = u + rng.uniform(0, 2 * period) + wobble * _smooth_noise(rng, size, period)
    v = v + rng.uniform(0, 2 * period) + wobble * _smooth_noise(rng, size, period)
    i, j = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - i, v / period - j               # position inside the cell, [0, 1)

    half_width = 0.40                                     # thread half-width (fraction of period)
    in_warp = np.abs(fu - 0.5) < half_width
    in_weft = np.abs(fv - 0.5) < half_width
    warp_on_top = (i + j) % 2 == 0
    show_warp = in_warp & (warp_on_top | ~in_weft)
    show_weft = in_weft & ~show_warp

    # round-cord cross-section times the rise/dip along the thread
    cross_warp = np.sqrt(np.clip(1 - ((fu - 0.5) / half_width) ** 2, 0, 1))
    cross_weft = np.sqrt(np.clip(1 - ((fv - 0.5) / half_width) ** 2, 0, 1))
    shade_warp = cross_warp * (0.6 + 0.4 * np.sin(np.pi * fv))
    shade_weft = cross_weft * (0.6 + 0.4 * np.sin(np.pi * fu))

    # per-thread brightness and fibre noise stretched along the thread direction
    thread_gain = 1.0 + 0.04 * rng.standard_normal(64)
    gain_warp = thread_gain[(i.astype(int) % 32)]
    gain_weft = thread_gain[32 + (j.astype(int) % 32)]
    white = rng.standard_normal((size, size)).astype(np.float32)
    fibre_warp = ndimage.gaussian_filter(white, (period * 0.25, 0.6), mode="wrap")
    fibre_weft = ndimage.gaussian_filter(white, (0.6, period * 0.25), mode="wrap")
    fibre_warp /= fibre_warp.std() + 1e-8
    fibre_weft /= fibre_weft.std() + 1e-8

    base = np.array([0.72, 0.62, 0.45]) * rng.uniform(0.95, 1.05)   # linen, +-5 % brightness
    warp_colour, weft_colour = base * 1.0, base * np.array([0.93, 0.95, 1.0])
    gap_colour = base * 0.55

    lum_warp = (0.65 + 0.35 * shade_warp) * gain_warp + 0.03 * fibre_warp
    lum_weft = (0.65 + 0.35 * shade_weft) * gain_weft + 0.03 * fibre_weft
    image = np.empty((size, size, 3), np.float32)
    image[:] = gap_colour
    image[show_warp] = lum_warp[show_warp, None] * warp_colour
    image[show_weft] = lum_weft[show_weft, None] * weft_colour
    return np.clip(image, 0, 1)


def texture_stone(rng: np.random.Generator, size: int) -> Array:
    """A granite-like stone surface: fractal noise mapped through a colour ramp, plus grains.

    Four octaves of smooth noise (largest blobs ~1/6 of the image) give the mottled,
    cloudy structure; a second, finer noise tints it; scattered one- to two-pixel grains
    (dark mica, light quartz) give the speckle seen on polished stone.
    """
    n = _fractal_noise(rng, size, base_sigma=size / 12, octaves=4, persistence=0.6)
    tint = _smooth_noise(rng, size, size / 24)
    t = 1.0 / (1.0 + np.exp(-1.6 * n))                   # soft ramp position in (0, 1)
    gain = rng.uniform(0.97, 1.03)                       # +-3 % brightness
    dark = np.array([0.40, 0.37, 0.35]) * gain
    light = np.array([0.76, 0.72, 0.66]) * gain
    image = dark + t[..., None] * (light - dark)
    image = image * (1.0 + 0.04 * tint[..., None] * np.array([1.0, 0.6, 0.2]))

    # grains: sparse specks, a little larger at larger image sizes
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                    max(0.5, size / 256), mode="wrap")
    grain /= grain.std() + 1e-8
    image[grain > 2.6] *= 0.7                             # dark grains
    image[grain < -2.8] = image[grain < -2.8] * 0.6 + 0.35  # light grains
    return np.clip(image, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------
# Objects: one thing on a plain background, with a known shape (used to place defects)
# --------------------------------------------------------------------------------------

@dataclass
class Scene:
    """A rendered normal image plus what its defects need to know.

    ``image`` is ``[H, W, 3]`` float; ``allowed`` is where surface defects may go (the
    object, or the whole image for textures). ``redraw`` re-renders the scene from
    changed parameters (used by the chip and the logical defects).
    """

    image: Array
    allowed: Array | None = None
    params: dict | None = None
    redraw: Callable[..., Array] | None = None


def _background(rng: np.random.Generator, size: int, colour, shadow_alpha: Array | None,
                shadow_offset: float) -> Array:
    """A plain background with a gentle lighting gradient and a soft drop shadow."""
    y, x = _grid(size)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = ((np.cos(direction) * x + np.sin(direction) * y) / size - 0.5) * 0.06
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.asarray(colour, np.float32)
    image *= (1.0 + gradient)[..., None]
    if shadow_alpha is not None:
        shift = ndimage.shift(shadow_alpha, (shadow_offset, shadow_offset), order=1, mode="constant")
        shadow = ndimage.gaussian_filter(shift, size / 60)
        image *= (1.0 - 0.35 * shadow)[..., None]
    return image


def _hexagon_distance(u: Array, v: Array, apothem: float, angle: float) -> Array:
    """Signed distance (exact inside, close outside) to a regular hexagon of given apothem."""
    d = np.full(u.shape, -np.inf, np.float32)
    for k in range(6):
        phi = angle + k * np.pi / 3
        d = np.maximum(d, np.cos(phi) * u + np.sin(phi) * v - apothem)
    return d


def object_nut(rng: np.random.Generator, size: int) -> Scene:
    """A hexagon nut seen from above, centred on a plain light background.

    Geometry: a hexagon (circumradius ~1/3 of the image) with a round threaded hole and
    the circular chamfer line of a real nut face. Small variation per image: position
    (+-4 % of the image), rotation (+-8 deg), scale (+-3 %), brightness and the light
    direction of the brushed-metal shading. The nut casts a soft shadow.
    Returns a :class:`Scene` whose ``redraw(chip_alpha)`` removes material (the chip defect).
    """
    y, x = _grid(size)
    centre = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    angle = np.deg2rad(rng.uniform(-8, 8))
    radius = 0.33 * size * rng.uniform(0.97, 1.03)        # circumradius
    apothem = radius * np.cos(np.pi / 6)
    hole = 0.42 * apothem
    u, v = x - centre[1], y - centre[0]
    rho = np.hypot(u, v)

    outer = _hexagon_distance(u, v, apothem, angle)
    body_alpha = _coverage(np.maximum(outer, hole - rho))          # hexagon minus hole
    face_alpha = _coverage(rho - 0.93 * apothem)                    # inside the chamfer circle
    thread_alpha = _coverage(rho - 1.22 * hole)                     # the threaded bore edge

    light = np.deg2rad(225 + rng.uniform(-15, 15))
    gain = rng.uniform(0.92, 1.08)
    slope = (np.cos(light) * u + np.sin(light) * v) / radius        # -1..1 across the nut
    brushed = _smooth_noise(rng, size, 0.8)
    metal = np.array([0.62, 0.62, 0.64]) * gain
    face = metal * (1.0 + 0.18 * slope + 0.03 * brushed)[..., None]
    chamfer = metal * (0.82 - 0.10 * slope + 0.03 * brushed)[..., None]
    bands = 0.5 + 0.5 * np.cos(2 * np.pi * (rho - hole) / max(size / 64, 1.5))
    thread = metal * (0.45 + 0.15 * bands - 0.08 * slope)[..., None]

    surface = _blend(chamfer, face, face_alpha)
    surface = _blend(surface, thread, thread_alpha)
    bg_colour = np.array([0.86, 0.87, 0.89]) + rng.uniform(-0.02, 0.02)
    # the background (with the intact nut's shadow) is drawn once: a chip changes only
    # the pixels of the chip itself
    background = _background(rng, size, bg_colour, body_alpha, 0.02 * size)

    def redraw(chip_alpha: Array | None = None) -> Array:
        alpha = body_alpha if chip_alpha is None else body_alpha * (1.0 - chip_alpha)
        return np.clip(_blend(background, surface, alpha), 0, 1)

    params = dict(centre=centre, angle=angle, radius=radius, apothem=apothem, hole=hole,
                  body_alpha=body_alpha)
    return Scene(image=redraw(), allowed=body_alpha >= 1.0, params=params, redraw=redraw)


PIN_ROWS, PIN_COLS = 2, 4


def _pin_layer(size: int, positions: Iterable[tuple[float, float]], radius: float,
               light: float) -> tuple[Array, Array]:
    """Draw round gold pins at image positions ``(y, x)``: returns (colour image, alpha).

    Each pin is shaded like a dome (bright centre, darker rim) with a specular highlight
    toward the light. The alpha's support is exactly the pins' discs (plus half a pixel).
    """
    y, x = _grid(size)
    colour = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    gold = np.array([0.86, 0.70, 0.32], np.float32)
    hl_dy, hl_dx = -0.35 * radius * np.sin(light), -0.35 * radius * np.cos(light)
    for py, px in positions:
        # only touch a small window around the pin (fast at large sizes)
        y0, y1 = max(int(py - radius - 2), 0), min(int(py + radius + 3), size)
        x0, x1 = max(int(px - radius - 2), 0), min(int(px + radius + 3), size)
        if y0 >= y1 or x0 >= x1:
            continue
        wy, wx = y[y0:y1, x0:x1] - py, x[y0:y1, x0:x1] - px
        r = np.hypot(wy, wx)
        a = _coverage(r - radius)
        dome = np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1))
        spec = np.exp(-((wy - hl_dy) ** 2 + (wx - hl_dx) ** 2) / (2 * (0.25 * radius) ** 2))
        shade = gold * (0.55 + 0.45 * dome)[..., None] + 0.35 * spec[..., None]
        colour[y0:y1, x0:x1] = np.where((a > alpha[y0:y1, x0:x1])[..., None], shade,
                                        colour[y0:y1, x0:x1])
        alpha[y0:y1, x0:x1] = np.maximum(alpha[y0:y1, x0:x1], a)
    return np.clip(colour, 0, 1), alpha


def object_pins(rng: np.random.Generator, size: int) -> Scene:
    """A connector board with exactly 2 x 4 identical gold pins in a fixed grid.

    A green circuit board (rounded rectangle, +-3 deg rotation, +-3 % shift) on a plain
    background; white silkscreen lines frame the pin field, a white dot marks pin 1.
    Each pin sits in a dark plated socket. This is the *logical* category: a normal
    board has all eight pins in their sockets, so a missing, an extra, or a misplaced
    pin is a defect even though every pin looks perfect on its own.
    Returns a :class:`Scene` whose ``redraw(pins, socket_points)`` draws the board with
    pins at board coordinates ``pins`` (``[n, 2]``, (row, column) offsets in pixels) and,
    optionally, sockets at ``socket_points`` (same form; default: the eight normal ones).
    """
    y, x = _grid(size)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    angle = np.deg2rad(rng.uniform(-3, 3))
    half_h, half_w = 0.27 * size, 0.40 * size
    corner = 0.05 * size
    # board coordinates (b_v down, b_u right) of every pixel
    b_u, b_v = _rotate(x - centre[1], y - centre[0], -angle)
    q_u, q_v = np.abs(b_u) - (half_w - corner), np.abs(b_v) - (half_h - corner)
    board_d = (np.hypot(np.maximum(q_u, 0), np.maximum(q_v, 0))      # rounded-rectangle distance
               + np.minimum(np.maximum(q_u, q_v), 0) - corner)
    board_alpha = _coverage(board_d)

    spacing = 0.15 * size
    radius = 0.045 * size
    rows = (np.arange(PIN_ROWS) - (PIN_ROWS - 1) / 2) * spacing * 1.25
    cols = (np.arange(PIN_COLS) - (PIN_COLS - 1) / 2) * spacing
    sockets = np.array([(r, c) for r in rows for c in cols], np.float64)   # (v, u) board coords

    gain = rng.uniform(0.92, 1.08)
    pcb = (np.array([0.10, 0.38, 0.20]) + rng.uniform(-0.02, 0.02, 3)) * gain
    fibre = _smooth_noise(rng, size, 0.7)                 # the glass-fibre grain of the board
    board = pcb * (1.0 + 0.05 * fibre + 0.08 * b_u / size)[..., None]
    # silkscreen frame around the pin field and the pin-1 dot
    frame_u, frame_v = cols[-1] + 0.9 * spacing, rows[-1] + 0.75 * spacing
    frame_d = np.abs(np.maximum(np.abs(b_u) - frame_u, np.abs(b_v) - frame_v)) - 0.006 * size
    board = _blend(board, [0.92, 0.93, 0.90], 0.9 * _coverage(frame_d))
    dot_d = np.hypot(b_u - (cols[0] - 0.55 * spacing), b_v - (rows[0] - 0.55 * spacing)) - 0.015 * size
    board = _blend(board, [0.92, 0.93, 0.90], 0.9 * _coverage(dot_d))

    def add_sockets(image: Array, points: Array,
                    where: Array | float = 1.0) -> tuple[Array, Array]:
        """Draw sockets (a plated ring with a dark bore, visible only where a pin is missing)
        at board coordinates ``points``; returns the image and the sockets' alpha."""
        r = np.min([np.hypot(b_u - su, b_v - sv) for sv, su in points], axis=0)
        ring = _coverage(r - 1.3 * radius) * where
        image = _blend(image, [0.55, 0.50, 0.38], ring)
        return _blend(image, [0.05, 0.05, 0.05], _coverage(r - 0.55 * radius) * where), ring

    background = _background(rng, size, np.array([0.80, 0.82, 0.85]) + rng.uniform(-0.02, 0.02),
                             board_alpha, 0.015 * size)

    def render(socket_points: Array) -> Array:
        """The board with sockets at ``socket_points`` (no pins) on the background."""
        return _blend(background, add_sockets(board, socket_points)[0], board_alpha)

    scene = render(sockets)
    light = np.deg2rad(225 + rng.uniform(-15, 15))

    def to_image(points: Array) -> list[tuple[float, float]]:
        """Board (v, u) coordinates -> image (y, x)."""
        iu, iv = _rotate(points[:, 1], points[:, 0], angle)
        return list(zip(iv + centre[0], iu + centre[1]))

    def redraw(pins: Array = sockets, socket_points: Array | None = None) -> Array:
        base = scene if socket_points is None else render(np.asarray(socket_points, np.float64))
        colour, alpha = _pin_layer(size, to_image(np.asarray(pins, np.float64)), radius, light)
        return np.clip(_blend(base, colour, alpha), 0, 1)

    params = dict(sockets=sockets, radius=radius, spacing=spacing, half_h=half_h,
                  half_w=half_w, to_image=to_image, pin_alpha=lambda pins: _pin_layer(
                      size, to_image(np.asarray(pins, np.float64)), radius, light)[1],
                  socket_alpha=lambda points: add_sockets(board, points, board_alpha)[1])
    board_inside = (board_alpha >= 1.0)
    return Scene(image=redraw(), allowed=board_inside, params=params, redraw=redraw)


# --------------------------------------------------------------------------------------
# Defects: each takes a Scene and a Generator and returns (image, mask)
# --------------------------------------------------------------------------------------

def _restrict(alpha: Array, allowed: Array | None) -> Array:
    """Keep a defect's opacity only where it may go (on the object)."""
    return alpha if allowed is None else alpha * allowed


def defect_scratch(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A scratch: a thin, gently curved line, lighter or darker than the surface.

    Length 5-45 % of the image (log-uniform: short ones as likely as long ones), width
    0.8-3 px at 128 px (scaled with the image), opacity 0.35-1.0 (log-uniform): from a short,
    faint hairline barely above the surface's own variation to an obvious gouge, as in
    MVTec AD. Mostly light on a dark surface and dark on a light one (one time in five the
    other way round).
    """
    size = scene.image.shape[0]
    scale = size / 128
    length = _loguniform(rng, 0.05, 0.45) * size
    half_width = rng.uniform(0.4, 1.5) * scale
    start = _pick_point(rng, scene.allowed, size, margin=EDGE_MARGIN * size)
    curve = _random_curve(rng, start, length, bend=0.12)
    curve -= (curve[len(curve) // 2] - curve[0])      # centre the curve on the picked point
    alpha = _restrict(_coverage(_segment_distance(size, curve) - half_width), scene.allowed)
    # mostly the opposite of the surface under it (light on dark, dark on light)
    under = float((scene.image.mean(-1) * alpha).sum() / max(alpha.sum(), 1e-6))
    light = (under < 0.5) != (rng.uniform() < 0.2)
    colour = [0.95, 0.95, 0.93] if light else [0.06, 0.05, 0.05]
    strength = _loguniform(rng, 0.35, 1.0)
    return _blend(scene.image, colour, strength * alpha), alpha > 0


def defect_crack(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A crack: a dark, jagged line with a side branch half the time.

    Built like a scratch but with sharper turns (a rougher walk); dark (the inside of the
    crack is in shadow), opacity 0.25-1.0 (log-uniform), length 5-50 % of the image
    (log-uniform), width 0.8-3 px at 128 px: from a short hairline crack that is barely
    darker than the stone's dark grains to an obvious split.
    """
    size = scene.image.shape[0]
    scale = size / 128
    length = _loguniform(rng, 0.05, 0.5) * size
    start = _pick_point(rng, scene.allowed, size, margin=EDGE_MARGIN * size)
    curve = _random_curve(rng, start, length, bend=0.45, n=20)
    distance = _segment_distance(size, curve) - rng.uniform(0.4, 1.5) * scale
    if rng.uniform() < 0.5:
        branch = _random_curve(rng, tuple(curve[rng.integers(4, 16)]), 0.4 * length, bend=0.5, n=8)
        distance = np.minimum(distance, _segment_distance(size, branch) - 0.5 * scale)
    alpha = _restrict(_coverage(distance), scene.allowed)
    strength = _loguniform(rng, 0.25, 1.0)
    return _blend(scene.image, [0.06, 0.05, 0.05], strength * alpha), alpha > 0


def defect_hole(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A hole: missing material with a ragged outline, through which the dark background shows.

    Radius 1.5-14 % of the image (log-uniform: many small holes of a few pixels, some
    large ones), a darker rim inside the edge, opacity 0.4-1.0 (a shallow pit to a hole
    right through).
    """
    size = scene.image.shape[0]
    radius = max(_loguniform(rng, 0.015, 0.14) * size, 1.5)
    centre = _pick_point(rng, scene.allowed, size, margin=EDGE_MARGIN * size)
    d = _blob_distance(size, centre, radius, rng, roughness=0.6,
                       aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi))
    alpha = _restrict(_coverage(d), scene.allowed)
    depth = np.clip(-d / max(radius, 1.0), 0, 1)          # 0 at the edge, 1 at the centre
    inside = np.array([0.10, 0.09, 0.08]) * (1.4 - 0.8 * depth)[..., None]
    strength = rng.uniform(0.4, 1.0)
    return _blend(scene.image, inside, strength * alpha), alpha > 0


def defect_chip(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A chip (missing material) broken out of the nut's outer or inner edge.

    An irregular disc of radius 2-13 % of the image (log-uniform: small nicks as likely as
    large bites) centred on the edge is cut out of the nut: the background shows through,
    and a dark, rough band along the break (the sloped fracture face, 1.5 px or a third of
    the radius wide) remains. The mask is the changed part of the nut (disc & nut).
    """
    size = scene.image.shape[0]
    p = scene.params
    radius = max(_loguniform(rng, 0.02, 0.13) * size, 2.0)
    if rng.uniform() < 0.75:                          # outer edge: a point on the hexagon
        k = rng.integers(6)
        t = rng.uniform(-0.8, 0.8)
        phi = p["angle"] + k * np.pi / 3
        along = t * p["radius"] / 2
        px = p["apothem"] * np.cos(phi) - along * np.sin(phi)
        py = p["apothem"] * np.sin(phi) + along * np.cos(phi)
    else:                                             # inner edge of the bore
        phi = rng.uniform(0, 2 * np.pi)
        px, py = p["hole"] * np.cos(phi), p["hole"] * np.sin(phi)
        radius = min(radius, 0.8 * p["hole"])
    cy, cx = p["centre"][0] + py, p["centre"][1] + px
    chip = _blob_distance(size, (cy, cx), radius, rng, roughness=0.4)
    width = max(1.5, radius / 3)
    removed = _coverage(chip + width)                 # the inner part: background shows
    face = _coverage(np.maximum(chip, -chip - width)) * p["body_alpha"]   # band along the break
    image = scene.redraw(removed)
    rough = 0.25 + 0.1 * _smooth_noise(rng, size, 0.7)
    image = _blend(image, (rough[..., None] * np.array([1.0, 1.0, 1.05])), face)
    changed = (_coverage(chip) > 0) & (p["body_alpha"] > 0)
    return image, changed


def defect_stain(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A colour stain (contamination): a translucent, irregular blot of oil, rust or ink.

    Radius 4-20 % of the image (log-uniform), the tint varies smoothly inside the blot,
    opacity 0.4-0.9 (times 0.5-1 inside the blot): from a small, faint discolouration to an
    obvious blot. Two kinds, as on real parts: two thirds are a foreign colour (rust, oil, ink,
    residue: one that differs from the surface under the stain); the other third are
    a water or grease mark in the surface's own hue, 30-50 % darker or lighter (opacity
    0.5-0.9), which
    stays within the colours a normal image shows elsewhere.
    """
    size = scene.image.shape[0]
    radius = max(_loguniform(rng, 0.04, 0.2) * size, 2.0)
    centre = _pick_point(rng, scene.allowed, size, margin=EDGE_MARGIN * size)
    d = _blob_distance(size, centre, radius, rng, roughness=0.8,
                       aspect=rng.uniform(0.6, 1.6), angle=rng.uniform(0, np.pi))
    alpha = _restrict(_coverage(d), scene.allowed)
    palette = np.array([[0.45, 0.25, 0.08],   # rust
                        [0.12, 0.10, 0.06],   # oil
                        [0.15, 0.25, 0.60],   # blue ink
                        [0.55, 0.15, 0.12],   # red
                        [0.85, 0.85, 0.55]])  # pale residue
    # a stain is a different colour from the surface under it: pick among the palette
    # colours that are far (> 0.35) from the surface's mean colour there
    under = (scene.image * alpha[..., None]).sum((0, 1)) / max(alpha.sum(), 1e-6)
    far = np.flatnonzero(np.linalg.norm(palette - under, axis=1) > 0.35)
    colour = palette[rng.choice(far)] if len(far) else palette[np.argmax(
        np.linalg.norm(palette - under, axis=1))]
    strength = rng.uniform(0.4, 0.9)
    if rng.uniform() < 1 / 3:                  # a mark in the surface's own hue
        factor = rng.uniform(0.5, 0.7) if rng.uniform() < 0.6 else rng.uniform(1.3, 1.5)
        colour = np.clip(under * factor, 0, 1)
        strength = rng.uniform(0.5, 0.9)
    variation = 0.75 + 0.25 * np.tanh(_smooth_noise(rng, size, max(radius / 3, 1.0)))
    return _blend(scene.image, colour, strength * variation * alpha), alpha > 0


def foreign_texture(rng: np.random.Generator, size: int) -> Array:
    """A texture that does not belong: stripes, a checkerboard, or coloured cloudy noise."""
    y, x = _grid(size)
    kind = rng.integers(3)
    c1, c2 = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    if kind == 0:                                   # stripes at a random angle
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3, 9) * size / 128
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(theta) * x + np.sin(theta) * y) / period)
    elif kind == 1:                                 # checkerboard
        cell = rng.uniform(2, 6) * size / 128
        t = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    else:                                           # cloudy noise
        t = 0.5 + 0.25 * _fractal_noise(rng, size, size / 30, octaves=3)
    return np.clip(c1 + np.clip(t, 0, 1)[..., None] * (c2 - c1), 0, 1).astype(np.float32)


def defect_foreign_patch(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """A foreign texture patch: a region where a different material shows (a mended or
    glued-on piece, a label, debris). Radius 3-22 % of the image (log-uniform), opacity
    0.35-1.0: from a small, half-transparent smudge to a large, opaque patch."""
    size = scene.image.shape[0]
    radius = max(_loguniform(rng, 0.03, 0.22) * size, 2.0)
    centre = _pick_point(rng, scene.allowed, size, margin=EDGE_MARGIN * size)
    d = _blob_distance(size, centre, radius, rng, roughness=0.3,
                       aspect=rng.uniform(0.6, 1.6), angle=rng.uniform(0, np.pi))
    alpha = _restrict(_coverage(d), scene.allowed)
    strength = rng.uniform(0.35, 1.0)
    return _blend(scene.image, foreign_texture(rng, size), strength * alpha), alpha > 0


def _free_spot(rng: np.random.Generator, scene: Scene, occupied: Array, min_gap: float,
               near: Array | None = None, reach: tuple[float, float] = (0.0, 0.0)) -> Array:
    """A random point (board coordinates) on the board, at least ``min_gap`` from every
    point in ``occupied``. With ``near``, the point is ``reach`` (min, max) away from it."""
    p = scene.params
    margin = 1.6 * p["radius"]
    for _ in range(1000):
        if near is None:
            cand = np.array([rng.uniform(-p["half_h"] + margin, p["half_h"] - margin),
                             rng.uniform(-p["half_w"] + margin, p["half_w"] - margin)])
        else:
            phi, dist = rng.uniform(0, 2 * np.pi), rng.uniform(*reach)
            cand = near + dist * np.array([np.sin(phi), np.cos(phi)])
            if (abs(cand[0]) > p["half_h"] - margin) or (abs(cand[1]) > p["half_w"] - margin):
                continue
        if len(occupied) == 0 or np.min(np.hypot(*(occupied - cand).T)) >= min_gap:
            return cand
    raise RuntimeError("no free spot on the board (the pin layout leaves no room)")


def defect_missing_pin(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """Logical defect, wrong count: one of the eight pins is missing.

    One time in three its socket is empty (the dark bore shows: locally odd); two times in
    three the socket is missing too (an unpopulated position), so the board there looks
    like any bare stretch of board and only the layout (seven pins, a gap in the grid) is
    wrong. The mask is where the pin should be (its disc, with its socket ring when the
    socket is missing too)."""
    p = scene.params
    pins = p["sockets"]
    k = rng.integers(len(pins))
    others = np.delete(pins, k, axis=0)
    if rng.uniform() < 1 / 3:
        return scene.redraw(others), p["pin_alpha"](pins[k:k + 1]) > 0
    image = scene.redraw(others, socket_points=others)
    return image, (p["socket_alpha"](pins[k:k + 1]) > 0) | (p["pin_alpha"](pins[k:k + 1]) > 0)


def defect_extra_pin(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """Logical defect, wrong count: a ninth pin off the grid.

    Half the time it is a loose pin lying anywhere on the bare board (locally odd: no
    socket around it). The other half it sits in a ninth socket of its own in a
    plausible spot, inside the pin field at the centre of a 2 x 2 cell of pins (+-5 % of
    the pin spacing): every patch looks like densely packed pins in sockets and only the
    layout is wrong, a logical defect that a model of local appearance alone misses.
    The mask is where the extra pin is (its disc, with its socket ring when it has one)."""
    p = scene.params
    pins = p["sockets"]
    if rng.uniform() < 0.5:
        extra = _free_spot(rng, scene, pins, min_gap=2.8 * p["radius"])
        image = scene.redraw(np.vstack([pins, extra]))
        return image, p["pin_alpha"](extra[None]) > 0
    j = rng.integers(PIN_COLS - 1)                    # between columns j and j + 1, rows 0 and 1
    cell = pins[[j, j + 1, PIN_COLS + j, PIN_COLS + j + 1]].mean(0)
    extra = cell + rng.uniform(-0.05, 0.05, 2) * p["spacing"]
    image = scene.redraw(np.vstack([pins, extra]), socket_points=np.vstack([pins, extra]))
    return image, (p["socket_alpha"](extra[None]) > 0) | (p["pin_alpha"](extra[None]) > 0)


def defect_misplaced_pin(scene: Scene, rng: np.random.Generator) -> tuple[Array, Array]:
    """Logical defect, wrong place: one pin is moved out of its socket by 0.1-0.8 pin
    spacings (2-15 px at 128 px). Small moves are subtle: the pin still covers most of its
    socket and only a crescent of the bore shows; large ones leave the socket empty.

    The mask is where the pin should be and where it is (both discs)."""
    p = scene.params
    pins = p["sockets"]
    k = rng.integers(len(pins))
    others = np.delete(pins, k, axis=0)
    reach = (0.1 * p["spacing"], 0.8 * p["spacing"])
    new = _free_spot(rng, scene, others, min_gap=2.2 * p["radius"], near=pins[k], reach=reach)
    moved = pins.copy()
    moved[k] = new
    image = scene.redraw(moved)
    mask = (p["pin_alpha"](pins[k:k + 1]) > 0) | (p["pin_alpha"](new[None]) > 0)
    return image, mask


#: how to draw the normal image of each category
GENERATORS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "weave": lambda rng, size: Scene(texture_weave(rng, size)),
    "stone": lambda rng, size: Scene(texture_stone(rng, size)),
    "nut": object_nut,
    "pins": object_pins,
}

#: how to draw each defect kind
DEFECT_FUNCTIONS: dict[str, Callable[[Scene, np.random.Generator], tuple[Array, Array]]] = {
    "scratch": defect_scratch,
    "crack": defect_crack,
    "hole": defect_hole,
    "chip": defect_chip,
    "stain": defect_stain,
    "foreign_patch": defect_foreign_patch,
    "missing_pin": defect_missing_pin,
    "extra_pin": defect_extra_pin,
    "misplaced_pin": defect_misplaced_pin,
}


# --------------------------------------------------------------------------------------
# One sample, the whole dataset, and the cached copy the quick profile uses
# --------------------------------------------------------------------------------------

def check_size(size) -> int:
    """Validate an image size (an int in 64..512) and return it."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
            or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"synthetic image size must be an integer from {MIN_SIZE} to {MAX_SIZE} "
                         f"pixels, got {size!r}; e.g. size=128 (quick) or size=256 (paper).")
    return int(size)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_categories(categories) -> list[str]:
    if categories is None:
        return list(CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    categories = list(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}.")
    return categories


def rng_for(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image: seeded by (seed, category, split, index).

    ``split`` is a folder such as ``"train/good"`` or ``"test/scratch"``; names enter the
    seed through CRC-32 (stable across runs and machines, unlike Python's ``hash``).
    """
    key = [int(seed), zlib.crc32(category.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(key)


@dataclass
class Sample:
    """One generated image: ``image`` uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]`` (all False for
    good images) and ``clean``, the same image before the defect was drawn (uint8)."""

    image: np.ndarray
    mask: np.ndarray
    clean: np.ndarray


def _to_uint8(image: Array) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def sample(category: str, defect: str = "good", seed: int = 0, index: int = 0,
           size: int = 128, split: str | None = None) -> Sample:
    """Draw one image of ``category`` (``defect="good"`` for a normal one) in memory.

    The result equals the file :func:`generate` writes for the same ``seed``, ``size`` and
    position: ``split`` defaults to ``"test/<defect>"`` (use ``"train/good"`` for training
    images).
    """
    category = _check_categories([category])[0]
    size, seed = check_size(size), _check_seed(seed)
    if defect != "good" and defect not in DEFECTS[category]:
        raise ValueError(f"category {category!r} has no defect {defect!r}; "
                         f"its defects are {DEFECTS[category]} (or 'good').")
    split = split or f"test/{defect}"
    rng = rng_for(seed, category, split, index)
    scene = GENERATORS[category](rng, size)
    clean = _to_uint8(scene.image)
    if defect == "good":
        return Sample(clean, np.zeros((size, size), bool), clean)
    for _ in range(20):      # redraw in the (rare) case the defect rounds to no visible change
        image, mask = DEFECT_FUNCTIONS[defect](scene, rng)
        image = _to_uint8(image)
        if mask.any() and (image != clean).any():
            return Sample(image, mask.astype(bool), clean)
    raise RuntimeError(f"could not draw a visible {defect!r} on {category!r} (seed {seed}, "
                       f"index {index}); this is a bug in adlab.data.synthetic.")


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG with fixed options and no metadata (byte-identical for identical pixels).

    Fast zlib level 1: files are ~10 % larger than at level 6 but written 3x faster.
    """
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode=mode).save(path, format="PNG", optimize=False, compress_level=1)


def _write_category(folder: Path, category: str, seed: int, size: int, counts: dict) -> None:
    """Every image (and mask) of one category under ``folder``."""
    jobs = [("train/good", "good", counts["n_train"]), ("test/good", "good", counts["n_test_good"])]
    jobs += [(f"test/{d}", d, counts["n_per_defect"]) for d in DEFECTS[category]]
    for split, defect, n in jobs:
        (folder / split).mkdir(parents=True)
        if defect != "good":
            (folder / "ground_truth" / defect).mkdir(parents=True)
        width = max(3, len(str(n - 1)))
        for index in range(n):
            s = sample(category, defect, seed=seed, index=index, size=size, split=split)
            stem = f"{index:0{width}d}"
            _save_png(s.image, folder / split / f"{stem}.png")
            if defect != "good":
                _save_png(s.mask.astype(np.uint8) * 255,
                          folder / "ground_truth" / defect / f"{stem}_mask.png")


def _check_replaceable(root: Path) -> None:
    """Allow replacing ``root`` only when it is missing, empty, or a dataset of ours (it has
    the marker, or holds nothing but category folders, as an older adlab wrote them)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give generate() a folder to write the dataset to.")
    names = sorted(p.name for p in root.iterdir())
    if (root / MARKER).is_file() or all(name in CATEGORIES for name in names):
        return
    raise ValueError(
        f"{root} holds files that are not an adlab synthetic dataset ({', '.join(names[:3])}"
        f"{', ...' if len(names) > 3 else ''}), and the dataset replaces its folder as a whole. "
        "Choose a new or empty folder.")


def _marker_info(seed: int, size: int, categories: list[str], counts: dict) -> dict:
    return dict(version=FACTORY_VERSION, seed=seed, size=size, categories=categories, **counts)


def generate(root, seed: int = 0, size: int = 128, categories=None, n_train: int | None = None,
             n_test_good: int | None = None, n_per_defect: int | None = None) -> Path:
    """Write a synthetic dataset in the MVTec AD layout to the folder ``root``; return ``root``.

    For each category: ``n_train`` good training images (default 60), ``n_test_good``
    good test images (default 20) and ``n_per_defect`` images per defect kind (default 8)
    with their 0/255 masks under ``ground_truth/<defect>/<stem>_mask.png``.
    Same ``seed`` and ``size`` -> identical bytes.

    The dataset is written to a temporary sibling folder, the marker file ``MARKER`` (seed,
    size, counts, factory version) last, and only then renamed to ``root``: an interrupted
    run never leaves a folder that looks complete, and what a killed run left behind is
    removed by the next one. ``root`` is replaced as a whole; it must be new, empty, or an
    earlier synthetic dataset (a ValueError otherwise, so a folder of yours is never deleted).
    """
    size, seed = check_size(size), _check_seed(seed)
    categories = _check_categories(categories)
    counts = dict(n_train=N_TRAIN if n_train is None else n_train,
                  n_test_good=N_TEST_GOOD if n_test_good is None else n_test_good,
                  n_per_defect=N_PER_DEFECT if n_per_defect is None else n_per_defect)
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}.")
    root = Path(os.path.abspath(root))
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    tmp = temp_path(root)
    tmp.mkdir()
    try:
        for category in categories:
            _write_category(tmp / category, category, seed, size, counts)
        info = _marker_info(seed, size, categories, {k: int(v) for k, v in counts.items()})
        (tmp / MARKER).write_text(json.dumps(info, indent=1))   # last: the dataset is complete
        if root.exists():  # renamed aside first: renaming onto a folder fails on some systems
            old = temp_path(root)
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _marker_ok(folder: Path, seed: int, size: int) -> bool:
    """True when ``folder`` holds a complete default dataset written by this factory version."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    counts = dict(n_train=N_TRAIN, n_test_good=N_TEST_GOOD, n_per_defect=N_PER_DEFECT)
    return info == _marker_info(seed, size, list(CATEGORIES), counts)


def ensure_synthetic(seed: int = 0, size: int | None = None) -> Path:
    """The synthetic dataset for ``seed`` and ``size``, generated on first use and cached.

    ``size=None`` uses the active profile's image size. The data lives in
    ``cache_dir()/synthetic-s{seed}-px{size}``; a folder there without a matching marker
    (interrupted, or from an older factory) is deleted and generated again. Several
    processes may call this at once: each writes its own temporary copy (see
    :func:`generate`) and the first complete one is kept.
    """
    from adlab.config import cache_dir, profile

    seed = _check_seed(seed)
    size = check_size(profile().image_size if size is None else size)
    final = cache_dir() / f"synthetic-s{seed}-px{size}"
    if _marker_ok(final, seed, size):
        return final
    if final.exists():  # ours by its name: stale or incomplete
        aside = temp_path(final)
        try:
            os.replace(final, aside)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        generate(final, seed=seed, size=size)
    except OSError:
        if not _marker_ok(final, seed, size):  # not a race lost to another process's copy
            raise
    return final
