"""Download -> verify -> safe extract -> convert, against a loopback HTTP server only.

Every network access goes to 127.0.0.1 (an autouse guard fails any other connection). The
archives are built here; expected checksums come from hashlib on the served bytes, expected
layouts from the trees the tests wrote, expected masks from numpy on the source masks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
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
from adlab.data.convert import check_layout, convert_as_is
from adlab.data.mvtec import DatasetError, list_categories, load_dataset
from adlab.data.textures import texture_bank

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
    assert set(dl.CATALOGUE) == {"mvtec_ad", "visa", "mpdd", "btad", "dtd"}
    for key, entry in dl.CATALOGUE.items():
        assert entry.name == key and entry.title and entry.licence and entry.layout
        assert entry.kind == ("textures" if key == "dtd" else "anomaly")
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


def test_dtd_entry():
    entry = dl.CATALOGUE["dtd"]
    assert entry.urls == ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",)
    assert entry.sha256 == "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205"
    assert "anomalib" in entry.sha256_source
    assert entry.homepage == "https://www.robots.ox.ac.uk/~vgg/data/dtd/"
    assert len(entry.categories) == len(set(entry.categories)) == 47
    assert {"banded", "waffled", "zigzagged", "polka-dotted"} <= set(entry.categories)
    # the bomb limit (SIZE_FACTOR x size_bytes) leaves room for the ~0.64 GB of JPEGs
    assert dl.SIZE_FACTOR * entry.size_bytes > 2 * 640_000_000
    assert "textures for anomaly synthesis" in dl.describe(entry)
    with pytest.raises(ValueError, match="kind must be one of anomaly, textures"):
        dataclasses.replace(entry, kind="videos")


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


# ----------------------------------------------------------------------------- archive safety
# The crafted-archive corpus is in test_archive.py; here, what download() adds around it.
def test_download_refuses_malicious_archive_with_valid_checksum(server, tmp_path, monkeypatch):
    (tmp_path / "outside").mkdir()
    body = make_tar({**MVTEC_FILES, "../outside/pwned.txt": b"pwned"})
    patch_entry(monkeypatch, "mvtec_ad", urls=(server.add("/m.tar.xz", body),), sha256=sha(body))
    root = tmp_path / "root"
    with pytest.raises(dl.UnsafeArchiveError, match="traversal"):
        dl.download("mvtec_ad", root)
    assert not (root / "mvtec_ad").exists() and not list(root.glob(".mvtec_ad.extract-*"))
    assert tree(tmp_path / "outside") == {}


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_no_link_reaches_the_data_root_whatever_the_converter_does(tmp_path, monkeypatch, link):
    """The last check before the move: a converter that leaves a link behind is refused."""
    def convert_and_link(extracted, out):
        convert_as_is(extracted, out)
        good = out / "bottle" / "train" / "good"
        if link == "symlink":
            os.symlink("../../../../outside.png", good / "extra.png")
        else:
            os.link(good / "000.png", good / "extra.png")

    body = make_tar(MVTEC_FILES)
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(body)
    patch_entry(monkeypatch, "mvtec_ad", urls=(), sha256=sha(body), converter=convert_and_link)
    what = {"symlink": "symbolic link", "hardlink": "hard link"}[link]
    with pytest.raises(dl.UnsafeArchiveError, match=f"(extra|000).png is a {what}"):
        dl.download("mvtec_ad", tmp_path)
    assert not (tmp_path / "mvtec_ad").exists() and not list(tmp_path.glob(".mvtec_ad.extract-*"))


def test_a_dataset_already_in_place_with_a_link_is_not_used(tmp_path, monkeypatch):
    """A dataset left by an older, link-following version: found, refused, the fix named."""
    body = make_tar(MVTEC_FILES)
    patch_entry(monkeypatch, "mvtec_ad", urls=(), sha256=sha(body))
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(body)
    out = dl.download("mvtec_ad", tmp_path)
    os.symlink("../../../../../outside_root", out / "bottle" / "train" / "good" / "002.png")
    with pytest.raises(dl.UnsafeArchiveError, match=f"Delete {out} and run again"):
        dl.download("mvtec_ad", tmp_path)


def test_unpacked_size_is_bounded_by_the_catalogue_size(tmp_path, monkeypatch):
    """At most SIZE_FACTOR x the catalogue's archive size is unpacked (incompressible data)."""
    files = {**MVTEC_FILES, "bottle/train/good/big.png": os.urandom(20_000)}
    body = make_tar(files)
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(body)
    patch_entry(monkeypatch, "mvtec_ad", urls=(), sha256=sha(body), size_bytes=4_000)
    with pytest.raises(dl.UnsafeArchiveError, match="add up to more than"):
        dl.download("mvtec_ad", tmp_path)
    assert not (tmp_path / "mvtec_ad").exists() and not list(tmp_path.glob(".mvtec_ad.extract-*"))
    patch_entry(monkeypatch, "mvtec_ad", size_bytes=len(body))     # the archive's real size
    assert tree(dl.download("mvtec_ad", tmp_path)) == files


# ----------------------------------------------------------------------------- DTD (textures)
DTD_IMAGES = {
    "banded/banded_0002.jpg": image_bytes(30, "JPEG"),
    "banded/banded_0004.jpg": image_bytes(31, "JPEG"),
    "polka-dotted/polka-dotted_0121.jpg": image_bytes(32, "JPEG"),
    "zigzagged/zigzagged_0003.jpg": image_bytes(33, "JPEG"),
}
DTD_ARCHIVE = {                                   # the layout of dtd-r1.0.1.tar.gz, in small
    **{f"dtd/images/{k}": v for k, v in DTD_IMAGES.items()},
    "dtd/labels/labels_joint_anno.txt": b"banded/banded_0002.jpg banded\n",
    "dtd/labels/train1.txt": b"banded/banded_0002.jpg\n",
    "dtd/imdb/imdb.mat": b"MATLAB 5.0 MAT-file stand-in",
}


def test_dtd_tar_gz_download_verify_extract_convert(server, tmp_path, capsys):
    body = make_tar(DTD_ARCHIVE, "w:gz")
    url = server.add("/dtd-r1.0.1.tar.gz", body)
    out = dl.download("dtd", tmp_path, url_override=url, sha256=sha(body))
    assert out == tmp_path / "dtd"
    assert tree(out) == DTD_IMAGES                       # classes only; labels/ imdb/ dropped
    assert (tmp_path / "dtd-r1.0.1.tar.gz").read_bytes() == body
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".dtd.extract-*"))
    printed = capsys.readouterr().out
    assert "3 texture classes" in printed and "source='dtd'" in printed
    assert "ADLAB_DATA" not in printed                   # not an anomaly dataset to point at
    assert check_layout(out, kind="textures") == ["banded", "polka-dotted", "zigzagged"]
    # What the texture reader gets from it; the anomaly loader does not take it for a dataset.
    assert texture_bank(8, source="dtd", root=tmp_path).shape == (4, 3, 8, 8)
    with pytest.raises(DatasetError, match="No categories"):
        list_categories(out)
    with pytest.raises(DatasetError, match="train/good"):
        load_dataset("banded", "train", root=out)
    # A second run finds the textures in place and contacts nobody.
    assert dl.download("dtd", tmp_path, url_override=url, sha256=sha(body)) == out
    assert server.hits["/dtd-r1.0.1.tar.gz"] == 1


@pytest.mark.parametrize("files, complaint", [
    ({**DTD_ARCHIVE, "dtd/images/woven/README.txt": b"no images here"},
     "texture class 'woven' .* holds no images"),
    ({"dtd/labels/train1.txt": b"banded/banded_0002.jpg\n",
      "dtd/banded/banded_0002.jpg": image_bytes(1, "JPEG")},
     "does not look like DTD"),
])
def test_dtd_wrong_layout_is_refused(server, tmp_path, files, complaint):
    body = make_tar(files)
    with pytest.raises(dl.LayoutError, match=complaint):
        dl.download("dtd", tmp_path, url_override=server.add("/dtd.tar.gz", body),
                    sha256=sha(body))
    assert not (tmp_path / "dtd").exists() and not list(tmp_path.glob(".dtd.extract-*"))


def test_textures_layout_check_and_anomaly_check_differ(tmp_path):
    (tmp_path / "banded").mkdir()
    (tmp_path / "banded" / "banded_0002.jpg").write_bytes(image_bytes(1, "JPEG"))
    assert check_layout(tmp_path, ("banded",), kind="textures") == ["banded"]
    with pytest.raises(dl.LayoutError, match="train/good"):          # not an MVTec category
        check_layout(tmp_path)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_layout(tmp_path, kind="video")


def test_dtd_offline_fails_fast_with_manual_instructions(tmp_path, monkeypatch):
    """With the catalogue's own URL and no DNS (this machine): the message says what to do."""
    def no_dns(address, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_dns)
    entry = dl.CATALOGUE["dtd"]
    start = time.monotonic()
    with pytest.raises(dl.DownloadError, match="could not be resolved") as info:
        dl.download("dtd", tmp_path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "manually" in message and entry.urls[0] in message and entry.homepage in message
    assert str(tmp_path / "dtd-r1.0.1.tar.gz") in message and "run the same command" in message
    assert not (tmp_path / "dtd").exists() and not list(tmp_path.glob("*.part"))


def test_dtd_offline_then_manual_archive(tmp_path, monkeypatch):
    """A refused connection names the URL; an archive put where it says is then used."""
    url = dead_url("dtd-r1.0.1.tar.gz")
    body = make_tar(DTD_ARCHIVE)
    patch_entry(monkeypatch, "dtd", urls=(url,), sha256=sha(body))
    with pytest.raises(dl.DownloadError) as info:
        dl.download("dtd", tmp_path)
    assert url in str(info.value) and "refused" in str(info.value)
    (tmp_path / "dtd-r1.0.1.tar.gz").write_bytes(body)
    assert tree(dl.download("dtd", tmp_path)) == DTD_IMAGES


# ----------------------------------------------------------------------------- command line
# the `cli` fixture (data_scripts/download.py as a module) is in tests/conftest.py


def test_cli_exit_codes(cli, server, tmp_path, monkeypatch, capsys):
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in dl.CATALOGUE)
    assert "dtd: DTD, Describable Textures Dataset" in listed and "polka-dotted" in listed
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

    evil = make_tar({"../pwned.txt": b"pwned"})
    evil_url = server.add("/evil.zip", evil)
    assert cli.main(["mpdd", "--root", str(tmp_path / "r"), "--url", evil_url,
                     "--no-verify"]) == cli.EXIT_UNSAFE
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize("args, complaint", [
    (["--sha256", "abc"], "argument --sha256: 'abc' is not a sha256"),
    (["--sha256", "g" * 64], "is not a sha256"),
    (["--timeout", "0"], "argument --timeout: '0' is not a positive number of seconds"),
    (["--timeout", "-1"], "argument --timeout: '-1' is not a positive"),
    (["--timeout", "nan"], "argument --timeout: 'nan' is not a positive"),
    (["--root", "FILE"], "argument --root: FILE is a file, not a folder"),
])
def test_cli_argument_errors_exit_2_with_one_line(cli, tmp_path, capsys, args, complaint):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder")
    args = [str(afile) if a == "FILE" else a for a in args]
    root = ["--root", str(tmp_path / "root")] if "--root" not in args else []
    url = dead_url("btad.zip")
    assert cli.main(["btad", "--url", url, *root, *args]) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("usage: ") and ": error: " in lines[-1]
    assert complaint.replace("FILE", str(afile)) in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]    # nothing created
    assert afile.read_text() == "not a folder"


def test_download_api_refuses_a_root_that_is_a_file(tmp_path):
    afile = tmp_path / "data"
    afile.write_text("x")
    with pytest.raises(dl.DownloadError, match="is a file, not a folder"):
        dl.download("btad", afile, url_override=dead_url("btad.zip"))
    with pytest.raises(dl.DownloadError, match="Cannot create the root folder"):
        dl.download("btad", afile / "sub", url_override=dead_url("btad.zip"))
    assert afile.read_text() == "x"


def test_cli_disk_error_is_one_line(cli, tmp_path, monkeypatch, capsys):
    body = make_tar(MVTEC_FILES)
    (tmp_path / "mvtec_anomaly_detection.tar.xz").write_bytes(body)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dl.tempfile, "mkdtemp", disk_full)
    assert cli.main(["mvtec_ad", "--root", str(tmp_path), "--sha256", sha(body)]) == cli.EXIT_FAILED
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "No space left" in error
    assert (tmp_path / "mvtec_anomaly_detection.tar.xz").read_bytes() == body    # kept
