"""Datasets in the MVTec AD folder layout: the one on-disk format of adlab.

The layout (Bergmann et al., "MVTec AD", CVPR 2019; MPDD uses it as is, VisA and
the synthetic factory are written in it)::

    <root>/<category>/train/good/*.png               defect-free training images
    <root>/<category>/test/good/*.png                defect-free test images
    <root>/<category>/test/<defect>/*.png            defective test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   their pixel masks

:func:`load_dataset` reads one split of one category into memory as an
:class:`ADDataset`: images ``float32 [N, 3, S, S]`` in [0, 1] (bilinear, antialiased
resize to the square side ``S``), labels (0 good, 1 defect) and masks ``{0, 1}``
(binarised at > 0, nearest resize). A category without a ``ground_truth/`` folder
is image-level only: ``masks is None`` and pixel metrics are reported as n/a.

A validation split is drawn at random (seeded) from the *training* images and
removed from ``train``; never from test and never a sorted cut (real datasets are
sorted by capture session, so a sorted cut would validate on a session the model
never saw).

Every problem a user can cause with the files (a missing folder or mask, a corrupt,
truncated or oversized image, a mask of the wrong size) raises :class:`DatasetError`
with one line naming the file and the fix, so ``python -m adlab bench`` can tell
them from bugs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from adlab import config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
GOOD = "good"

# Images above this many pixels are refused before decoding (decompression bombs: a
# 13370 x 13370 PNG of a few hundred KB decodes to gigabytes). Pillow's own guard
# (Image.MAX_IMAGE_PIXELS, ~89 MP) only warns below twice its limit. 40 MP is about 40x an
# MVTec AD image (1024 x 1024) and 25x a VisA image (about 1500 x 1000).
MAX_IMAGE_PIXELS = 40_000_000


class DatasetError(ValueError):
    """A problem with the dataset's files that the user can fix (the message says how)."""

# ImageNet channel statistics used by every pretrained timm / torchvision backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- tensors

def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation ``(x - mean) / std`` per channel (the one place it is done).

    ``images`` is ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1]; the result has the same shape.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"normalize expects [3, H, W] or [B, 3, H, W] RGB images; "
                         f"got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)
    return (images - mean[:, None, None]) / std[:, None, None]


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize a ``[C, H, W]`` float tensor to ``[C, size, size]``."""
    if x.shape[-2:] == (size, size):
        return x
    if mode == "bilinear":
        return F.interpolate(x[None], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0, 1)
    return F.interpolate(x[None], size=(size, size), mode="nearest-exact")[0]


# --------------------------------------------------------------------------- files

def _is_image(path: Path) -> bool:
    """An image file we read (hidden files such as macOS ``._x.png`` are skipped)."""
    return (path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
            and not path.name.startswith("."))


def _list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image; any Pillow failure becomes a DatasetError naming the file.

    The size in the header is checked against :data:`MAX_IMAGE_PIXELS` before decoding.
    """
    if not path.is_file():
        raise DatasetError(f"The image file {path} does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            with Image.open(path) as img:
                width, height = img.size
                if width * height <= MAX_IMAGE_PIXELS:
                    img.load()
                    return img.copy()
    except Image.DecompressionBombError:
        width, height = None, None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors ...
        raise DatasetError(
            f"Could not read the image {path} ({type(err).__name__}: {err}). The file is "
            "corrupt or truncated: re-download the dataset (or re-save this file as PNG), "
            "or delete the file.") from err
    size = f"{width} x {height} pixels" if width else "larger than Pillow's own limit"
    raise DatasetError(
        f"The image {path} is {size}, over adlab's limit of {MAX_IMAGE_PIXELS:,} pixels "
        "(adlab.data.mvtec.MAX_IMAGE_PIXELS; a guard against decompression bombs). Resize the "
        "image, or delete the file if it does not belong to the dataset.")


def _to_array(img: Image.Image) -> np.ndarray:
    """Pixel values as float32 in [0, 1], ``[H, W]`` for one channel or ``[H, W, 3]``.

    Grayscale, palette, RGBA, CMYK ... are converted to RGB (alpha is dropped);
    16-bit images (``I;16*`` and ``I``, as Pillow opens 16-bit PNG/TIFF) are divided
    by 65535, 8-bit ones by 255; float images (``F``) are taken as [0, 1].
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if img.mode in ("L", "RGB"):
        return np.asarray(img, dtype=np.float32) / 255.0
    if img.mode in ("1", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_image(path: Path) -> torch.Tensor:
    """An image file as a float tensor ``[3, H, W]`` in [0, 1] at its native size."""
    array = _to_array(_open(path))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _read_mask(path: Path) -> torch.Tensor:
    """A mask file as ``float32 [1, H, W]`` in {0, 1}: any non-zero pixel is defect.

    Works for 0/1, 0/255, anti-aliased, colour and 16-bit masks alike.
    """
    array = _to_array(_open(path))
    if array.ndim == 3:
        array = array.max(axis=2)
    return torch.from_numpy((array > 0).astype(np.float32))[None]


def load_image(path, size: int | None = None) -> torch.Tensor:
    """Read one image as ``float32 [3, size, size]`` in [0, 1] (bilinear, antialiased).

    ``size=None`` keeps the native size. Grayscale / RGBA / palette / 16-bit images are
    converted to RGB; a missing, unreadable or oversized file raises a DatasetError naming it.
    """
    image = _read_image(Path(path))
    return image if size is None else _resize(image, size, "bilinear")


def load_mask(path, size: int | None = None) -> torch.Tensor:
    """Read one mask as ``float32 [size, size]`` in {0, 1} (binarised at > 0, nearest resize)."""
    mask = _read_mask(Path(path))
    if size is not None:
        mask = (_resize(mask, size, "nearest") > 0.5).float()
    return mask[0]


# --------------------------------------------------------------------------- layout

def _resolve_root(root) -> Path:
    """``root`` as given, else the synthetic data (quick profile) or ``ADLAB_DATA`` (paper)."""
    if root is not None:
        path = Path(root).expanduser()
    elif config.profile().synthetic:
        from adlab.data.synthetic import ensure_synthetic  # lazy: generates on first use
        path = Path(ensure_synthetic())
    else:
        try:
            path = config.data_root()
        except FileNotFoundError as err:  # ADLAB_DATA is not set: the message says what to do
            raise DatasetError(str(err)) from err
    if not path.exists():
        raise DatasetError(
            f"The dataset root {path} does not exist. Pass as root the folder that holds the "
            "category folders (e.g. .../mvtec_anomaly_detection), or set ADLAB_DATA.")
    if not path.is_dir():
        raise DatasetError(
            f"The dataset root {path} is a file, not a folder. Pass as root the folder that "
            "holds the category folders (e.g. .../mvtec_anomaly_detection).")
    if (path / "train" / GOOD).is_dir():
        raise DatasetError(
            f"The dataset root {path} is a category folder (it holds train/good/). Use its "
            f"parent {path.parent} as the root and {path.name!r} as the category.")
    return path


def list_categories(root=None) -> list[str]:
    """The categories under ``root``: sub-folders that contain ``train/good``.

    A root without any raises a DatasetError (an empty or wrong folder).
    """
    root = _resolve_root(root)
    found = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())
    if not found:
        raise DatasetError(
            f"No categories under the dataset root {root}: expected <category>/train/good/ "
            "folders of images. Pass the folder that holds the category folders, or check that "
            "the dataset finished downloading and unpacking.")
    return found


def _category_dir(root: Path, category: str) -> Path:
    """``root/category``, or a DatasetError that lists the categories that exist."""
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())
        nested = sorted(p.parent.name for p in root.glob(f"*/{category}") if p.is_dir())
        hint = (f" It exists one level down: use category='{nested[0]}/{category}' or "
                f"root='{root / nested[0]}'." if nested else "")
        raise DatasetError(
            f"Category {category!r} not found: {folder} does not exist. Categories under "
            f"{root}: {', '.join(found) if found else 'none (is this the right root?)'}.{hint}")
    return folder


def _images_in(folder: Path) -> list[Path]:
    """The images of a split folder, or a clear error when it is missing or empty."""
    if not folder.is_dir():
        raise DatasetError(
            f"{folder} does not exist. The MVTec layout needs <category>/train/good/ and "
            "<category>/test/<good|defect>/ folders of images.")
    paths = _list_images(folder)
    if not paths:
        raise DatasetError(
            f"No images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}). Put the "
            "images there, or check that the dataset finished downloading and unpacking.")
    return paths


def val_indices(n: int, val_fraction: float, seed: int) -> list[int]:
    """A seeded random subset of ``range(n)`` of size ``round(val_fraction * n)`` (>= 1).

    Random, never a sorted cut: real datasets are sorted by capture session.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    if val_fraction == 0.0:
        return []
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    if n_val < 1:
        raise DatasetError(f"Cannot split {n} training image(s) into train and val; "
                         "use val_fraction=0 or add training images.")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:n_val].tolist())


def _train_files(folder: Path, split: str, val_fraction: float, seed: int) -> list[Path]:
    """The files of the ``train`` or ``val`` split (val is carved out of train/good)."""
    paths = _images_in(folder / "train" / GOOD)
    if split == "val" and val_fraction <= 0:
        raise ValueError("split='val' needs val_fraction > 0 (e.g. val_fraction=0.1): the "
                         "validation images are drawn from the training images.")
    val = set(val_indices(len(paths), val_fraction, seed))
    keep = (lambda i: i in val) if split == "val" else (lambda i: i not in val)
    return [p for i, p in enumerate(paths) if keep(i)]


def _test_files(folder: Path) -> list[tuple[Path, str]]:
    """``(path, defect)`` pairs of the test split: ``good`` first, then defects by name."""
    test = folder / "test"
    if not test.is_dir():
        raise DatasetError(f"{test} does not exist. The MVTec layout needs "
                                "<category>/test/good/ and <category>/test/<defect>/ folders.")
    kinds = sorted((d.name for d in test.iterdir() if d.is_dir() and not d.name.startswith(".")),
                   key=lambda name: (name != GOOD, name))
    pairs = [(p, kind) for kind in kinds for p in _list_images(test / kind)]
    if not pairs:
        raise DatasetError(f"No images in any folder of {test}; expected test/good/ and "
                         "test/<defect>/ folders of images.")
    return pairs


def _mask_path(gt_dir: Path, image: Path) -> Path:
    """``ground_truth/<defect>/<stem>_mask.<ext>`` for a defect image, or a clear error."""
    for candidate in sorted(gt_dir.glob(f"{image.stem}_mask.*")):
        if _is_image(candidate):
            return candidate
    raise DatasetError(
        f"The defect image {image} has no mask: expected {gt_dir / (image.stem + '_mask.png')}. "
        "Add the mask, remove the image, or delete the whole ground_truth/ folder to use "
        "the category image-level only.")


def _mask_paths(folder: Path, files: list[tuple[Path, str]]) -> list[Path | None] | None:
    """One mask path per test file (None for good images), or None when there are no masks.

    No ``ground_truth/`` folder: image-level only (returns None). ``ground_truth/`` without
    a folder for one of the defects: pixel masks are incomplete, so a warning and None.
    """
    gt = folder / "ground_truth"
    if not gt.is_dir():
        return None
    missing = sorted({d for _, d in files if d != GOOD and not (gt / d).is_dir()})
    if missing:
        warnings.warn(f"{gt} has no folder for defect(s) {', '.join(missing)}; using the "
                      "category image-level only (masks=None, pixel metrics n/a).", stacklevel=3)
        return None
    return [None if d == GOOD else _mask_path(gt / d, p) for p, d in files]


def _load_pair(image_path: Path, mask_path: Path | None, size: int):
    """Image ``[3, S, S]`` and mask ``[S, S]`` (zeros without a mask path); sizes must agree."""
    image = _read_image(image_path)
    if mask_path is None:
        return _resize(image, size, "bilinear"), torch.zeros(size, size)
    mask = _read_mask(mask_path)
    if mask.shape[-2:] != image.shape[-2:]:
        raise DatasetError(
            f"The mask {mask_path} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
            f"{image_path} is {image.shape[-1]}x{image.shape[-2]} (width x height). Masks must "
            "have their image's size: re-export the mask at that size.")
    mask = (_resize(mask, size, "nearest") > 0.5).float()[0]
    return _resize(image, size, "bilinear"), mask


# --------------------------------------------------------------------------- dataset

@dataclass(eq=False)
class ADDataset(Dataset):
    """One split of one category, held in memory.

    ``images`` float32 ``[N, 3, H, W]`` in [0, 1]; ``labels`` long ``[N]`` (0 good,
    1 defect); ``masks`` float32 ``[N, H, W]`` in {0, 1}, or None when the category has
    no ``ground_truth/`` folder; ``defects`` the defect folder names ("good" for normal);
    ``paths`` the image files. Items are dicts ``image, label, mask, defect, path``
    (``path`` as ``str`` and, without masks, ``mask`` all-NaN, so the default DataLoader
    collate works).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    defects: list[str]
    paths: list[Path]
    category: str
    split: str = "test"
    root: Path | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        mask = (self.masks[i] if self.masks is not None
                else torch.full(self.images.shape[-2:], float("nan")))
        return dict(image=self.images[i], label=self.labels[i], mask=mask,
                    defect=self.defects[i], path=str(self.paths[i]))

    def __repr__(self) -> str:
        n_defect = int(self.labels.sum())
        masks = "yes" if self.masks is not None else "none"
        return (f"ADDataset({self.category!r}, split={self.split!r}, n={len(self)} "
                f"({len(self) - n_defect} good, {n_defect} defect), "
                f"size={self.images.shape[-1]}, masks={masks})")


def load_dataset(category: str, split: str = "train", root=None, image_size: int | None = None,
                 val_fraction: float = 0.0, seed: int = 0) -> ADDataset:
    """Load one split (``train`` | ``val`` | ``test``) of a category in the MVTec AD layout.

    ``root=None`` uses the synthetic data in the quick profile and ``ADLAB_DATA`` in the
    paper profile; ``image_size=None`` the profile's image size. ``val_fraction > 0``
    moves a random, ``seed``-ed subset of the training images into ``val``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    size = config.profile().image_size if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size}.")
    root = _resolve_root(root)
    folder = _category_dir(root, category)
    if split == "test":
        files = _test_files(folder)
    else:
        files = [(p, GOOD) for p in _train_files(folder, split, val_fraction, seed)]
    mask_files = _mask_paths(folder, files)
    pairs = [_load_pair(p, m, size) for (p, _), m in
             zip(files, mask_files if mask_files is not None else [None] * len(files))]
    defects = [d for _, d in files]
    return ADDataset(
        images=torch.stack([image for image, _ in pairs]),
        labels=torch.tensor([int(d != GOOD) for d in defects], dtype=torch.long),
        masks=torch.stack([mask for _, mask in pairs]) if mask_files is not None else None,
        defects=defects, paths=[p for p, _ in files], category=category, split=split, root=root)
