"""Texture banks for anomaly synthesis: the offline stand-ins and DTD read from disk.

The DTD tests write a tiny ``<tmp>/dtd/<class>/*`` tree with Pillow (the layout
``data_scripts/download.py dtd`` leaves; the download itself is tested in test_download.py),
so expected pixels are known: flat colours, and bands that the centre crop must drop.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from adlab.data import synthetic, textures
from adlab.data.mvtec import DatasetError
from adlab.data.textures import dtd_textures, offline_textures, texture_bank

N_OFFLINE = 13          # 3 skimage photos x 3 tints + 2 synthetic renderers x 2 recolourings


# ----------------------------------------------------------------------------- offline
def test_offline_shape_range_and_determinism():
    bank = offline_textures(32)
    assert bank.shape == (N_OFFLINE, 3, 32, 32) and bank.dtype == torch.float32
    assert float(bank.min()) >= 0.0 and float(bank.max()) <= 1.0
    assert float(bank.std()) > 0.1                       # textures, not flat fills
    assert torch.equal(bank, offline_textures(32))       # same call, same tensor
    bank.zero_()                                          # the caller owns its copy
    assert float(offline_textures(32).max()) > 0.5
    assert offline_textures(48).shape == (N_OFFLINE, 3, 48, 48)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        offline_textures(0)


def test_offline_textures_are_distinct_and_coloured():
    bank = offline_textures(32)
    for i, j in itertools.combinations(range(len(bank)), 2):
        gap = float((bank[i] - bank[j]).abs().mean())
        assert gap > 0.04, f"textures {i} and {j} are nearly the same (mean |diff| {gap:.3f})"
    # Colour variety: each channel is the brightest one of at least two textures.
    brightest = bank.mean(dim=(2, 3)).argmax(dim=1)
    assert all(int((brightest == c).sum()) >= 2 for c in range(3)), brightest.tolist()
    # and no texture is gray: its channel means differ
    spread = bank.mean(dim=(2, 3)).max(dim=1).values - bank.mean(dim=(2, 3)).min(dim=1).values
    assert float(spread.min()) > 0.05


def test_no_offline_texture_equals_a_synthetic_normal_image():
    """The weave / stone stand-ins are recoloured: none is a normal image of any category."""
    size = 64
    bank = offline_textures(size)
    normal = [synthetic.sample(category, "good", seed=0, index=i, size=size,
                               split=split).image
              for category in synthetic.CATEGORIES for split in ("train/good", "test/good")
              for i in range(3)]
    normal = torch.from_numpy(np.stack(normal)).permute(0, 3, 1, 2).float() / 255
    gaps = (bank[:, None] - normal[None]).abs().mean(dim=(2, 3, 4))     # [bank, normal]
    assert gaps.shape == (N_OFFLINE, len(normal))
    assert float(gaps.min()) > 0.04
    # The last four (weave, weave, stone, stone) are the factory's renderers recoloured: their
    # mean colours are far from those of the factory's own weave and stone images.
    for rows, category in ((slice(9, 11), "weave"), (slice(11, 13), "stone")):
        own = np.stack([synthetic.sample(category, "good", index=i, size=size,
                                         split="train/good").image for i in range(3)])
        own_colour = torch.from_numpy(own.reshape(-1, 3).mean(0) / 255).float()
        distance = (bank[rows].mean(dim=(2, 3)) - own_colour).norm(dim=1)
        assert float(distance.min()) > 0.1, (category, distance.tolist())


def test_offline_bank_draws_no_test_defect(monkeypatch):
    """foreign_texture and the defect functions draw the test defects: never used here."""
    def leak(*args, **kwargs):
        raise AssertionError("the offline texture bank used a test-defect generator")

    monkeypatch.setattr(synthetic, "foreign_texture", leak)
    for name in [n for n in vars(synthetic) if n.startswith("defect_")]:
        monkeypatch.setattr(synthetic, name, leak)
    monkeypatch.setattr(synthetic, "DEFECT_FUNCTIONS",
                        {k: leak for k in synthetic.DEFECT_FUNCTIONS})
    textures._offline_bank.cache_clear()            # build it now, with the guards in place
    try:
        bank = offline_textures(24)
    finally:
        textures._offline_bank.cache_clear()
    assert bank.shape == (N_OFFLINE, 3, 24, 24)


# ----------------------------------------------------------------------------- DTD
def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, quality=95)


def flat(colour, h=20, w=20):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


@pytest.fixture
def dtd_root(tmp_path):
    """<tmp>/dtd/{banded,cracked,zigzagged}/: 4 images, plus things that must be skipped."""
    dtd = tmp_path / "dtd"
    _save(dtd / "banded" / "banded_0001.jpg", flat((200, 30, 30), 30, 40))
    bands = np.zeros((20, 60, 3), np.uint8)            # wide: red | green | blue thirds
    bands[:, :20] = (255, 0, 0)
    bands[:, 20:40] = (0, 255, 0)
    bands[:, 40:] = (0, 0, 255)
    _save(dtd / "banded" / "banded_0002.png", bands)   # PNG: exact pixels for the crop
    _save(dtd / "cracked" / "cracked_0001.jpg", np.full((24, 24), 90, np.uint8))   # grayscale
    _save(dtd / "zigzagged" / "zigzagged_0001.jpg", flat((20, 40, 220)))
    (dtd / "banded" / "._banded_0001.jpg").write_bytes(b"macOS resource fork")
    (dtd / "banded" / "notes.txt").write_text("not an image")
    (dtd / "README.txt").write_text("a file next to the class folders")
    return tmp_path


def test_dtd_textures_reads_crops_and_resizes(dtd_root):
    bank = dtd_textures(dtd_root, size=16)
    assert bank.shape == (4, 3, 16, 16) and bank.dtype == torch.float32
    assert float(bank.min()) >= 0.0 and float(bank.max()) <= 1.0
    # sorted by class, then file name: banded_0001.jpg, banded_0002.png, cracked, zigzagged
    means = bank.mean(dim=(2, 3))
    np.testing.assert_allclose(means[0].numpy(), np.array([200, 30, 30]) / 255, atol=0.03)
    # the centre square of red | green | blue is the green third, exactly
    torch.testing.assert_close(bank[1], torch.tensor([0.0, 1.0, 0.0])[:, None, None]
                               .expand(3, 16, 16))
    np.testing.assert_allclose(bank[2].numpy(), np.full((3, 16, 16), 90 / 255), atol=0.01)
    np.testing.assert_allclose(means[3].numpy(), np.array([20, 40, 220]) / 255, atol=0.03)


def test_dtd_textures_limit_is_a_seeded_subset(dtd_root):
    full = dtd_textures(dtd_root, size=8)
    picked = dtd_textures(dtd_root, size=8, limit=2, seed=3)
    assert picked.shape == (2, 3, 8, 8)
    assert torch.equal(picked, dtd_textures(dtd_root, size=8, limit=2, seed=3))
    rows = [next(i for i in range(len(full)) if torch.equal(full[i], p)) for p in picked]
    assert rows == sorted(set(rows))                   # distinct images, in file order
    subsets = {tuple(next(i for i in range(len(full)) if torch.equal(full[i], p))
                     for p in dtd_textures(dtd_root, size=8, limit=2, seed=s))
               for s in range(8)}
    assert len(subsets) > 1                            # the seed matters
    assert torch.equal(dtd_textures(dtd_root, size=8, limit=10), full)   # limit >= N: all
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        dtd_textures(dtd_root, size=8, limit=0)


def test_dtd_textures_missing_folder_says_how_to_download(tmp_path):
    with pytest.raises(DatasetError) as info:
        dtd_textures(tmp_path / "data")
    message = str(info.value)
    assert f"python data_scripts/download.py dtd --root {tmp_path / 'data'}" in message
    assert str(tmp_path / "data" / "dtd") in message and "source='offline'" in message
    (tmp_path / "data" / "dtd").mkdir(parents=True)     # the dtd folder given as root itself
    with pytest.raises(DatasetError, match=f"pass its parent {tmp_path / 'data'}"):
        dtd_textures(tmp_path / "data" / "dtd")
    with pytest.raises(DatasetError, match="holds no images"):   # empty: a broken download
        dtd_textures(tmp_path / "data")


# ----------------------------------------------------------------------------- dispatch
def test_texture_bank_dispatch_and_bad_source(dtd_root):
    assert torch.equal(texture_bank(32), offline_textures(32))
    assert torch.equal(texture_bank(32, source="offline"), offline_textures(32))
    assert torch.equal(texture_bank(16, source="dtd", root=dtd_root, limit=3, seed=1),
                       dtd_textures(dtd_root, size=16, limit=3, seed=1))
    assert texture_bank(16, source="DTD", root=dtd_root).shape == (4, 3, 16, 16)
    with pytest.raises(DatasetError, match="needs root="):
        texture_bank(16, source="dtd")
    with pytest.raises(ValueError, match="'offline', 'dtd'") as info:
        texture_bank(16, source="imagenet")
    assert "imagenet" in str(info.value)
