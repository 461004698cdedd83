"""Tests of adlab.data.synthesis (DRAEM / GLAD style anomaly synthesis)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adlab.data.synthesis import (AnomalySynthesizer, blend, fade, foreground_mask,
                                  grid_shuffle, perlin_from_gradients, perlin_mask,
                                  perlin_noise, random_gradients)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- blend

def test_blend_matches_a_hand_example():
    image = torch.tensor([0.8, 0.4]).view(1, 1, 2).expand(3, 1, 2)
    source = torch.tensor([0.2, 1.0]).view(1, 1, 2).expand(3, 1, 2)
    mask = torch.tensor([[1.0, 0.0]])
    out = blend(image, source, mask, beta=0.25)
    # masked pixel: 0.8 (1-1) + 0.75 * 0.2 * 1 + 0.25 * 0.8 * 1 = 0.35; unmasked keeps 0.4
    assert torch.allclose(out, torch.tensor([0.35, 0.4]).view(1, 1, 2).expand(3, 1, 2))


def test_blend_batch_with_per_sample_beta():
    image, source = torch.full((2, 3, 2, 2), 1.0), torch.zeros(2, 3, 2, 2)
    mask = torch.ones(2, 2, 2)
    out = blend(image, source, mask, beta=torch.tensor([0.0, 0.6]))
    assert torch.allclose(out[0], torch.zeros(3, 2, 2))       # beta 0 pastes the source
    assert torch.allclose(out[1], torch.full((3, 2, 2), 0.6))  # beta = the image's share


# --------------------------------------------------------------------------- Perlin noise

def test_fade_hand_values():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(fade(t), torch.tensor([0.0, 0.103515625, 0.5, 1.0]))


def test_perlin_with_constant_gradients_hand_example():
    """All gradients (1, 0): noise = fy (1 - u) + (fy - 1) u = fy - fade(fy)."""
    gradients = torch.zeros(3, 3, 2, dtype=torch.float64)
    gradients[..., 0] = 1
    y = torch.tensor([0.25, 1.5, 0.0], dtype=torch.float64)
    x = torch.tensor([0.7, 0.1, 1.3], dtype=torch.float64)
    out = perlin_from_gradients(y, x, gradients)
    assert torch.allclose(out, torch.tensor([0.146484375, 0.0, 0.0], dtype=torch.float64))


def _reference_perlin(shape, scale, gradients):
    """Perlin noise pixel by pixel: sum over the 4 corners of weight x (gradient . offset)."""
    H, W = shape
    out = np.zeros(shape)
    g = gradients.numpy()
    s = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3
    for i in range(H):
        for j in range(W):
            y, x = i * scale[0] / H, j * scale[1] / W
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            fy, fx = y - y0, x - x0
            for dy in (0, 1):
                for dx in (0, 1):
                    weight = (s(fy) if dy else 1 - s(fy)) * (s(fx) if dx else 1 - s(fx))
                    out[i, j] += weight * (g[y0 + dy, x0 + dx] @ np.array([fy - dy, fx - dx]))
    return out


def test_perlin_noise_matches_a_loop_reference():
    shape, scale = (12, 20), (3, 4)
    gradients = random_gradients(scale, gen(3)).double()
    reference = math.sqrt(2) * _reference_perlin(shape, scale, gradients)
    noise = perlin_noise(shape, scale, gen(3))
    assert noise.shape == shape and noise.dtype == torch.float32
    assert np.allclose(noise.numpy(), reference, atol=1e-6)
    # zero at every lattice point (pixels i with i * 3 / 12 an integer, j * 4 / 20 too)
    assert torch.all(noise[::4, ::5] == 0)


def test_perlin_noise_range_and_rotation():
    noise = perlin_noise(64, (1, 16), gen(0))
    assert noise.abs().max() <= 1.0
    # 1 cell along y, 16 along x: the noise varies far more along x ...
    dy = noise.diff(dim=0).abs().mean()
    dx = noise.diff(dim=1).abs().mean()
    assert dx > 5 * dy
    # ... and rotated by 90 degrees, far more along y
    turned = perlin_noise(64, (1, 16), gen(0), angle=90.0)
    assert turned.diff(dim=0).abs().mean() > 5 * turned.diff(dim=1).abs().mean()


def test_rotation_keeps_isotropic_noise_isotropic():
    """A rotation (unlike a shear) keeps the mean |difference| along y and x equal for an
    isotropic lattice: at 60 degrees the axes map to 60 and 150 = 60 + 90 degrees."""
    ratios = []
    for seed in range(20):
        noise = perlin_noise(64, (8, 8), gen(seed), angle=60.0)
        ratios.append(float(noise.diff(dim=0).abs().mean() / noise.diff(dim=1).abs().mean()))
    assert 0.85 < np.mean(ratios) < 1.15, np.mean(ratios)


def test_perlin_mask_is_binary_and_threshold_shrinks_it_monotonically():
    coverage, previous = [], None
    for threshold in (-0.2, 0.0, 0.3, 0.5, 0.7):
        mask = perlin_mask((48, 40), threshold=threshold, generator=gen(7))
        assert mask.shape == (48, 40)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        if previous is not None:
            assert torch.all(mask <= previous)   # a higher threshold gives a subset
        coverage.append(float(mask.mean()))
        previous = mask
    assert all(a > b for a, b in zip(coverage, coverage[1:])), coverage


def test_perlin_mask_scales_follow_the_exponent_range():
    """k fixed at 0 (1 cell) gives smooth, large blobs; k fixed at 5 (32 cells) busy ones."""
    edges = lambda m: float(m.diff(dim=0).abs().mean() + m.diff(dim=1).abs().mean())
    coarse = [edges(perlin_mask(64, 0.0, 0, 0, generator=gen(s))) for s in range(10)]
    fine = [edges(perlin_mask(64, 0.0, 5, 5, generator=gen(s))) for s in range(10)]
    assert np.mean(fine) > 5 * np.mean(coarse)


def test_determinism_with_the_same_generator():
    a = perlin_mask(32, generator=gen(11))
    assert torch.equal(a, perlin_mask(32, generator=gen(11)))
    synth = AnomalySynthesizer(textures=[torch.rand(3, 20, 20)], normal_fraction=0.3)
    images = torch.rand(6, 3, 32, 32)
    out1, m1 = synth(images, gen(5))
    out2, m2 = synth(images, gen(5))
    assert torch.equal(out1, out2) and torch.equal(m1, m2)
    out3, m3 = synth(images, gen(6))
    assert not torch.equal(out1, out3)


# --------------------------------------------------------------------------- synthesizer

def test_fraction_of_normal_samples():
    images = torch.rand(400, 3, 32, 32)
    out, masks = AnomalySynthesizer(normal_fraction=0.5)(images, gen(0))
    assert out.shape == images.shape and masks.shape == (400, 32, 32)
    normal = masks.flatten(1).amax(1) == 0
    # binomial(400, 0.5): sd 10 images; 4 sd
    assert abs(int(normal.sum()) - 200) < 40
    assert torch.equal(out[normal], images[normal])        # normal samples untouched
    outside = (masks == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(out[outside], images[outside])      # anomalies stay inside the mask
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_no_normal_and_all_normal():
    images = torch.rand(40, 3, 32, 32)
    _, masks = AnomalySynthesizer(normal_fraction=0.0)(images, gen(1))
    assert (masks.flatten(1).amax(1) > 0).all()
    out, masks = AnomalySynthesizer(normal_fraction=1.0)(images, gen(1))
    assert torch.equal(out, images) and masks.sum() == 0


def test_texture_source_and_beta_range():
    """Image 1, texture 0: inside the mask the result is beta, drawn from U(0, 0.8)."""
    images = torch.ones(60, 3, 32, 32)
    synth = AnomalySynthesizer(textures=[torch.zeros(3, 50, 50)], texture_prob=1.0,
                               normal_fraction=0.0)
    out, masks = synth(images, gen(2))
    betas = torch.stack([o[0][m > 0].mean() for o, m in zip(out, masks)])
    for o, m, b in zip(out, masks, betas):
        assert torch.allclose(o[:, m > 0], b.expand(3, int(m.sum())))
    assert betas.min() >= 0 and betas.max() <= 0.8
    assert betas.min() < 0.2 and betas.max() > 0.6  # spread over the range


def test_single_image_call():
    out, mask = AnomalySynthesizer(normal_fraction=0.0)(torch.rand(3, 32, 32), gen(4))
    assert out.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.sum() > 0


def disk_image(bright_disk: bool, size=64, radius=18, seed=0):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = ((yy - 30.0) ** 2 + (xx - 34.0) ** 2 <= radius ** 2).float()
    inside, outside = (0.8, 0.2) if bright_disk else (0.15, 0.7)
    image = outside + (inside - outside) * disk
    noise = 0.05 * torch.randn(3, size, size, generator=gen(seed))
    return (image + noise).clamp(0, 1), disk


@pytest.mark.parametrize("bright_disk", [True, False])
def test_foreground_mask_finds_a_disk(bright_disk):
    image, disk = disk_image(bright_disk)
    fg = foreground_mask(image)
    iou = float((fg * disk).sum() / ((fg + disk) > 0).sum())
    assert iou > 0.9, iou


def test_foreground_restriction_keeps_anomalies_on_the_object():
    image, disk = disk_image(True)
    synth = AnomalySynthesizer(foreground=True, normal_fraction=0.0, threshold=0.3)
    _, masks = synth(image.expand(8, 3, 64, 64), gen(3))
    fg = foreground_mask(image)
    assert masks.sum() > 0 and torch.all(masks <= fg)


# --------------------------------------------------------------------------- grid shuffle

def _tiles(image, grid):
    C, H, W = image.shape
    th, tw = H // grid, W // grid
    return [image[:, i * th:(i + 1) * th, j * tw:(j + 1) * tw]
            for i in range(grid) for j in range(grid)]


def test_grid_shuffle_is_a_permutation_of_tiles():
    image = torch.rand(3, 32, 32)
    out = grid_shuffle(image, grid=8, generator=gen(0))
    assert out.shape == image.shape and not torch.equal(out, image)
    # same multiset of pixels
    assert torch.equal(out.flatten(1).sort(dim=1).values, image.flatten(1).sort(dim=1).values)
    # every output tile is exactly one input tile, each used once
    before, after = _tiles(image, 8), _tiles(out, 8)
    matches = [[k for k, t in enumerate(before) if torch.equal(t, a)] for a in after]
    assert all(len(m) == 1 for m in matches)
    assert sorted(m[0] for m in matches) == list(range(64))


def test_grid_shuffle_leaves_the_remainder_in_place():
    image = torch.rand(3, 35, 34)
    out = grid_shuffle(image, grid=8, generator=gen(1))
    assert torch.equal(out[:, 32:], image[:, 32:]) and torch.equal(out[:, :, 32:], image[:, :, 32:])
    assert torch.equal(out[:, :32, :32].flatten(1).sort(1).values,
                       image[:, :32, :32].flatten(1).sort(1).values)


def test_looks_like_object_tells_an_object_from_a_texture():
    from adlab.data.synthesis import looks_like_object

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = ((yy - 16) ** 2 + (xx - 15) ** 2 < 100).float()
    objects = torch.stack([0.2 + 0.6 * disc.expand(3, 32, 32)] * 3)
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert looks_like_object(objects) and not looks_like_object(noise)
    assert not looks_like_object(torch.full((2, 3, 16, 16), 0.5))   # no foreground at all
