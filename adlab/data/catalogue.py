"""The catalogue of real datasets: where each archive is, its checksum, how it is laid out.

:data:`CATALOGUE` maps a name (``mvtec_ad``, ``visa``, ``mpdd``, ``btad``, ``dtd``) to a
:class:`DatasetEntry`; :func:`adlab.data.download.download` fetches, verifies, extracts and
converts one. ``python data_scripts/download.py --list`` prints it.

Two kinds of entry (:attr:`DatasetEntry.kind`):

* ``"anomaly"`` — an anomaly-detection dataset, converted to the MVTec AD layout that
  :func:`adlab.data.load_dataset` reads (MVTec AD, VisA, MPDD, BTAD);
* ``"textures"`` — DTD, the Describable Textures Dataset: no defects, no train/test split,
  only texture images (``<class>/*.jpg``) that anomaly synthesis pastes into normal images
  (DRAEM, GLAD, TDAD). :mod:`adlab.data.textures` reads it; the loader of anomaly datasets
  never does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adlab.data.convert import (LAYOUT_KINDS, convert_as_is, convert_btad, convert_dtd,
                                convert_visa)
from adlab.data.errors import DownloadError

__all__ = ["CATALOGUE", "DatasetEntry", "DTD_CLASSES", "resolve_name", "dataset_dir",
           "archive_path", "describe"]


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
    size_bytes: int | None = None   # archive size: at most SIZE_FACTOR times this is
                                    # unpacked (adlab/data/archive.py)
    notes: str = ""                 # extra help for a manual download
    kind: str = "anomaly"           # "anomaly": MVTec layout, read by load_dataset;
                                    # "textures": <class>/*.jpg, read by adlab.data.textures

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"DatasetEntry {self.name!r}: kind must be one of "
                             f"{', '.join(LAYOUT_KINDS)}, not {self.kind!r}.")

    @property
    def manual(self) -> bool:
        """True when no direct archive URL exists (a browser download is needed)."""
        return not self.urls


_MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                     "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                     "zipper")
_VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
_MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector",
                    "metal_plate", "tubes")
# The 47 texture classes of DTD (Cimpoi et al., CVPR 2014), as the folders of dtd/images/ are
# named; the list is the same as torchvision's (pytorch/vision, torchvision/prototype/
# datasets/_builtin/dtd.categories).
DTD_CLASSES = ("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed",
               "cracked", "crosshatched", "crystalline", "dotted", "fibrous", "flecked",
               "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed", "interlaced",
               "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
               "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly",
               "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
               "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged")

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
    "dtd": DatasetEntry(
        name="dtd",
        title="DTD, Describable Textures Dataset (Cimpoi et al., CVPR 2014)",
        urls=("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
        filename="dtd-r1.0.1.tar.gz",
        sha256="e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
        sha256_source="anomalib (open-edge-platform/anomalib, src/anomalib/models/image/draem/"
                      "lightning_model.py, DTD_DOWNLOAD_INFO.hashsum, sha256); torchvision's "
                      "prototype DTD dataset gives the same sha256",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        licence="research use: the data are 'made available to the computer vision community "
                "for research purposes' (no formal licence; the images were collected from "
                "the web, see the homepage)",
        categories=DTD_CLASSES,
        layout="dtd/images/<47 texture classes>/*.jpg (5640 images, 120 per class), plus "
               "dtd/labels/ (10 folds) and dtd/imdb/; only the class folders are kept, as "
               "dtd/<class>/*.jpg. Not an anomaly dataset: textures for anomaly synthesis",
        converter=convert_dtd,
        # About 0.6 GB: TensorFlow Datasets' catalogue lists the download as 608.33 MiB
        # (637.9 MB). The images are JPEGs, so the unpacked tree is about as large as the
        # archive: the bomb limit (SIZE_FACTOR x this, ~2.5 GB) leaves ample room.
        size_bytes=637_880_000,
        kind="textures",
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


def describe(entry: DatasetEntry) -> str:
    """A few lines about a catalogue entry (used by ``--list``); textures say what they are for."""
    size = f"{entry.size_bytes / 1e9:.1f} GB" if entry.size_bytes else "size unknown"
    check = f"sha256 {entry.sha256} (from {entry.sha256_source})" if entry.sha256 \
        else f"sha256 unknown: {entry.sha256_source}"
    where = "\n".join(f"    url: {u}" for u in entry.urls) or \
        f"    manual download: {entry.homepage}" + (f"\n    {entry.notes}" if entry.notes else "")
    what = ("" if entry.kind == "anomaly" else
            "    textures for anomaly synthesis (DRAEM, GLAD, TDAD), not an anomaly dataset;\n"
            "    read with adlab.data.textures.texture_bank(size, source='dtd', root=ROOT)\n")
    return (f"{entry.name}: {entry.title}\n{what}    archive: {entry.filename} ({size})\n"
            f"{where}\n    {check}\n    licence: {entry.licence}\n"
            f"    {'classes' if entry.kind == 'textures' else 'categories'}: "
            f"{', '.join(entry.categories)}")
