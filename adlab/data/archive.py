"""Safe extraction of dataset archives: plain files and folders only, of a bounded size.

A dataset archive comes from the internet, a mirror or a browser download, so it is untrusted
input. :func:`safe_extract` reads the member list first and refuses the whole archive, before
writing anything, if a member

* has an absolute name (``/x``, ``\\x``, ``C:x``) or a ``..`` component;
* is not a plain file or folder: a symbolic or hard link, a device, a FIFO, an encrypted zip
  entry. Dataset archives hold none of these, and a link is unsafe even when it points inside
  the archive: the extracted tree is then moved into place (:mod:`adlab.data.convert`), which
  re-aims every relative link (``MPDD/<category>/train/good/001.png -> ../../../../../x``
  lands outside the data root once ``MPDD/`` is lifted out of its top folder);
* shares its name with another member (compared ignoring case, as macOS and Windows do), or
  lies below a member that is a file;
* makes the archive a decompression bomb (2 GiB of zeros compress to about 2 MB):
  a zip member, or the archive as a whole, is larger than :data:`RATIO_GRACE` and expands more
  than :data:`MAX_RATIO`-fold, or the members add up to more than ``max_bytes``
  (:func:`adlab.data.download.download` passes :data:`SIZE_FACTOR` times the catalogue's archive
  size, or :data:`MAX_TOTAL_BYTES` when the size is unknown).

Sizes are checked on the sizes the headers declare, member by member as the list is read (a tar
header is refused before the data behind it is decompressed). Headers can lie, so while writing
no member may write more bytes than it declared: the limits hold for what reaches the disk.
These checks are our own, the same on every Python version; where ``tarfile`` has
``data_filter`` (Python 3.12, and 3.10.12 / 3.11.4 on) it is asked too, as a second opinion.

Whatever a refused or failed extraction wrote is removed again; the archive itself is kept.
After conversion, :func:`check_no_links` makes sure the finished dataset holds no link at all.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from adlab.data.errors import DownloadError, UnsafeArchiveError
from adlab.progress import progress

__all__ = ["safe_extract", "check_no_links", "split_name", "is_absolute",
           "MAX_RATIO", "RATIO_GRACE", "MAX_TOTAL_BYTES", "SIZE_FACTOR"]

MAX_RATIO = 100               # uncompressed / compressed: PNG and JPEG images barely compress
RATIO_GRACE = 16 << 20        # up to 16 MiB a member may compress any amount (a blank BMP mask)
SIZE_FACTOR = 4               # download(): unpack at most 4x the catalogue's archive size
MAX_TOTAL_BYTES = 32 << 30    # 32 GiB when the size is unknown: 6x MVTec AD, the largest here
CHUNK = 1 << 20               # 1 MiB write chunks

# Python 3.12, 3.11.4+, 3.10.12+: tarfile's own member filter, a second opinion after ours.
_tar_data_filter = getattr(tarfile, "data_filter", None)

_SPECIAL = {stat.S_IFLNK: "symbolic link", stat.S_IFCHR: "character device",
            stat.S_IFBLK: "block device", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


@dataclass
class _Member:
    name: str                 # as stored in the archive
    kind: str                 # "file", "folder", or what it is ("symbolic link", "FIFO", ...)
    size: int                 # declared uncompressed size (0 unless a file)
    packed: int | None        # compressed size of a zip member; None in a tar (one stream)
    info: object              # the TarInfo or ZipInfo
    parts: tuple[str, ...] = ()


def is_absolute(name: str) -> bool:
    """True for ``/x``, ``\\x`` and drive-letter names such as ``C:x`` or ``C:/x``."""
    return name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) is not None


def split_name(name: str) -> list[str]:
    """Path components of an archive name; ``\\`` counts as a separator too (Windows zips)."""
    return [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]


def _tar_members(tf: tarfile.TarFile):
    for info in tf:           # lazily: each header is checked before its data is read past
        if info.isreg():
            kind = "file"
        elif info.isdir():
            kind = "folder"
        elif info.issym() or info.islnk():
            kind = f"{'symbolic' if info.issym() else 'hard'} link (-> {info.linkname!r})"
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(info.type, f"special member {info.type!r}")
        yield _Member(info.name, kind, info.size if kind == "file" else 0, None, info)


def _zip_members(zf: zipfile.ZipFile):
    for info in zf.infolist():
        fmt = stat.S_IFMT(info.external_attr >> 16)   # unix mode bits; 0 from other systems
        if info.is_dir() or fmt == stat.S_IFDIR:
            kind = "folder"
        elif info.flag_bits & 0x1:
            kind = "password-protected file"
        elif fmt in (0, stat.S_IFREG):
            kind = "file"
        else:
            kind = _SPECIAL.get(fmt, "special member")
        yield _Member(info.filename, kind, info.file_size if kind == "file" else 0,
                      info.compress_size, info)


def _refuse(archive: Path, problem: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive}: {problem}; refusing to extract it (a dataset archive holds plain files "
        f"and folders of a plausible size). Delete {archive.name} and download it again "
        "from the dataset's page.")


def _size(n: int) -> str:
    return (f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20
            else f"{n} bytes")


def _checked(members, archive: Path, max_bytes: int) -> list[_Member]:
    """All members, each checked as it is read; the first problem refuses the archive."""
    archive_bytes = archive.stat().st_size
    seen: dict[str, str] = {}             # case-folded path -> "file" | "folder"
    total, checked = 0, []
    for m in members:
        m.parts = tuple(split_name(m.name))
        if "\x00" in m.name or is_absolute(m.name) or (m.kind == "file" and not m.parts):
            raise _refuse(archive, f"the member {m.name!r} has an absolute or empty path")
        if ".." in m.parts:
            raise _refuse(archive, f"the member {m.name!r} contains '..' (path traversal)")
        if m.kind not in ("file", "folder"):
            raise _refuse(archive, f"the member {m.name!r} is a {m.kind}")
        for depth in range(1, len(m.parts) + 1):   # the member and every folder above it
            key = unicodedata.normalize("NFC", "/".join(m.parts[:depth])).casefold()
            kind, before = (m.kind if depth == len(m.parts) else "folder"), seen.get(key)
            if before is not None and "file" in (before, kind):   # folders may repeat
                raise _refuse(archive, f"the member {m.name!r} clashes with another member (the "
                                       "same name ignoring case, or a file used as a folder)")
            seen[key] = kind
        total += m.size
        if m.packed is not None and m.size > RATIO_GRACE and m.size > MAX_RATIO * m.packed:
            raise _refuse(archive, f"the member {m.name!r} expands from {_size(m.packed)} to "
                                   f"{_size(m.size)}, over {MAX_RATIO}-fold (a zip bomb?)")
        if total > max_bytes:
            raise _refuse(archive, f"its members add up to more than {_size(max_bytes)}, the "
                                   "limit for this archive (see adlab/data/archive.py)")
        if total > RATIO_GRACE and total > MAX_RATIO * archive_bytes:
            raise _refuse(archive, f"its members expand from {_size(archive_bytes)} to over "
                                   f"{_size(total)}, over {MAX_RATIO}-fold (a bomb?)")
        checked.append(m)
    return checked


def _write(open_member, members: list[_Member], dest: Path, archive: Path) -> None:
    """Create the folders and write the files, never more bytes than a header declared."""
    for m in progress(members, desc=f"extract {archive.name}", unit="file", leave=False):
        target = dest.joinpath(*m.parts)
        if m.kind == "folder":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open_member(m.info) as src, open(target, "xb") as dst:   # "x": never overwrite
            while block := src.read(CHUNK):
                written += len(block)
                if written > m.size:
                    raise _refuse(archive, f"the member {m.name!r} holds more data than the "
                                           f"{m.size} bytes its header declares")
                dst.write(block)


def _remove_written(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
    elif dest.is_dir():
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike,
                 max_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Extract a tar (plain/gz/xz/bz2) or zip archive into the new or empty folder ``dest``.

    Refuses the archive with :class:`UnsafeArchiveError` for the reasons in this module's
    docstring (``max_bytes``: the most bytes all members may add up to); a damaged archive
    or a full disk raise :class:`DownloadError`. Either way nothing written is left behind.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError(f"No archive at {archive}.")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DownloadError(f"{dest} exists and is not an empty folder; extract {archive.name} "
                            "into a new folder.")
    if zipfile.is_zipfile(archive):
        opener, lister, reader = zipfile.ZipFile, _zip_members, "open"
    elif tarfile.is_tarfile(archive):
        opener, lister, reader = (lambda p: tarfile.open(p, "r:*")), _tar_members, "extractfile"
    else:
        raise DownloadError(f"{archive} is neither a tar nor a zip archive (damaged download, "
                            "or a web page saved under the archive's name?). Delete it and "
                            "download it again.")
    created = not dest.exists()
    try:
        with opener(archive) as handle:
            members = _checked(lister(handle), archive, max_bytes)
            if lister is _tar_members and _tar_data_filter is not None:
                for m in members:
                    _tar_data_filter(m.info, str(dest))
            dest.mkdir(parents=True, exist_ok=True)
            _write(getattr(handle, reader), members, dest, archive)
    except BaseException as err:
        _remove_written(dest, created)
        if isinstance(err, getattr(tarfile, "FilterError", ())):
            raise _refuse(archive, f"tarfile's data filter objects: {err}") from err
        if isinstance(err, (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError,
                            zlib.error, NotImplementedError)):
            raise DownloadError(f"Extracting {archive} failed: {err}. The archive may be damaged "
                                "or the disk full; delete the archive and run again.") from err
        raise
    return dest


def check_no_links(folder: str | os.PathLike) -> None:
    """Refuse a dataset folder that holds a link or anything but plain files and folders.

    :func:`adlab.data.download.download` runs it on a converted dataset before moving it into
    place, and on a dataset already there: whatever a converter did, no link (symbolic, or a
    file with a second hard link) reaches the data root, where the loader would follow it.
    The caller's message says what to do.
    """
    paths = [str(folder)]
    for top, dirs, files in os.walk(folder):      # os.walk does not enter linked folders
        paths += [os.path.join(top, name) for name in dirs + files]
    for path in paths:
        mode = os.lstat(path)
        if stat.S_ISDIR(mode.st_mode) or (stat.S_ISREG(mode.st_mode) and mode.st_nlink == 1):
            continue
        what = ("a symbolic link" if stat.S_ISLNK(mode.st_mode) else
                "a hard link" if stat.S_ISREG(mode.st_mode) else "not a plain file")
        raise UnsafeArchiveError(f"{path} is {what}, but a dataset holds plain files and "
                                 "folders only.")
