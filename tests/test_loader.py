"""Tests of adlab.data.mvtec on small MVTec-layout folders written here with Pillow."""
from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from adlab.data import mvtec
from adlab.data.mvtec import (ADDataset, IMAGENET_MEAN, IMAGENET_STD, DatasetError,
                              list_categories, load_dataset, load_image, normalize)

SIZE = 16  # native side of the images written here


# --------------------------------------------------------------------------- builders

def gray(value: int, size=(SIZE, SIZE)) -> Image.Image:
    """An RGB image filled with one gray value (size is width, height)."""
    return Image.new("RGB", size, (value, value, value))


def left_half_mask(size=SIZE) -> Image.Image:
    """A 0/255 mask whose left half is defect."""
    array = np.zeros((size, size), np.uint8)
    array[:, : size // 2] = 255
    return Image.fromarray(array)


def make_category(root: Path, name="widget", n_train=6, test_good=2,
                  defects=(("crack", 2), ("hole", 1)), with_gt=True) -> Path:
    """``root/name`` in the MVTec layout; training image ``i`` has gray value ``10 * i``."""
    folder = root / name
    (folder / "train" / "good").mkdir(parents=True)
    for i in range(n_train):
        gray(10 * i).save(folder / "train" / "good" / f"{i:03d}.png")
    (folder / "test" / "good").mkdir(parents=True)
    for i in range(test_good):
        gray(200).save(folder / "test" / "good" / f"{i:03d}.png")
    for defect, n in defects:
        (folder / "test" / defect).mkdir(parents=True)
        if with_gt:
            (folder / "ground_truth" / defect).mkdir(parents=True)
        for i in range(n):
            gray(90).save(folder / "test" / defect / f"{i:03d}.png")
            if with_gt:
                left_half_mask().save(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    return folder


@pytest.fixture
def root(tmp_path) -> Path:
    make_category(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- shapes and labels

def test_test_split_shapes_labels_defects_and_masks(root):
    ds = load_dataset("widget", "test", root=root, image_size=8)
    assert isinstance(ds, ADDataset) and len(ds) == 5 and ds.category == "widget"
    assert ds.images.shape == (5, 3, 8, 8) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.labels.dtype == torch.long
    assert ds.defects == ["good", "good", "crack", "crack", "hole"]
    assert [p.parent.name for p in ds.paths] == ds.defects
    # good images have empty masks; defect masks: left half of the image (exact at 16 -> 8)
    expected = torch.zeros(8, 8)
    expected[:, :4] = 1
    assert ds.masks.shape == (5, 8, 8) and ds.masks.dtype == torch.float32
    assert torch.equal(ds.masks[:2], torch.zeros(2, 8, 8))
    for m in ds.masks[2:]:
        assert torch.equal(m, expected)
    # a constant image stays that constant after an antialiased resize
    assert torch.allclose(ds.images[0], torch.full((3, 8, 8), 200 / 255), atol=1e-6)


def test_train_split_is_good_only(root):
    ds = load_dataset("widget", "train", root=root, image_size=8)
    assert len(ds) == 6 and ds.labels.sum() == 0 and set(ds.defects) == {"good"}
    means = ds.images.mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(means, torch.arange(6.0) * 10, atol=1e-3)


def test_getitem_and_default_dataloader(root):
    ds = load_dataset("widget", "test", root=root, image_size=8)
    item = ds[2]
    assert set(item) == {"image", "label", "mask", "defect", "path"}
    assert item["label"] == 1 and item["defect"] == "crack" and item["path"].endswith("000.png")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["mask"].shape == (5, 8, 8)
    assert batch["label"].tolist() == [0, 0, 1, 1, 1]


def test_images_of_varying_sizes_and_extensions_are_all_resized(tmp_path):
    folder = make_category(tmp_path, n_train=0, defects=())
    train = folder / "train" / "good"
    gray(10, (20, 12)).save(train / "a.png")
    gray(20, (7, 31)).save(train / "b.JPG")
    gray(30, (16, 16)).save(train / "c.bmp")
    gray(40, (9, 9)).save(train / "d.TIF")
    gray(50, (9, 9)).save(train / "e.jpeg")
    (train / "notes.txt").write_text("not an image")
    ds = load_dataset("widget", "train", root=tmp_path, image_size=8)
    assert ds.images.shape == (5, 3, 8, 8)
    assert [p.name for p in ds.paths] == ["a.png", "b.JPG", "c.bmp", "d.TIF", "e.jpeg"]
    means = ds.images.mean(dim=(1, 2, 3)) * 255
    assert torch.allclose(means, torch.tensor([10.0, 20, 30, 40, 50]), atol=1.0)  # jpeg: lossy


def test_image_size_defaults_to_the_profile(root, monkeypatch):
    monkeypatch.setenv("ADLAB_PROFILE", "quick")
    assert load_dataset("widget", "train", root=root).images.shape[-2:] == (128, 128)


# --------------------------------------------------------------------------- validation split

def test_val_split_is_a_seeded_random_subset_of_train(tmp_path):
    make_category(tmp_path, n_train=20)
    kwargs = dict(root=tmp_path, image_size=4, val_fraction=0.25)
    train = load_dataset("widget", "train", seed=0, **kwargs)
    val = load_dataset("widget", "val", seed=0, **kwargs)
    test = load_dataset("widget", "test", seed=0, **kwargs)
    all_train = sorted((tmp_path / "widget" / "train" / "good").glob("*.png"))

    assert len(val) == 5 and len(train) == 15
    assert set(val.paths).isdisjoint(train.paths)
    assert sorted(val.paths + train.paths) == all_train          # drawn from train only
    assert set(val.paths).isdisjoint(test.paths) and len(test) == 5  # test untouched
    # images belong to their paths (training image i has gray value 10 i)
    for image, path in zip(val.images, val.paths):
        assert abs(float(image.mean()) * 255 - 10 * int(path.stem)) < 1e-3

    again = load_dataset("widget", "val", seed=0, **kwargs)
    assert again.paths == val.paths                               # reproducible
    subsets = {tuple(load_dataset("widget", "val", seed=s, **kwargs).paths) for s in range(5)}
    assert len(subsets) > 1                                       # the seed matters
    for subset in subsets:                                        # never a sorted cut
        assert list(subset) != all_train[:5] and list(subset) != all_train[-5:]


def test_val_needs_a_fraction_and_valid_values(root):
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("widget", "val", root=root, image_size=4)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("widget", "train", root=root, image_size=4, val_fraction=1.0)
    with pytest.raises(ValueError, match="split"):
        load_dataset("widget", "validation", root=root, image_size=4)
    for size in (0, -2):  # 0 once fell back to the profile's size silently
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            load_dataset("widget", "train", root=root, image_size=size)


# --------------------------------------------------------------------------- bad input

def test_missing_root_names_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("widget", root=missing, image_size=4)


def test_missing_category_lists_the_existing_ones(root):
    make_category(root, name="gadget")
    with pytest.raises(DatasetError) as err:
        load_dataset("carpet", root=root, image_size=4)
    message = str(err.value)
    assert "carpet" in message and "gadget" in message and "widget" in message


def test_empty_train_folder_names_the_folder(tmp_path):
    folder = make_category(tmp_path, n_train=0)
    (folder / "train" / "good" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "train", root=tmp_path, image_size=4)
    assert str(folder / "train" / "good") in str(err.value)


def test_defect_image_without_its_mask_names_the_file(root):
    missing = root / "widget" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "test", root=root, image_size=4)
    assert str(root / "widget" / "test" / "crack" / "001.png") in str(err.value)
    assert "001_mask.png" in str(err.value)


def test_mask_of_another_size_names_the_files(root):
    mask = root / "widget" / "ground_truth" / "hole" / "000_mask.png"
    left_half_mask(size=12).save(mask)
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "test", root=root, image_size=4)
    assert str(mask) in str(err.value) and "000.png" in str(err.value)


def test_corrupt_image_names_the_file(root):
    bad = root / "widget" / "train" / "good" / "002.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "train", root=root, image_size=4)
    assert str(bad) in str(err.value) and "re-download" in str(err.value)


def test_truncated_image_names_the_file(root):
    bad = root / "widget" / "test" / "good" / "001.png"
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    noisy.save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "test", root=root, image_size=4)
    assert str(bad) in str(err.value)


def test_missing_image_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.png"):
        load_image(tmp_path / "nope.png", 4)


def test_root_that_is_a_file_empty_or_a_category_folder(root, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        list_categories(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="No categories under") as err:
        list_categories(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(DatasetError, match="is a category folder") as err:
        load_dataset("widget", root=root / "widget", image_size=4)
    assert f"parent {root} as the root and 'widget'" in str(err.value)


def _big_png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit black PNG of ``width x height`` (tiny on disk: rows of zeros compress well)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 and the packed 1-bit pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(root, monkeypatch):
    bomb = root / "widget" / "train" / "good" / "003.png"
    _big_png(bomb, 13370, 13370)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow alone only warns
        assert Image.open(bomb).size == (13370, 13370) and bomb.stat().st_size < 1_000_000
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(DatasetError) as err:
        load_dataset("widget", "train", root=root, image_size=4)
    message = str(err.value)
    assert str(bomb) in message and "13370 x 13370" in message and "40,000,000" in message
    assert (13370, 13370) not in decoded


def test_pixel_limit_admits_real_dataset_sizes(tmp_path, monkeypatch):
    """MVTec AD (1024 x 1024) and VisA (about 1500 x 1000) images pass; one pixel over fails."""
    assert 1024 * 1024 <= mvtec.MAX_IMAGE_PIXELS and 1562 * 1000 <= mvtec.MAX_IMAGE_PIXELS
    monkeypatch.setattr(mvtec, "MAX_IMAGE_PIXELS", 300)
    gray(7, size=(20, 15)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").shape == (3, 15, 20)
    gray(7, size=(301, 1)).save(tmp_path / "over.png")
    with pytest.raises(DatasetError, match="301 x 1 pixels"):
        load_image(tmp_path / "over.png")


# --------------------------------------------------------------------------- conversions

def test_grayscale_rgba_palette_and_16bit_become_rgb(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "p.png")
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "i16max.tif")
    expected = {
        "l.png": (100 / 255,) * 3,
        "rgba.png": (10 / 255, 20 / 255, 30 / 255),
        "p.png": (200 / 255, 100 / 255, 50 / 255),
        "i16.png": (30000 / 65535,) * 3,
        "i16max.tif": (1.0,) * 3,
    }
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")  # really a 16-bit file
    for name, rgb in expected.items():
        for size in (None, 2):
            image = load_image(tmp_path / name, size)
            side = 4 if size is None else size
            assert image.shape == (3, side, side) and image.dtype == torch.float32, name
            want = torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, side, side)
            assert torch.allclose(image, want, atol=1e-6), name


def test_mixed_modes_load_in_one_dataset(tmp_path):
    folder = make_category(tmp_path, n_train=1)
    Image.new("L", (SIZE, SIZE), 7).save(folder / "train" / "good" / "gray.png")
    deep = Image.fromarray(np.full((SIZE, SIZE), 1000, np.uint16))
    deep.save(folder / "train" / "good" / "deep.png")
    ds = load_dataset("widget", "train", root=tmp_path, image_size=4)
    assert ds.images.shape == (3, 3, 4, 4)
    values = {p.name: float(img.mean()) for p, img in zip(ds.paths, ds.images)}
    assert values["deep.png"] == pytest.approx(1000 / 65535, abs=1e-6)
    assert values["gray.png"] == pytest.approx(7 / 255, abs=1e-6)


@pytest.mark.parametrize("kind", ["0/1", "0/255", "antialiased", "rgb", "16bit"])
def test_non_binary_masks_are_binarised_above_zero(root, kind):
    rng = np.random.default_rng(1)
    defect = rng.random((SIZE, SIZE)) < 0.3
    levels = {"0/1": 1, "0/255": 255, "antialiased": rng.integers(1, 256, (SIZE, SIZE))}
    if kind == "rgb":
        array = np.zeros((SIZE, SIZE, 3), np.uint8)
        array[..., 0] = defect * 255  # a red mask
    elif kind == "16bit":
        array = (defect * 3).astype(np.uint16)
    else:
        array = (defect * levels[kind]).astype(np.uint8)
    Image.fromarray(array).save(root / "widget" / "ground_truth" / "hole" / "000_mask.png")
    ds = load_dataset("widget", "test", root=root, image_size=SIZE)
    assert torch.equal(ds.masks[-1], torch.from_numpy(defect.astype(np.float32)))
    assert set(ds.masks.unique().tolist()) <= {0.0, 1.0}


def test_mask_resize_is_nearest_then_binary(root):
    """2x2 blocks with values 0 / 1 / 255: at half size each block becomes one pixel > 0."""
    blocks = np.random.default_rng(2).integers(0, 3, (SIZE // 2, SIZE // 2))
    array = np.kron(np.choose(blocks, [0, 1, 255]), np.ones((2, 2))).astype(np.uint8)
    Image.fromarray(array).save(root / "widget" / "ground_truth" / "hole" / "000_mask.png")
    ds = load_dataset("widget", "test", root=root, image_size=SIZE // 2)
    assert torch.equal(ds.masks[-1], torch.from_numpy((blocks > 0).astype(np.float32)))


@pytest.mark.parametrize("size", [12, 24, 7])
def test_mask_resize_samples_the_nearest_pixel_centre(root, size):
    """Reference: output pixel i takes input pixel floor((i + 0.5) * 16 / size)."""
    defect = np.random.default_rng(3).random((SIZE, SIZE)) < 0.4
    Image.fromarray(defect.astype(np.uint8) * 255).save(
        root / "widget" / "ground_truth" / "hole" / "000_mask.png")
    ds = load_dataset("widget", "test", root=root, image_size=size)
    idx = np.floor((np.arange(size) + 0.5) * SIZE / size).astype(int)
    assert torch.equal(ds.masks[-1], torch.from_numpy(defect[idx][:, idx].astype(np.float32)))


# --------------------------------------------------------------------------- masks optional

def test_no_ground_truth_folder_means_image_level_only(tmp_path):
    make_category(tmp_path, with_gt=False)
    ds = load_dataset("widget", "test", root=tmp_path, image_size=4)
    assert ds.masks is None and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert torch.isnan(ds[3]["mask"]).all()
    assert load_dataset("widget", "train", root=tmp_path, image_size=4).masks is None


def test_ground_truth_without_a_defect_folder_warns_and_drops_masks(root):
    for f in (root / "widget" / "ground_truth" / "hole").iterdir():
        f.unlink()
    (root / "widget" / "ground_truth" / "hole").rmdir()
    with pytest.warns(UserWarning, match="hole"):
        ds = load_dataset("widget", "test", root=root, image_size=4)
    assert ds.masks is None and ds.labels.sum() == 3


def test_all_zero_mask_counts_as_a_defect(root):
    Image.new("L", (SIZE, SIZE), 0).save(root / "widget" / "ground_truth" / "hole" / "000_mask.png")
    ds = load_dataset("widget", "test", root=root, image_size=4)
    assert ds.labels[-1] == 1 and ds.defects[-1] == "hole"
    assert ds.masks[-1].sum() == 0


def test_ground_truth_good_folder_is_not_required(root):
    assert not (root / "widget" / "ground_truth" / "good").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("widget", "test", root=root, image_size=4)
    assert ds.masks is not None


# --------------------------------------------------------------------------- roots and helpers

def test_list_categories(root):
    make_category(root, name="gadget")
    (root / "license.txt").write_text("cc")
    (root / "not_a_category").mkdir()
    assert list_categories(root) == ["gadget", "widget"]


def test_root_none_uses_data_root_in_the_paper_profile(root, monkeypatch):
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    monkeypatch.setenv("ADLAB_DATA", str(root))
    assert list_categories() == ["widget"]
    assert len(load_dataset("widget", "test", image_size=4)) == 5


def test_root_none_uses_the_synthetic_data_in_the_quick_profile(root, monkeypatch):
    calls = []
    fake = types.ModuleType("adlab.data.synthetic")
    fake.ensure_synthetic = lambda *a, **k: calls.append(1) or root
    monkeypatch.setitem(sys.modules, "adlab.data.synthetic", fake)
    monkeypatch.setenv("ADLAB_PROFILE", "quick")
    assert len(load_dataset("widget", "train", image_size=4)) == 6 and calls


def test_normalize_uses_the_imagenet_statistics():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet values
    assert tuple(IMAGENET_MEAN) == mean and tuple(IMAGENET_STD) == std
    x = torch.rand(2, 3, 5, 5)
    reference = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(normalize(x), reference, atol=1e-6)
    assert torch.allclose(normalize(x[0]), reference[0], atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        normalize(torch.rand(2, 1, 5, 5))
