"""Real datasets: download, verify (sha256), extract safely, convert to the MVTec layout.

The paper profile reads real datasets in the MVTec AD folder layout (see DESIGN.md, "Data" and
:mod:`adlab.data.convert`) from ``<root>/<name>``. The pipeline is split by concern:

* :mod:`adlab.data.catalogue` — :data:`CATALOGUE`: URLs, checksums, layouts of each dataset;
* this module — the HTTP download and the sha256 check, and :func:`download` tying it together;
* :mod:`adlab.data.archive` — :func:`safe_extract`, the security-critical part: plain files and
  folders only, bounded in size (zip/tar bombs), nothing written outside the destination;
* :mod:`adlab.data.convert` — VisA and BTAD to the MVTec layout, DTD to ``<class>/*.jpg``,
  and :func:`check_layout`.

:func:`download` fetches one archive of :data:`CATALOGUE` to ``<root>/<archive filename>``,
checks its sha256, extracts it with :func:`safe_extract` into a temporary folder, converts it
(VisA, BTAD) or takes it as is (MVTec AD, MPDD), checks that no link and only the MVTec layout
is left, and only then renames the result to ``<root>/<name>``; an interrupted run never leaves
a half-built dataset behind. DTD (``kind="textures"`` in the catalogue) is not an anomaly
dataset: it goes the same way but ends as ``<root>/dtd/<class>/*.jpg``, the texture images
that anomaly synthesis pastes into normal images (:mod:`adlab.data.textures` reads them).

No archive is used unverified: a download or an archive already on disk whose sha256 differs
from the catalogue is refused (a wrong one on disk is set aside and downloaded again), and an
archive whose checksum nobody published is refused unless ``verify=False`` (``--no-verify``)
is given, after printing its sha256 so you can compare it with the publisher's.

Offline, a download fails within ``timeout`` seconds and says where to put a manually
downloaded archive; rerunning then verifies and uses it. Command line:
``python data_scripts/download.py NAME --root DIR`` (``--list`` shows the catalogue).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from adlab.data.archive import MAX_TOTAL_BYTES, SIZE_FACTOR, check_no_links, safe_extract
from adlab.data.catalogue import (CATALOGUE, DatasetEntry, archive_path, dataset_dir, describe,
                                  resolve_name)
from adlab.data.convert import check_layout
from adlab.data.errors import ChecksumError, DownloadError, LayoutError, UnsafeArchiveError
from adlab.progress import progress as progress_bar

__all__ = [
    "CATALOGUE", "DatasetEntry", "download", "safe_extract", "check_layout", "sha256_file",
    "dataset_dir", "archive_path", "resolve_name", "describe",
    "DownloadError", "ChecksumError", "UnsafeArchiveError", "LayoutError",
]

DEFAULT_TIMEOUT = 10.0          # seconds: connect and per-read socket timeout
CHUNK = 1 << 20                 # 1 MiB read/write/hash chunks
_USER_AGENT = "adlab-download/0.1 (python urllib)"


# ----------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike, progress: bool = True) -> str:
    """The sha256 hex digest of a file, read in chunks (a progress bar for large files)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle, progress_bar(total=size, unit="B", unit_scale=True,
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
        size = int(total) if total and total.isdigit() else None
        with part.open("wb") as out, progress_bar(total=size, unit="B", unit_scale=True,
                                                  unit_divisor=1024,
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
        name: a :data:`CATALOGUE` key (``mvtec_ad``, ``visa``, ``mpdd``, ``btad``; ``dtd``
            for the texture images of anomaly synthesis).
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
    expected = (sha256 or entry.sha256 or None)
    expected = expected.strip().lower() if expected else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DownloadError(f"{sha256!r} is not a sha256 (64 hex digits).")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}.")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DownloadError(f"The root {root} is a file, not a folder: give a folder for the "
                            "archive and the dataset (it is created if missing).")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"Cannot create the root folder {root}: {err}. Give a folder you "
                            "can write to.") from err
    final = root / entry.name
    if final.exists():
        try:
            check_no_links(final)
            check_layout(final, entry.categories, entry.kind)
        except (LayoutError, UnsafeArchiveError) as err:
            raise type(err)(f"{final} exists but is not a complete dataset ({err}) Delete "
                            f"{final} and run again.") from err
        print(f"{entry.title} is already at {final}.")
        return final

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
        # Bomb limit: a few times the catalogue's archive size, or the ceiling when unknown.
        limit = SIZE_FACTOR * entry.size_bytes if entry.size_bytes else MAX_TOTAL_BYTES
        extracted = safe_extract(archive, work / "extracted", max_bytes=limit)
        layout = "in the MVTec layout" if entry.kind == "anomaly" else "as <class>/ folders"
        print(f"Arranging {entry.title} {layout} ...")
        entry.converter(extracted, work / "converted")
        try:
            check_no_links(work / "converted")
        except UnsafeArchiveError as err:
            raise UnsafeArchiveError(f"{archive}, once converted: {err} Nothing was moved to "
                                     f"{final}; delete {archive.name} and download it again."
                                     ) from err
        categories = check_layout(work / "converted", entry.categories, entry.kind)
        os.replace(work / "converted", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if entry.kind == "textures":
        print(f"{entry.title}: {len(categories)} texture classes in {final}\n"
              f"Use it with:  adlab.data.textures.texture_bank(size, source='dtd', "
              f"root='{root}')")
    else:
        print(f"{entry.title}: {len(categories)} categories in {final}\n"
              f"Use it with:  export ADLAB_DATA={final}")
    return final


if __name__ == "__main__":  # pragma: no cover - the CLI lives in data_scripts/download.py
    sys.exit("Run: python data_scripts/download.py NAME --root DIR (or --list)")
