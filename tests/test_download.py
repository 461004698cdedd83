"""Download -> verify -> safe extract -> convert, against a loopback HTTP server only.

Every network access goes to 127.0.0.1 (an autouse guard fails any other connection). The
archives are built here; expected checksums come from hashlib on the served bytes, expected
layouts from the trees the tests wrote, expected masks from numpy on the source masks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import os
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adlab.data import download as dl
from adlab.data.mvtec import load_dataset

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test if anything tries to connect anywhere but the loopback interface."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        host = address[0]
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to contact {host}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class _Server:
    """Serves ``files`` (path -> (bytes, content type)) on 127.0.0.1 and counts requests."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path not in server.files:
                    self.send_error(404, "not here")
                    return
                body, ctype = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, ctype: str = "application/octet-stream") -> str:
        self.files[path] = (body, ctype)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def dead_url(name: str = "archive.tar.gz") -> str:
    """A loopback URL on a port nobody listens on (the connection is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patch_entry(monkeypatch, name: str, **changes) -> dl.DatasetEntry:
    entry = dataclasses.replace(dl.CATALOGUE[name], **changes)
    monkeypatch.setitem(dl.CATALOGUE, name, entry)
    return entry


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def add_files(tf: tarfile.TarFile, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def make_tar(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        add_files(tf, files)
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


MVTEC_FILES = {
    "bottle/train/good/000.png": image_bytes(0),
    "bottle/train/good/001.png": image_bytes(1),
    "bottle/test/good/000.png": image_bytes(2),
    "bottle/test/broken/000.png": image_bytes(3),
    "bottle/ground_truth/broken/000_mask.png": png_bytes(np.eye(8, dtype=np.uint8) * 255),
    "grid/train/good/000.png": image_bytes(4),
    "grid/test/bent/000.png": image_bytes(5),
    "grid/ground_truth/bent/000_mask.png": png_bytes(np.eye(8, dtype=np.uint8) * 255),
    "license.txt": b"CC BY-NC-SA 4.0\n",
}


# ----------------------------------------------------------------------------- catalogue
def test_catalogue_entries_are_complete():
    assert set(dl.CATALOGUE) == {"mvtec_ad", "visa", "mpdd", "btad"}
    for key, entry in dl.CATALOGUE.items():
        assert entry.name == key and entry.title and entry.licence and entry.layout
        assert entry.categories and callable(entry.converter)
        if entry.sha256 is None:
            assert "none" in entry.sha256_source.lower()
        else:
            assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
            assert entry.sha256_source
        for url in entry.urls:
            assert url.startswith("https://") and url.rsplit("/", 1)[1] == entry.filename
        assert entry.urls or entry.homepage    # manual entries say where to go
    assert dl.CATALOGUE["mpdd"].manual and dl.CATALOGUE["mpdd"].sha256 is None
    assert dl.resolve_name("MVTec") == "mvtec_ad"
    with pytest.raises(dl.DownloadError, match="Known: mvtec_ad"):
        dl.resolve_name("imagenet")


# ----------------------------------------------------------------------------- full path
def test_mvtec_tar_gz_download_verify_extract(server, tmp_path, monkeypatch):
    body = make_tar(MVTEC_FILES, "w:gz")
    url = server.add("/mvtec_anomaly_detection.tar.xz", body)   # name as catalogued; gz inside
    patch_entry(monkeypatch, "mvtec_ad", urls=(url,), sha256=sha(body))
    out = dl.download("mvtec_ad", tmp_path)
    assert out == tmp_path / "mvtec_ad"
    assert tree(out) == MVTEC_FILES                          # moved as is, byte for byte
    assert (tmp_path / "mvtec_anomaly_detection.tar.xz").read_bytes() == body
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".mvtec_ad.extract-*"))
    assert server.hits["/mvtec_anomaly_detection.tar.xz"] == 1
    # A second run finds the dataset and contacts nobody.
    assert dl.download("mvtec_ad", tmp_path) == out
    assert server.hits["/mvtec_anomaly_detection.tar.xz"] == 1


def test_mvtec_wrapped_in_a_top_folder(server, tmp_path, monkeypatch):
    body = make_tar({f"MPDD/{k}": v for k, v in MVTEC_FILES.items()}, "w:xz")
    patch_entry(monkeypatch, "mpdd", sha256=sha(body))
    out = dl.download("mpdd", tmp_path, url_override=server.add("/MPDD.zip", body))
    assert tree(out) == MVTEC_FILES


def test_visa_zip_converted_with_split_csv(server, tmp_path, monkeypatch):
    mask_a = np.zeros((8, 8), np.uint8)
    mask_a[2:5, 3:6] = 1                         # VisA masks hold small class values
    mask_b = np.zeros((8, 8), np.uint8)
    mask_b[0, 0], mask_b[7, 1] = 3, 200
    files = {
        "candle/Data/Images/Normal/0000.JPG": image_bytes(10, "JPEG"),
        "candle/Data/Images/Normal/0001.JPG": image_bytes(11, "JPEG"),
        "candle/Data/Images/Normal/0002.JPG": image_bytes(12, "JPEG"),
        "candle/Data/Images/Anomaly/000.JPG": image_bytes(13, "JPEG"),
        "candle/Data/Masks/Anomaly/000.png": png_bytes(mask_a),
        "pcb1/Data/Images/Normal/0000.JPG": image_bytes(14, "JPEG"),
        "pcb1/Data/Images/Normal/0001.JPG": image_bytes(15, "JPEG"),
        "pcb1/Data/Images/Anomaly/007.JPG": image_bytes(16, "JPEG"),
        "pcb1/Data/Masks/Anomaly/007.png": png_bytes(mask_b),
        "split_csv/1cls.csv": (
            "object,split,label,image,mask\n"
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
            "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
            "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,"
            "candle/Data/Masks/Anomaly/000.png\n"
            "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
            "pcb1,test,normal,pcb1/Data/Images/Normal/0001.JPG,\n"
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/007.JPG,pcb1/Data/Masks/Anomaly/007.png\n"
        ).encode(),
    }
    body = make_zip(files)
    patch_entry(monkeypatch, "visa", urls=(server.add("/VisA_20220922.tar", body),),
                sha256=sha(body))
    out = dl.download("visa", tmp_path)
    got = tree(out)
    masks = {k: got.pop(k) for k in list(got) if "ground_truth" in k}
    assert got == {
        "candle/train/good/0000.JPG": files["candle/Data/Images/Normal/0000.JPG"],
        "candle/train/good/0001.JPG": files["candle/Data/Images/Normal/0001.JPG"],
        "candle/test/good/0002.JPG": files["candle/Data/Images/Normal/0002.JPG"],
        "candle/test/bad/000.JPG": files["candle/Data/Images/Anomaly/000.JPG"],
        "pcb1/train/good/0000.JPG": files["pcb1/Data/Images/Normal/0000.JPG"],
        "pcb1/test/good/0001.JPG": files["pcb1/Data/Images/Normal/0001.JPG"],
        "pcb1/test/bad/007.JPG": files["pcb1/Data/Images/Anomaly/007.JPG"],
    }
    assert sorted(masks) == ["candle/ground_truth/bad/000_mask.png",
                             "pcb1/ground_truth/bad/007_mask.png"]
    for path, source in (("candle/ground_truth/bad/000_mask.png", mask_a),
                         ("pcb1/ground_truth/bad/007_mask.png", mask_b)):
        got_mask = np.asarray(Image.open(out / path))
        np.testing.assert_array_equal(got_mask, (source > 0).astype(np.uint8) * 255)
    # The converted folder is what the package's loader reads (JPG images, PNG masks).
    test = load_dataset("candle", "test", root=out, image_size=8)
    assert sorted(zip(test.defects, test.labels.tolist())) == [("bad", 1), ("good", 0)]
    np.testing.assert_array_equal(test.masks[test.labels == 1][0].numpy(), mask_a > 0)


def test_visa_csv_path_leaving_the_dataset_is_refused(server, tmp_path, monkeypatch):
    (tmp_path / "secret.JPG").write_bytes(b"not yours")
    files = {"candle/Data/Images/Normal/0000.JPG": image_bytes(1, "JPEG"),
             "split_csv/1cls.csv": b"object,split,label,image,mask\n"
                                   b"candle,train,normal,../../secret.JPG,\n"}
    body = make_zip(files)
    patch_entry(monkeypatch, "visa", urls=(server.add("/VisA_20220922.tar", body),),
                sha256=sha(body))
    with pytest.raises(dl.LayoutError, match="leaves the dataset"):
        dl.download("visa", tmp_path / "root")
    assert (tmp_path / "secret.JPG").read_bytes() == b"not yours"
    assert not (tmp_path / "root" / "visa").exists()


def test_btad_zip_converted(server, tmp_path, monkeypatch):
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4] = 255
    mask[6, 6] = 1
    top = "BTech_Dataset_transformed"
    files = {
        f"{top}/01/train/ok/0000.bmp": image_bytes(20, "BMP"),
        f"{top}/01/test/ok/0001.bmp": image_bytes(21, "BMP"),
        f"{top}/01/test/ko/0002.bmp": image_bytes(22, "BMP"),
        f"{top}/01/ground_truth/ko/0002.png": png_bytes(mask),
        f"{top}/02/train/ok/0000.png": image_bytes(23),
        f"{top}/02/test/ok/0001.png": image_bytes(24),
        f"{top}/02/test/ko/0003.png": image_bytes(25),
        f"{top}/02/ground_truth/ko/0003.png": png_bytes(mask.T.copy()),
    }
    body = make_zip(files)
    patch_entry(monkeypatch, "btad", urls=(server.add("/btad.zip", body),), sha256=sha(body))
    out = dl.download("btad", tmp_path)
    got = tree(out)
    masks = {k: got.pop(k) for k in list(got) if "ground_truth" in k}
    assert got == {
        "01/train/good/0000.bmp": files[f"{top}/01/train/ok/0000.bmp"],
        "01/test/good/0001.bmp": files[f"{top}/01/test/ok/0001.bmp"],
        "01/test/ko/0002.bmp": files[f"{top}/01/test/ko/0002.bmp"],
        "02/train/good/0000.png": files[f"{top}/02/train/ok/0000.png"],
        "02/test/good/0001.png": files[f"{top}/02/test/ok/0001.png"],
        "02/test/ko/0003.png": files[f"{top}/02/test/ko/0003.png"],
    }
    assert sorted(masks) == ["01/ground_truth/ko/0002_mask.png", "02/ground_truth/ko/0003_mask.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "01/ground_truth/ko/0002_mask.png")),
                                  (mask > 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "02/ground_truth/ko/0003_mask.png")),
                                  (mask.T > 0).astype(np.uint8) * 255)
    test = load_dataset("01", "test", root=out, image_size=8)       # .bmp images load too
    assert sorted(zip(test.defects, test.labels.tolist())) == [("good", 0), ("ko", 1)]
    np.testing.assert_array_equal(test.masks[test.labels == 1][0].numpy(), mask > 0)


def test_layout_without_train_good_is_refused(server, tmp_path, monkeypatch):
    body = make_tar({"bottle/train/good/000.png": image_bytes(0),
                     "bottle/test/good/000.png": image_bytes(1),
                     "cable/test/good/000.png": image_bytes(2),
                     "cable/train/bad/000.png": image_bytes(3)})
    patch_entry(monkeypatch, "mvtec_ad", urls=(server.add("/m.tar.xz", body),), sha256=sha(body))
    with pytest.raises(dl.LayoutError, match="'cable'.*train/good"):
        dl.download("mvtec_ad", tmp_path)
    assert not (tmp_path / "mvtec_ad").exists()
    assert not list(tmp_path.glob(".mvtec_ad.extract-*"))


# ----------------------------------------------------------------------------- checksums
def test_wrong_checksum_of_download_is_refused(server, tmp_path, monkeypatch):
    body = make_tar(MVTEC_FILES)
    patch_entry(monkeypatch, "mvtec_ad", urls=(server.add("/m.tar.xz", body),),
                sha256=sha(b"some other archive"))
    with pytest.raises(dl.ChecksumError) as info:
        dl.download("mvtec_ad", tmp_path)
    assert sha(body) in str(info.value) and sha(b"some other archive") in str(info.value)
    assert not (tmp_path / "mvtec_ad").exists()
    assert not (tmp_path / "mvtec_anomaly_detection.tar.xz").exists()   # not kept as if good
    assert not list(tmp_path.glob("*.part"))


def test_wrong_archive_on_disk_is_replaced_by_a_fresh_download(server, tmp_path, monkeypatch):
    body = make_tar(MVTEC_FILES)
    patch_entry(monkeypatch, "mvtec_ad", urls=(server.add("/m.tar.xz", body),), sha256=sha(body))
    bad = make_tar({"bottle/train/good/evil.png": b"x", "bottle/test/good/1.png": b"y"})
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(bad)
    out = dl.download("mvtec_ad", tmp_path)
    assert server.hits["/m.tar.xz"] == 1
    assert tree(out) == MVTEC_FILES                  # the bad archive's content was never used
    assert (tmp_path / "mvtec_anomaly_detection.tar.xz").read_bytes() == body
    assert (tmp_path / "mvtec_anomaly_detection.tar.xz.corrupt").read_bytes() == bad


def test_wrong_archive_on_disk_is_refused_when_it_cannot_be_replaced(tmp_path, monkeypatch):
    body = make_tar(MVTEC_FILES)
    bad = make_tar({"bottle/train/good/evil.png": b"x", "bottle/test/good/1.png": b"y"})
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(bad)
    patch_entry(monkeypatch, "mvtec_ad", urls=(dead_url(),), sha256=sha(body))
    with pytest.raises(dl.DownloadError, match="manually"):
        dl.download("mvtec_ad", tmp_path)
    assert not (tmp_path / "mvtec_ad").exists()
    # A manual-only dataset cannot be re-downloaded: a wrong archive is refused outright.
    (tmp_path / "MPDD.zip").write_bytes(bad)
    with pytest.raises(dl.ChecksumError, match="mismatch"):
        dl.download("mpdd", tmp_path, sha256=sha(body))
    assert not (tmp_path / "mpdd").exists()


def test_unknown_checksum_needs_no_verify(server, tmp_path, monkeypatch, capsys):
    body = make_tar({f"MPDD/{k}": v for k, v in MVTEC_FILES.items()})
    url = server.add("/MPDD.zip", body)
    with pytest.raises(dl.ChecksumError, match="--no-verify") as info:
        dl.download("mpdd", tmp_path, url_override=url)
    assert sha(body) in str(info.value)                    # printed for the user to compare
    assert not (tmp_path / "mpdd").exists()
    assert (tmp_path / "MPDD.zip").read_bytes() == body     # kept: the rerun needs no download
    out = dl.download("mpdd", tmp_path, url_override=url, verify=False)
    assert sha(body) in capsys.readouterr().out
    assert tree(out) == MVTEC_FILES and server.hits["/MPDD.zip"] == 1


# ----------------------------------------------------------------------------- offline
def test_offline_refused_port_fails_fast_with_manual_instructions(tmp_path, monkeypatch):
    url = dead_url("mvtec_anomaly_detection.tar.xz")
    patch_entry(monkeypatch, "mvtec_ad", urls=(url,))
    start = time.monotonic()
    with pytest.raises(dl.DownloadError) as info:
        dl.download("mvtec_ad", tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "manually" in message and url in message
    assert str(tmp_path / "mvtec_anomaly_detection.tar.xz") in message
    assert not list(tmp_path.glob("*.part"))
    # Following the instructions: put the archive there and run again, still offline.
    body = make_tar(MVTEC_FILES)
    patch_entry(monkeypatch, "mvtec_ad", urls=(url,), sha256=sha(body))
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(body)
    assert tree(dl.download("mvtec_ad", tmp_path)) == MVTEC_FILES


def test_offline_silent_server_times_out_fast(tmp_path, monkeypatch):
    with socket.socket() as silent:               # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/btad.zip"
        start = time.monotonic()
        with pytest.raises(dl.DownloadError, match="timed out") as info:
            dl.download("btad", tmp_path, url_override=url, timeout=0.5)
        assert time.monotonic() - start < 5
    assert str(tmp_path / "btad.zip") in str(info.value)


def test_dns_failure_is_reported_as_offline(tmp_path, monkeypatch):
    def no_dns(address, *args, **kwargs):        # what create_connection raises without DNS
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    url = "http://datasets.example.invalid/VisA_20220922.tar"
    start = time.monotonic()
    with pytest.raises(dl.DownloadError, match="could not be resolved") as info:
        dl.download("visa", tmp_path, url_override=url)
    assert time.monotonic() - start < 5
    assert url in str(info.value) and str(tmp_path / "VisA_20220922.tar") in str(info.value)


def test_http_error_and_web_page_are_refused(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download("btad", tmp_path, url_override=server.url("/missing.zip"))
    page = server.add("/share", b"<html>Sign in to download</html>", "text/html; charset=utf-8")
    with pytest.raises(dl.DownloadError, match="web page"):
        dl.download("btad", tmp_path, url_override=page)
    assert not (tmp_path / "btad.zip").exists() and not list(tmp_path.glob("*.part"))


# ----------------------------------------------------------------------------- safe_extract
def _tar_with(members: list[tarfile.TarInfo], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        ok = tarfile.TarInfo("ok.txt")             # a harmless member first: must not appear
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        for info in members:
            data = b"pwned" if info.isreg() else None
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def _malicious_tars(outside: Path) -> dict[str, list[tarfile.TarInfo]]:
    return {
        "absolute path": [_info(str(outside / "pwned.txt"))],
        "dot-dot traversal": [_info("../outside/pwned.txt")],
        "nested traversal": [_info("a/b/../../../outside/pwned.txt")],
        "symlink absolute outside": [_info("link", tarfile.SYMTYPE, str(outside)),
                                     _info("link/pwned.txt")],
        "symlink relative outside": [_info("link", tarfile.SYMTYPE, "../outside"),
                                     _info("link/pwned.txt")],
        "symlink chain outside": [_info("a", tarfile.SYMTYPE, "."),
                                  _info("b", tarfile.SYMTYPE, "a/../outside"),
                                  _info("b/pwned.txt")],
        "hardlink absolute outside": [_info("hl", tarfile.LNKTYPE, str(outside / "secret.txt"))],
        "hardlink relative outside": [_info("hl", tarfile.LNKTYPE, "../outside/secret.txt")],
        "character device": [_info("dev", tarfile.CHRTYPE)],
        "block device": [_info("blk", tarfile.BLKTYPE)],
        "fifo": [_info("fifo", tarfile.FIFOTYPE)],
    }


@pytest.fixture
def sandbox(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    return tmp_path, outside


@pytest.mark.parametrize("use_filter", [True, False], ids=["tar-filter", "no-tar-filter"])
@pytest.mark.parametrize("case", list(_malicious_tars(Path("/x"))))
def test_malicious_tar_is_refused_before_writing(sandbox, monkeypatch, case, use_filter):
    tmp_path, outside = sandbox
    monkeypatch.setattr(dl, "_TAR_HAS_FILTER", use_filter and dl._TAR_HAS_FILTER)
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_with(_malicious_tars(outside)[case], "w:gz"))
    dest = tmp_path / "dest"
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(archive, dest)
    assert not dest.exists()                         # not even the harmless ok.txt
    assert tree(outside) == {"secret.txt": b"secret"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "outside"]


def _zip_with(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode:
                info.create_system = 3              # unix: mode bits in external_attr
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _malicious_zips(outside: Path) -> dict[str, list[tuple[str, bytes, int]]]:
    return {
        "absolute path": [(str(outside / "pwned.txt"), b"pwned", 0)],
        "dot-dot traversal": [("../outside/pwned.txt", b"pwned", 0)],
        "backslash traversal": [("..\\outside\\pwned.txt", b"pwned", 0)],
        "drive letter": [("C:/outside/pwned.txt", b"pwned", 0)],
        "symlink absolute outside": [("link", str(outside).encode(), stat.S_IFLNK | 0o777),
                                     ("link/pwned.txt", b"pwned", 0)],
        "symlink relative outside": [("link", b"../outside", stat.S_IFLNK | 0o777),
                                     ("link/pwned.txt", b"pwned", 0)],
        "character device": [("dev", b"", stat.S_IFCHR | 0o644)],
        "fifo": [("fifo", b"", stat.S_IFIFO | 0o644)],
    }


@pytest.mark.parametrize("case", list(_malicious_zips(Path("/x"))))
def test_malicious_zip_is_refused_before_writing(sandbox, case):
    tmp_path, outside = sandbox
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_with(_malicious_zips(outside)[case]))
    dest = tmp_path / "dest"
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(archive, dest)
    assert not dest.exists()
    assert tree(outside) == {"secret.txt": b"secret"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "outside"]


@pytest.mark.parametrize("use_filter", [True, False], ids=["tar-filter", "no-tar-filter"])
def test_existing_symlink_in_dest_is_not_followed_outside(sandbox, monkeypatch, use_filter):
    tmp_path, outside = sandbox
    monkeypatch.setattr(dl, "_TAR_HAS_FILTER", use_filter and dl._TAR_HAS_FILTER)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "escape")             # planted before extraction
    archive = tmp_path / "a.tar"
    archive.write_bytes(make_tar({"escape/pwned.txt": b"pwned"}, "w"))
    with pytest.raises(dl.UnsafeArchiveError, match="outside"):
        dl.safe_extract(archive, dest)
    assert tree(outside) == {"secret.txt": b"secret"}
    assert sorted(p.name for p in dest.iterdir()) == ["escape"]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz", "w:bz2", "zip"])
def test_safe_extract_formats_and_links_inside(tmp_path, mode):
    files = {"cat/train/good/0.png": b"a", "cat/test/good/0.png": b"b", "./cat/readme": b"c"}
    if mode == "zip":
        archive = tmp_path / "a.zip"
        archive.write_bytes(_zip_with([(n, d, 0) for n, d in files.items()]
                                      + [("cat/alias", b"train/good/0.png", stat.S_IFLNK | 0o777)]))
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            add_files(tf, files)
            tf.addfile(_info("cat/alias", tarfile.SYMTYPE, "train/good/0.png"))
            tf.addfile(_info("cat/hard", tarfile.LNKTYPE, "cat/test/good/0.png"))
        archive = tmp_path / "a.tar"
        archive.write_bytes(buf.getvalue())
    dest = dl.safe_extract(archive, tmp_path / "dest")
    assert (dest / "cat/train/good/0.png").read_bytes() == b"a"
    assert (dest / "cat/readme").read_bytes() == b"c"
    assert (dest / "cat/alias").is_symlink()
    assert os.readlink(dest / "cat/alias") == "train/good/0.png"
    assert (dest / "cat/alias").read_bytes() == b"a"
    if mode != "zip":
        assert (dest / "cat/hard").read_bytes() == b"b"
        assert os.path.samefile(dest / "cat/hard", dest / "cat/test/good/0.png")


def test_not_an_archive_is_a_clear_error(tmp_path):
    page = tmp_path / "btad.zip"
    page.write_bytes(b"<html>not an archive</html>")
    with pytest.raises(dl.DownloadError, match="neither a tar nor a zip"):
        dl.safe_extract(page, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_download_refuses_malicious_archive_with_valid_checksum(server, sandbox, monkeypatch):
    tmp_path, outside = sandbox
    body = _tar_with(_malicious_tars(outside)["dot-dot traversal"], "w:gz")
    patch_entry(monkeypatch, "mvtec_ad", urls=(server.add("/m.tar.xz", body),), sha256=sha(body))
    root = tmp_path / "root"
    with pytest.raises(dl.UnsafeArchiveError, match="traversal"):
        dl.download("mvtec_ad", root)
    assert not (root / "mvtec_ad").exists() and not list(root.glob(".mvtec_ad.extract-*"))
    assert tree(outside) == {"secret.txt": b"secret"}


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("adlab_download_cli",
                                                  REPO / "data_scripts" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_codes(cli, server, tmp_path, monkeypatch, capsys):
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in dl.CATALOGUE)
    assert cli.main(["imagenet", "--root", str(tmp_path)]) == cli.EXIT_USAGE
    assert cli.main(["btad"]) == cli.EXIT_USAGE                      # --root missing
    url = dead_url("btad.zip")
    assert cli.main(["btad", "--root", str(tmp_path), "--url", url]) == cli.EXIT_FAILED
    assert str(tmp_path / "btad.zip") in capsys.readouterr().err

    body = make_tar(MVTEC_FILES)
    good_url = server.add("/m.tar.xz", body)
    assert cli.main(["mvtec_ad", "--root", str(tmp_path), "--url", good_url,
                     "--sha256", sha(b"other")]) == cli.EXIT_CHECKSUM
    assert cli.main(["mvtec_ad", "--root", str(tmp_path), "--url", good_url,
                     "--sha256", sha(body)]) == cli.EXIT_OK
    assert tree(tmp_path / "mvtec_ad") == MVTEC_FILES

    evil = _tar_with([_info("../pwned.txt")])
    evil_url = server.add("/evil.zip", evil)
    assert cli.main(["mpdd", "--root", str(tmp_path / "r"), "--url", evil_url,
                     "--no-verify"]) == cli.EXIT_UNSAFE
    assert not (tmp_path / "pwned.txt").exists()
