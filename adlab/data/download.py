"""Real datasets: download, verify (sha256), extract safely, convert to the MVTec layout.

The paper profile reads real datasets in the MVTec AD folder layout (see DESIGN.md, "Data")::

    <root>/<name>/<category>/train/good/*        defect-free training images
    <root>/<name>/<category>/test/good/*         defect-free test images
    <root>/<name>/<category>/test/<defect>/*     defective test images
    <root>/<name>/<category>/ground_truth/<defect>/<stem>_mask.png   binary masks (0/255)

:func:`download` fetches one archive of :data:`CATALOGUE` to ``<root>/<archive filename>``,
checks its sha256, extracts it with :func:`safe_extract` into a temporary folder, converts it
(VisA, BTAD) or takes it as is (MVTec AD, MPDD), checks the layout and only then renames the
result to ``<root>/<name>``; an interrupted run never leaves a half-built dataset behind.

No archive is used unverified: a download or an archive already on disk whose sha256 differs
from the catalogue is refused (a wrong one on disk is set aside and downloaded again), and an
archive whose checksum nobody published is refused unless ``verify=False`` (``--no-verify``)
is given, after printing its sha256 so you can compare it with the publisher's.

Offline, a download fails within ``timeout`` seconds and says where to put a manually
downloaded archive; rerunning then verifies and uses it. Command line:
``python data_scripts/download.py NAME --root DIR`` (``--list`` shows the catalogue).
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "CATALOGUE", "DatasetEntry", "download", "safe_extract", "check_layout", "sha256_file",
    "dataset_dir", "archive_path", "resolve_name",
    "DownloadError", "ChecksumError", "UnsafeArchiveError", "LayoutError",
]

DEFAULT_TIMEOUT = 10.0          # seconds: connect and per-read socket timeout
CHUNK = 1 << 20                 # 1 MiB read/write/hash chunks
_USER_AGENT = "adlab-download/0.1 (python urllib)"
# Python >= 3.11.4 / 3.12 have tarfile extraction filters; we pass "data" as a second line
# of defence, but every check below is our own and runs before anything is written.
_TAR_HAS_FILTER = hasattr(tarfile, "data_filter")


# ----------------------------------------------------------------------------- errors
class DownloadError(RuntimeError):
    """A dataset could not be fetched or prepared; the message says what to do."""


class ChecksumError(DownloadError):
    """An archive's sha256 differs from the catalogue, or no checksum is known."""


class UnsafeArchiveError(DownloadError):
    """An archive member would write outside the destination, or is a device/FIFO/link trick."""


class LayoutError(DownloadError):
    """The extracted/converted folder is not in the expected (MVTec) layout."""


# ----------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class DatasetEntry:
    """One real dataset: where its archive is, how to check it and how to lay it out."""

    name: str                       # catalogue key and the folder <root>/<name>
    title: str
    urls: tuple[str, ...]           # direct archive URLs, tried in order; () = manual download
    filename: str                   # archive file name, stored as <root>/<filename>
    sha256: str | None              # None: no published checksum (see sha256_source)
    sha256_source: str              # where the checksum comes from, or why there is none
    homepage: str                   # page to download from by hand
    licence: str
    categories: tuple[str, ...]     # categories expected after conversion
    layout: str                     # layout of the archive after extraction
    converter: Callable[[Path, Path], None] = field(repr=False, compare=False)
    size_bytes: int | None = None   # informational (reported by the sources below)
    notes: str = ""                 # extra help for a manual download

    @property
    def manual(self) -> bool:
        """True when no direct archive URL exists (a browser download is needed)."""
        return not self.urls


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
    parts = _split_name(relative)
    if not relative or _is_absolute(relative) or ".." in parts:
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
    for line, row in enumerate(tqdm(rows, desc="VisA -> MVTec layout", unit="img"), start=2):
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


_MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                     "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                     "zipper")
_VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
_MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector",
                    "metal_plate", "tubes")

CATALOGUE: dict[str, DatasetEntry] = {
    "mvtec_ad": DatasetEntry(
        name="mvtec_ad",
        title="MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021)",
        # MVTec's share links (mydrive.ch) change over time; both were used by anomalib for
        # the same archive and checksum. If both fail, use the form on the homepage.
        urls=("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/"
              "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
              "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
              "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz"),
        filename="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        sha256_source="anomalib (open-edge-platform/anomalib, src/anomalib/data/datamodules/"
                      "image/mvtecad.py, DOWNLOAD_INFO.hashsum, sha256)",
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        licence="CC BY-NC-SA 4.0 (non-commercial use; see license.txt in the archive)",
        categories=_MVTEC_CATEGORIES,
        layout="<category>/{train/good, test/<good|defect>, ground_truth/<defect>/"
               "<stem>_mask.png} plus license.txt, readme.txt at the top (already MVTec layout)",
        converter=convert_as_is,
        size_bytes=5_264_982_680,
    ),
    "visa": DatasetEntry(
        name="visa",
        title="VisA, Visual Anomaly (Zou et al., ECCV 2022)",
        urls=("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
        filename="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        sha256_source="anomalib (open-edge-platform/anomalib, src/anomalib/data/datamodules/"
                      "image/visa.py, DOWNLOAD_INFO.hashsum, sha256)",
        homepage="https://github.com/amazon-science/spot-diff",
        licence="CC BY 4.0 (per the official spot-diff README; anomalib's docstring says "
                "CC BY-NC-SA 4.0: check the LICENSE file in the archive)",
        categories=_VISA_CATEGORIES,
        layout="<object>/Data/Images/{Normal,Anomaly}/*.JPG, <object>/Data/Masks/Anomaly/*.png, "
               "split_csv/1cls.csv (object,split,label,image,mask); converted to MVTec layout "
               "with good/bad folders",
        converter=convert_visa,
        size_bytes=1_929_840_640,
    ),
    "mpdd": DatasetEntry(
        name="mpdd",
        title="MPDD, Metal Parts Defect Detection (Jezek et al., ICUMT 2021)",
        urls=(),  # the authors share a OneDrive/SharePoint folder: a browser download
        filename="MPDD.zip",
        sha256=None,
        sha256_source="none published: the authors give no checksum and the archive is a "
                      "browser download of a shared folder; check the printed sha256 yourself",
        homepage="https://github.com/stepanje/MPDD",
        licence="CC BY-NC-SA 4.0 according to anomalib's MPDD module; the authors' repository "
                "states no licence: ask them for anything beyond research use",
        categories=_MPDD_CATEGORIES,
        layout="<category>/{train/good, test/<good|defect>, ground_truth/<defect>/"
               "<stem>_mask.png}, possibly inside one top folder (already MVTec layout)",
        converter=convert_as_is,
        notes="The authors' download link (a OneDrive/SharePoint folder: download it as one "
              "zip) is https://vutbr-my.sharepoint.com/:f:/g/personal/xjezek16_vutbr_cz/"
              "EhHS_ufVigxDo3MC6Lweau0BVMuoCmhMZj6ddamiQ7-FnA?e=oHKCxI",
    ),
    "btad": DatasetEntry(
        name="btad",
        title="BTAD, beanTech Anomaly Detection (Mishra et al., ISIE 2021)",
        urls=("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
        filename="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        sha256_source="anomalib (open-edge-platform/anomalib, src/anomalib/data/datamodules/"
                      "image/btech.py, DOWNLOAD_INFO.hashsum, sha256)",
        homepage="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        licence="CC BY-NC-SA 4.0 (as stated by anomalib's BTech module)",
        categories=("01", "02", "03"),
        layout="BTech_Dataset_transformed/<01|02|03>/{train/ok, test/ok, test/ko, "
               "ground_truth/ko/<stem>.png|bmp}; converted to MVTec layout (ok -> good)",
        converter=convert_btad,
    ),
}

_ALIASES = {"mvtec": "mvtec_ad", "mvtecad": "mvtec_ad", "mvtec-ad": "mvtec_ad",
            "btech": "btad"}


def resolve_name(name: str) -> str:
    """The catalogue key for ``name`` (case-insensitive, a few aliases), or DownloadError."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in CATALOGUE:
        raise DownloadError(f"Unknown dataset {name!r}. Known: {', '.join(CATALOGUE)}.")
    return key


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """Where :func:`download` puts the converted dataset: ``<root>/<name>``."""
    return Path(root).expanduser() / resolve_name(name)


def archive_path(name: str, root: str | os.PathLike) -> Path:
    """Where the archive is stored (and where to put a manually downloaded one)."""
    return Path(root).expanduser() / CATALOGUE[resolve_name(name)].filename


# ----------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, progress: bool = True) -> str:
    """The sha256 hex digest of a file, read in chunks (a progress bar for large files)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle, tqdm(total=size, unit="B", unit_scale=True,
                                         desc=f"sha256 {path.name}",
                                         disable=not progress or size < 64 * CHUNK) as bar:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _check_sha256(archive: Path, expected: str | None, verify: bool) -> str:
    """Verify ``archive`` against ``expected``; return its sha256 or raise ChecksumError."""
    actual = sha256_file(archive)
    archive = archive.with_name(archive.name.removesuffix(".part"))   # name it as the user will
    if expected is not None and actual == expected.lower():
        print(f"sha256 OK: {archive.name} = {actual}")
        return actual
    if not verify:
        problem = (f"does NOT match the expected {expected}" if expected
                   else "cannot be checked: no checksum is known for it")
        print(f"WARNING: --no-verify: using {archive} unverified; its sha256 {actual} {problem}.")
        return actual
    if expected is None:
        raise ChecksumError(
            f"No checksum is known for {archive.name}, so it is not used unverified.\n"
            f"  its sha256: {actual}\n"
            f"Compare it with the one the publisher gives (or the one a colleague computed), "
            f"then rerun with --no-verify (verify=False) or with --sha256 {actual}.")
    raise ChecksumError(
        f"Checksum mismatch for {archive}:\n  expected sha256 {expected}\n"
        f"  actual   sha256 {actual}\nThe file is damaged, truncated or a different version.")


# ----------------------------------------------------------------------------- safe extraction
def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _split_name(name: str) -> list[str]:
    """Path components of an archive name; ``\\`` counts as a separator too (Windows zips)."""
    return [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]


class _Escape(Exception):
    pass


def _walk(base: list[str], parts: list[str], links: dict[str, str], budget: list[int]
          ) -> list[str]:
    """Resolve ``parts`` from ``base`` (both relative to dest) following the archive's symlinks.

    A virtual ``realpath`` over the archive's own symlinks, so chains such as ``a -> .`` and
    ``b -> a/..`` are caught before anything exists on disk. Raises ``_Escape`` if the walk
    ever leaves dest (``..`` above it, an absolute link target) or loops.
    """
    current = list(base)
    for part in parts:
        if part == "..":
            if not current:
                raise _Escape("leaves the destination")
            current.pop()
            continue
        current.append(part)
        target = links.get("/".join(current))
        if target is not None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _Escape("symlink loop")
            if _is_absolute(target):
                raise _Escape(f"absolute link target {target!r}")
            current = _walk(current[:-1], _split_name(target), links, budget)
    return current


@dataclass
class _Member:
    name: str                 # as stored in the archive
    parts: list[str]          # normalised components
    kind: str                 # "file" | "dir" | "symlink" | "hardlink"
    link: str = ""            # symlink target (relative to its folder) / hardlink target (to root)
    info: object = None       # TarInfo or ZipInfo


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[_Member]:
    members = []
    for info in tf.getmembers():
        if info.isreg():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        else:
            what = ("character device" if info.ischr() else "block device" if info.isblk()
                    else "FIFO" if info.isfifo() else f"special file (type {info.type!r})")
            raise UnsafeArchiveError(f"{archive}: refusing to extract the {what} {info.name!r}; "
                                     "a dataset archive holds only files and folders.")
        members.append(_Member(info.name, [], kind, info.linkname, info))
    return members


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[_Member]:
    members = []
    for info in zf.infolist():
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir() or fmt == stat.S_IFDIR:
            kind, link = "dir", ""
        elif fmt == stat.S_IFLNK:
            kind, link = "symlink", zf.read(info).decode("utf-8", "replace")
        elif fmt in (0, stat.S_IFREG):
            kind, link = "file", ""
        else:
            what = ("character device" if fmt == stat.S_IFCHR else "block device"
                    if fmt == stat.S_IFBLK else "FIFO" if fmt == stat.S_IFIFO else "special file")
            raise UnsafeArchiveError(f"{archive}: refusing to extract the {what} "
                                     f"{info.filename!r}; a dataset archive holds only files.")
        members.append(_Member(info.filename, [], kind, link, info))
    return members


def _check_members(members: list[_Member], dest: Path, archive: Path) -> None:
    """Refuse the whole archive if any member could write outside ``dest`` (nothing written)."""
    for m in members:
        if not m.name or "\x00" in m.name or _is_absolute(m.name):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} has an absolute path; "
                                     "refusing to extract anything from this archive.")
        m.parts = _split_name(m.name)
        if ".." in m.parts:
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} contains '..' (path "
                                     "traversal); refusing to extract anything.")
        if m.kind in ("symlink", "hardlink"):
            if not m.parts:
                raise UnsafeArchiveError(f"{archive}: link member {m.name!r} has no name.")
            if not m.link or "\x00" in m.link:
                raise UnsafeArchiveError(f"{archive}: link {m.name!r} has an empty target.")
            if _is_absolute(m.link):
                raise UnsafeArchiveError(f"{archive}: {m.kind} {m.name!r} -> {m.link!r} has an "
                                         "absolute target (outside the destination).")
    links = {"/".join(m.parts): m.link for m in members if m.kind == "symlink" and m.parts}
    real_dest = os.path.realpath(dest)
    for m in members:
        try:
            if m.kind == "symlink":
                parent = _walk([], m.parts[:-1], links, [64])
                resolved = _walk(parent, _split_name(m.link), links, [64])
            elif m.kind == "hardlink":   # tar hard-link targets are relative to the archive root
                resolved = _walk([], _split_name(m.link), links, [64])
            else:
                resolved = _walk([], m.parts, links, [64])
        except _Escape as why:
            target = f" -> {m.link!r}" if m.link else ""
            raise UnsafeArchiveError(f"{archive}: {m.kind} {m.name!r}{target} resolves outside "
                                     f"the destination ({why}); refusing to extract anything."
                                     ) from None
        # Also resolve on the real filesystem, in case dest already holds symlinks.
        real = os.path.realpath(os.path.join(real_dest, *resolved))
        if os.path.commonpath([real_dest, real]) != real_dest:
            raise UnsafeArchiveError(f"{archive}: {m.kind} {m.name!r} would end up at {real}, "
                                     f"outside {dest}; refusing to extract anything.")


def _extract_zip(zf: zipfile.ZipFile, members: list[_Member], dest: Path) -> None:
    """Write checked zip members ourselves (zipfile would turn symlinks into plain files)."""
    for m in tqdm(members, desc=f"extract {dest.name}", unit="file", leave=False):
        target = dest.joinpath(*m.parts) if m.parts else dest
        if m.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if m.kind == "symlink":
            os.symlink(m.link.replace("\\", "/"), target)
            continue
        with zf.open(m.info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(tf: tarfile.TarFile, members: list[_Member], dest: Path) -> None:
    infos = tqdm([m.info for m in members], desc=f"extract {dest.name}", unit="file",
                 leave=False)
    if _TAR_HAS_FILTER:   # a second line of defence; our own checks already passed
        tf.extractall(dest, members=infos, filter="data")
        return
    for info in infos:    # no owner/permission bits from the archive (no setuid, no chown)
        tf.extract(info, dest, set_attrs=False)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar (plain/gz/xz/bz2) or zip archive into ``dest``, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    symlinks and hard links whose target resolves outside ``dest`` (following the archive's own
    symlink chains), device files and FIFOs make the whole archive refused with
    :class:`UnsafeArchiveError`. The checks are our own and do not depend on the Python
    version; where ``tarfile`` has extraction filters, ``filter="data"`` is passed as well.
    If extraction fails half-way, a ``dest`` created by this call is removed again.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError(f"No archive at {archive}.")
    if zipfile.is_zipfile(archive):
        opener, lister, extractor = zipfile.ZipFile, _zip_members, _extract_zip
    elif tarfile.is_tarfile(archive):
        opener, lister, extractor = (lambda p: tarfile.open(p, "r:*")), _tar_members, _extract_tar
    else:
        raise DownloadError(f"{archive} is neither a tar nor a zip archive (damaged download, "
                            "or a web page saved under the archive's name?). Delete it and "
                            "download it again.")
    created = not dest.exists()
    try:
        with opener(archive) as handle:
            members = lister(handle, archive)
            _check_members(members, dest, archive)
            dest.mkdir(parents=True, exist_ok=True)
            extractor(handle, members, dest)
    except UnsafeArchiveError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if created and dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(err, getattr(tarfile, "FilterError", ())):
            raise UnsafeArchiveError(f"{archive}: refused by tarfile's data filter: {err}") from err
        raise DownloadError(f"Extracting {archive} failed: {err}. The archive may be damaged "
                            "or the disk full; delete the archive and run again.") from err
    return dest


# ----------------------------------------------------------------------------- layout check
def check_layout(folder: str | os.PathLike, expected: tuple[str, ...] = ()) -> list[str]:
    """Check the MVTec layout under ``folder``; return its categories or raise LayoutError.

    Every visible sub-folder is a category and needs ``train/good`` with at least one file
    and ``test/`` with at least one non-empty sub-folder. Missing ``expected`` categories are
    reported as a warning (some users keep only a few categories).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder} is not a folder.")
    categories = _sub_dirs(folder)
    if not categories:
        raise LayoutError(f"{folder} holds no category folders.")
    for cat in categories:
        good = cat / "train" / "good"
        if not good.is_dir() or not _visible_files(good):
            raise LayoutError(f"Category {cat.name!r} in {folder} has no images in train/good/; "
                              "the MVTec layout needs <category>/train/good/*.")
        test = cat / "test"
        if not test.is_dir() or not any(_visible_files(d) for d in _sub_dirs(test)):
            raise LayoutError(f"Category {cat.name!r} in {folder} has no images under test/; "
                              "the MVTec layout needs <category>/test/<good|defect>/*.")
    names = [c.name for c in categories]
    missing = [c for c in expected if c not in names]
    if missing:
        print(f"Note: {folder} lacks the categories {', '.join(missing)}.")
    return names


# ----------------------------------------------------------------------------- download
def _manual_message(entry: DatasetEntry, archive: Path, url: str | None, reason: str,
                    checked: bool = True) -> str:
    source = url or entry.homepage
    lines = [f"{reason}",
             f"Download the {entry.title} archive manually (in a browser) from:",
             f"  {source}"]
    if url and entry.homepage and entry.homepage != url:
        lines.append(f"  (dataset page: {entry.homepage})")
    if entry.notes:
        lines.append(f"  {entry.notes}")
    lines += ["and save it as:", f"  {archive}",
              "(rename it if your browser picked another name), then run the same command "
              + ("again: it verifies the sha256 and uses that file." if checked else
                 "again with --no-verify (no checksum is known: it prints the file's sha256 "
                 "for you to check).")]
    return "\n".join(lines)


class _HtmlPage(Exception):
    """The server sent a web page where the archive was expected."""


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Stream ``url`` into ``part`` with a progress bar (raises urllib/socket errors)."""
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"Only http(s) URLs are downloaded, not {url!r}; put a local "
                            "archive at the path given in the instructions instead.")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http/s)
        ctype = response.headers.get("Content-Type", "")
        if ctype.lower().startswith("text/html"):
            raise _HtmlPage(ctype)
        total = response.headers.get("Content-Length")
        with part.open("wb") as out, tqdm(total=int(total) if total and total.isdigit() else None,
                                          unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=part.name.removesuffix(".part")) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
        if total and total.isdigit() and part.stat().st_size != int(total):
            raise ConnectionError(f"the transfer stopped early ({part.stat().st_size} of "
                                  f"{total} bytes)")


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"the server answered HTTP {err.code} {err.reason}"
    if isinstance(err, _HtmlPage):
        return ("the server sent a web page (Content-Type text/html), not the archive: share "
                "links that need a browser or have expired do this")
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, socket.gaierror):
        return f"the host name could not be resolved (offline? DNS: {err})"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "the connection timed out (offline, or the server is unreachable)"
    if isinstance(err, ConnectionRefusedError):
        return "the connection was refused (offline, or the server is down)"
    return f"{type(err).__name__}: {err}"


def _download_archive(entry: DatasetEntry, urls: tuple[str, ...], archive: Path,
                      timeout: float, checked: bool) -> Path:
    """Try each URL in turn into ``<archive>.part``; return that file once complete."""
    part = archive.with_name(archive.name + ".part")
    failures = []
    for url in urls:
        print(f"Downloading {entry.title}\n  from {url}\n  to   {archive}")
        try:
            _fetch(url, part, timeout)
            return part
        except (urllib.error.URLError, _HtmlPage, OSError, ValueError,
                http.client.HTTPException) as err:
            part.unlink(missing_ok=True)
            failures.append((url, _reason(err)))
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    reason = "; ".join(f"{u}: {r}" for u, r in failures)
    raise DownloadError(_manual_message(entry, archive, urls[0],
                                        f"Could not download {entry.title}: {reason}.", checked))


def download(name: str, root: str | os.PathLike, *, url_override: str | None = None,
             sha256: str | None = None, verify: bool = True,
             timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download, verify, extract and convert a catalogue dataset; return ``<root>/<name>``.

    Args:
        name: a :data:`CATALOGUE` key (``mvtec_ad``, ``visa``, ``mpdd``, ``btad``).
        root: folder for the archive (``<root>/<archive filename>``) and the dataset.
        url_override: download from this URL instead of the catalogue's (a mirror).
        sha256: expected checksum instead of the catalogue's (e.g. for a dataset without one).
        verify: ``False`` uses an archive whose sha256 is unknown or does not match, after
            printing its sha256. Never the default.
        timeout: seconds to wait for a connection or for data before giving up.

    Raises:
        DownloadError (offline, HTTP error, manual download needed), ChecksumError,
        UnsafeArchiveError, LayoutError; each message says what to do.
    """
    entry = CATALOGUE[resolve_name(name)]
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / entry.name
    if final.exists():
        try:
            check_layout(final, entry.categories)
        except LayoutError as err:
            raise LayoutError(f"{final} exists but is not a complete dataset ({err}) Delete "
                              f"{final} and run again.") from err
        print(f"{entry.title} is already at {final}.")
        return final

    expected = (sha256 or entry.sha256 or None)
    expected = expected.strip().lower() if expected else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DownloadError(f"{sha256!r} is not a sha256 (64 hex digits).")
    urls = (url_override,) if url_override else entry.urls
    archive = root / entry.filename

    if archive.exists():
        print(f"Found {archive}; checking its sha256.")
        try:
            _check_sha256(archive, expected, verify)
        except ChecksumError:
            if expected is None or not urls:
                raise
            corrupt = archive.with_name(archive.name + ".corrupt")
            os.replace(archive, corrupt)
            print(f"The archive on disk is wrong; moved it to {corrupt} (delete it when done) "
                  "and downloading it again.")
    if not archive.exists():
        if not urls:
            raise DownloadError(_manual_message(
                entry, archive, None,
                f"There is no direct download link for {entry.name}.", expected is not None))
        part = _download_archive(entry, urls, archive, timeout, expected is not None)
        try:
            _check_sha256(part, expected, verify)
        except ChecksumError as err:
            if expected is not None:      # a wrong download never gets the archive's name
                part.unlink(missing_ok=True)
                raise ChecksumError(f"{err}\nThe download was deleted. If this repeats, the "
                                    "publisher changed the file: check the dataset page.") from err
            os.replace(part, archive)     # unknown checksum: keep it for a --no-verify rerun
            raise ChecksumError(f"{err}\n(The download is kept at {archive}.)") from err
        os.replace(part, archive)         # atomic: the archive name only holds whole files

    for stale in root.glob(f".{entry.name}.extract-*"):
        print(f"Removing {stale}, left over from an interrupted run.")
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.extract-", dir=root))
    try:
        print(f"Extracting {archive.name} ...")
        extracted = safe_extract(archive, work / "extracted")
        print(f"Arranging {entry.title} in the MVTec layout ...")
        entry.converter(extracted, work / "converted")
        categories = check_layout(work / "converted", entry.categories)
        os.replace(work / "converted", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{entry.title}: {len(categories)} categories in {final}\n"
          f"Use it with:  export ADLAB_DATA={final}")
    return final


def describe(entry: DatasetEntry) -> str:
    """A few lines about a catalogue entry (used by ``--list``)."""
    size = f"{entry.size_bytes / 1e9:.1f} GB" if entry.size_bytes else "size unknown"
    check = f"sha256 {entry.sha256} (from {entry.sha256_source})" if entry.sha256 \
        else f"sha256 unknown: {entry.sha256_source}"
    where = "\n".join(f"    url: {u}" for u in entry.urls) or \
        f"    manual download: {entry.homepage}" + (f"\n    {entry.notes}" if entry.notes else "")
    return (f"{entry.name}: {entry.title}\n    archive: {entry.filename} ({size})\n{where}\n"
            f"    {check}\n    licence: {entry.licence}\n"
            f"    categories: {', '.join(entry.categories)}")


if __name__ == "__main__":  # pragma: no cover - the CLI lives in data_scripts/download.py
    sys.exit("Run: python data_scripts/download.py NAME --root DIR (or --list)")
