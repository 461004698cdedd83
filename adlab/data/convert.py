"""Arrange an extracted dataset archive in the MVTec AD folder layout, and check that layout.

The one on-disk format (see DESIGN.md, "Data")::

    <category>/train/good/*        defect-free training images
    <category>/test/good/*         defect-free test images
    <category>/test/<defect>/*     defective test images
    <category>/ground_truth/<defect>/<stem>_mask.png   binary masks (0/255)

A converter ``(extracted, out)`` reads the tree :func:`adlab.data.archive.safe_extract` wrote
(plain files and folders only) and builds ``out``; MVTec AD and MPDD are taken as they are,
VisA and BTAD are rearranged. :func:`check_layout` checks the result.

One catalogue entry is not an anomaly dataset: DTD, the Describable Textures Dataset, whose
images anomaly-synthesis methods (DRAEM, GLAD, TDAD; :mod:`adlab.data.synthesis`) paste into
normal images. It has no train/test split; :func:`convert_dtd` keeps only its images, one
folder per texture class (``<class>/*.jpg``), and ``check_layout(..., kind="textures")``
checks that layout instead (see :mod:`adlab.data.textures`, which reads it).
"""
from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from adlab.data.archive import is_absolute, split_name
from adlab.data.errors import LayoutError
from adlab.data.mvtec import IMAGE_EXTENSIONS
from adlab.progress import progress

__all__ = ["convert_as_is", "convert_visa", "convert_btad", "convert_dtd", "check_layout",
           "VISA_COLUMNS", "LAYOUT_KINDS"]

LAYOUT_KINDS = ("anomaly", "textures")   # DatasetEntry.kind: what check_layout expects


def _sub_dirs(folder: Path) -> list[Path]:
    """Visible sub-folders (skips hidden ones and macOS ``__MACOSX`` debris)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _find_root(extracted: Path, is_root: Callable[[Path], bool], what: str,
               max_depth: int = 3) -> Path:
    """The folder inside ``extracted`` for which ``is_root`` holds, looking through wrappers.

    Archives are often wrapped in one top folder (``MPDD/``, ``BTech_Dataset_transformed/``);
    we descend through folders that hold a single sub-folder until ``is_root`` is true.
    """
    folder = extracted
    for _ in range(max_depth + 1):
        if is_root(folder):
            return folder
        subs = _sub_dirs(folder)
        if len(subs) != 1:
            break
        folder = subs[0]
    found = ", ".join(p.name for p in _sub_dirs(extracted)) or "nothing"
    raise LayoutError(
        f"The extracted archive does not look like {what}: found {found} in {extracted}. "
        "Was the right archive downloaded? Check it, or delete it and run again.")


def _has_mvtec_category(folder: Path) -> bool:
    return any((sub / "train").is_dir() for sub in _sub_dirs(folder))


def convert_as_is(extracted: Path, out: Path) -> None:
    """MVTec AD and MPDD ship in the MVTec layout: move the category folders to ``out``."""
    source = _find_root(extracted, _has_mvtec_category,
                        "an MVTec-layout dataset (<category>/train/good, <category>/test)")
    for junk in source.glob("__MACOSX"):
        shutil.rmtree(junk)
    os.replace(source, out)


def _binary_mask(src: Path) -> Image.Image:
    """A mask image as 8-bit 0/255: every non-zero pixel (any colour channel) becomes 255.

    VisA stores defect masks with small class values (1, 2, ...), palette PNGs included, so the
    rule is "non-zero is defect" after applying the palette; alpha is ignored.
    """
    try:
        with Image.open(src) as img:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            arr = np.asarray(img)
    except (OSError, ValueError) as err:
        raise LayoutError(f"Cannot read the mask {src}: {err}. The archive may be damaged; "
                          "delete it and run again.") from err
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L")


def _safe_relative(base: Path, relative: str, where: str) -> Path:
    """``base / relative`` for a path read from a data file, refusing absolute or ``..`` paths."""
    parts = split_name(relative)
    if not relative or is_absolute(relative) or ".." in parts:
        raise LayoutError(f"{where}: the path {relative!r} is absolute or leaves the dataset.")
    return base.joinpath(*parts)


VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def convert_visa(extracted: Path, out: Path) -> None:
    """VisA -> MVTec layout with the official 1-class split ``split_csv/1cls.csv``.

    Each CSV row ``object,split,label,image,mask`` (label ``normal``/``anomaly``) becomes
    ``<object>/<split>/good/<file>`` or ``<object>/test/bad/<file>``; an anomaly's mask is
    binarised to 0/255 and saved as ``<object>/ground_truth/bad/<image stem>_mask.png``.
    Zou et al., "SPot-the-Difference ...", ECCV 2022 (github.com/amazon-science/spot-diff).
    """
    visa = _find_root(extracted, lambda p: (p / "split_csv" / "1cls.csv").is_file(),
                      "VisA (split_csv/1cls.csv next to the object folders)")
    split_file = visa / "split_csv" / "1cls.csv"
    with split_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise LayoutError(f"{split_file} lacks the column(s) {', '.join(missing)}; "
                              f"expected {','.join(VISA_COLUMNS)}.")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise LayoutError(f"{split_file} has no rows.")
    out.mkdir()
    for line, row in enumerate(progress(rows, desc="VisA -> MVTec layout", unit="img"),
                                 start=2):
        where = f"{split_file}, line {line}"
        category, split, label = row["object"], row["split"], row["label"].lower()
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", category):
            raise LayoutError(f"{where}: object name {category!r} is not a plain folder name.")
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise LayoutError(f"{where}: expected split train/test and label normal/anomaly, "
                              f"got {split!r}/{label!r}.")
        if split == "train" and label == "anomaly":
            raise LayoutError(f"{where}: an anomalous image in the training split; the "
                              "1-class split trains on normal images only.")
        image = _safe_relative(visa, row["image"], where)
        if not image.is_file():
            raise LayoutError(f"{where}: the image {image} is missing from the archive.")
        kind = "good" if label == "normal" else "bad"
        target = out / category / split / kind / image.name
        if target.exists():
            raise LayoutError(f"{where}: two rows map to the same file {target}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(image, target)
        if kind == "bad":
            mask = _safe_relative(visa, row["mask"], where) if row["mask"] else None
            if mask is None or not mask.is_file():
                raise LayoutError(f"{where}: the anomaly {row['image']} has no mask file "
                                  f"({row['mask'] or 'empty mask column'}).")
            mask_out = out / category / "ground_truth" / "bad" / f"{image.stem}_mask.png"
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            _binary_mask(mask).save(mask_out)


def convert_btad(extracted: Path, out: Path) -> None:
    """BTAD -> MVTec layout: ``ok`` becomes ``good``, ``ko`` stays the defect name.

    ``<cat>/train/ok`` -> ``train/good``, ``test/ok`` -> ``test/good``, ``test/ko`` -> ``test/ko``;
    the mask ``ground_truth/ko/<stem>.<ext>`` -> ``ground_truth/ko/<stem>_mask.png`` (0/255).
    Images keep their format (.bmp or .png; the loader reads both).
    Mishra et al., "VT-ADL: A Vision Transformer Network for Image Anomaly Detection and
    Localization", ISIE 2021 (the BTAD dataset).
    """
    btad = _find_root(extracted,
                      lambda p: any((c / "train" / "ok").is_dir() for c in _sub_dirs(p)),
                      "BTAD (<category>/train/ok, test/ok, test/ko, ground_truth/ko)")
    out.mkdir()
    rename = {"ok": "good"}
    for category in _sub_dirs(btad):
        if not (category / "train").is_dir():
            continue
        for split in ("train", "test"):
            for label_dir in _sub_dirs(category / split) if (category / split).is_dir() else []:
                label = rename.get(label_dir.name, label_dir.name)
                target_dir = out / category.name / split / label
                target_dir.mkdir(parents=True, exist_ok=True)
                for image in _visible_files(label_dir):
                    os.replace(image, target_dir / image.name)
        gt_root = category / "ground_truth"
        for defect_dir in _sub_dirs(category / "test") if (category / "test").is_dir() else []:
            defect = rename.get(defect_dir.name, defect_dir.name)
            gt_dir = gt_root / defect_dir.name
            if defect == "good" or not gt_dir.is_dir():
                continue    # good images have no masks; no ground_truth folder = image-level only
            masks = {}
            for m in _visible_files(gt_dir):
                masks[m.stem[:-5] if m.stem.endswith("_mask") else m.stem] = m
            for image in _visible_files(out / category.name / "test" / defect):
                if image.stem not in masks:
                    raise LayoutError(f"BTAD: the defect image {category.name}/test/"
                                      f"{defect_dir.name}/{image.name} has no mask in {gt_dir}.")
                mask_out = out / category.name / "ground_truth" / defect / f"{image.stem}_mask.png"
                mask_out.parent.mkdir(parents=True, exist_ok=True)
                _binary_mask(masks[image.stem]).save(mask_out)


def _has_dtd_images(folder: Path) -> bool:
    return (folder / "images").is_dir() and any(
        _images(c) for c in _sub_dirs(folder / "images"))


def _images(folder: Path) -> list[Path]:
    """Visible image files directly in ``folder`` (the extensions the loader reads)."""
    return [p for p in _visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def convert_dtd(extracted: Path, out: Path) -> None:
    """DTD -> one folder per texture class: ``images/<class>/*.jpg`` becomes ``<class>/*.jpg``.

    The archive (``dtd-r1.0.1.tar.gz``) holds ``dtd/images/<47 classes>/``, ``dtd/labels/``
    (the 10 train/val/test folds and the joint annotations) and ``dtd/imdb/imdb.mat``. Only
    the images are kept: anomaly synthesis samples textures at random and needs neither
    the folds nor the labels. The class folders are moved, not copied (the files are plain:
    :func:`adlab.data.archive.safe_extract` refused anything else); files lying directly in
    ``images/`` are left behind. Cimpoi et al., "Describing Textures in the Wild", CVPR 2014.
    """
    dtd = _find_root(extracted, _has_dtd_images,
                     "DTD (dtd/images/<class>/*.jpg next to dtd/labels/)")
    out.mkdir()
    for folder in _sub_dirs(dtd / "images"):
        os.replace(folder, out / folder.name)


def _check_anomaly_category(folder: Path, cat: Path) -> None:
    good = cat / "train" / "good"
    if not good.is_dir() or not _visible_files(good):
        raise LayoutError(f"Category {cat.name!r} in {folder} has no images in train/good/; "
                          "the MVTec layout needs <category>/train/good/*.")
    test = cat / "test"
    if not test.is_dir() or not any(_visible_files(d) for d in _sub_dirs(test)):
        raise LayoutError(f"Category {cat.name!r} in {folder} has no images under test/; "
                          "the MVTec layout needs <category>/test/<good|defect>/*.")


def _check_texture_class(folder: Path, cat: Path) -> None:
    if not _images(cat):
        raise LayoutError(f"The texture class {cat.name!r} in {folder} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)}); a texture set needs "
                          "<class>/*.jpg.")


def check_layout(folder: str | os.PathLike, expected: tuple[str, ...] = (),
                 kind: str = "anomaly") -> list[str]:
    """Check a converted dataset under ``folder``; return its categories or raise LayoutError.

    ``kind="anomaly"`` (the MVTec layout): every visible sub-folder is a category and needs
    ``train/good`` with at least one file and ``test/`` with at least one non-empty
    sub-folder. ``kind="textures"`` (DTD): every visible sub-folder is a texture class and
    holds at least one image. Missing ``expected`` categories are reported as a note (some
    users keep only a few categories).
    """
    if kind not in LAYOUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LAYOUT_KINDS)}; got {kind!r}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder} is not a folder.")
    categories = _sub_dirs(folder)
    if not categories:
        raise LayoutError(f"{folder} holds no category folders.")
    check = _check_anomaly_category if kind == "anomaly" else _check_texture_class
    for cat in categories:
        check(folder, cat)
    names = [c.name for c in categories]
    missing = [c for c in expected if c not in names]
    if missing:
        print(f"Note: {folder} lacks the categories {', '.join(missing)}.")
    return names
