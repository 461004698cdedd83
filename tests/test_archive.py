"""safe_extract against a corpus of crafted archives, directly and through the download CLI.

Every archive is built here, in a sandbox folder under tmp_path that also holds
``outside/secret.txt``. Each crafted archive must be refused with nothing written, and nothing
linked, anywhere in the sandbox: the sandbox is compared path by path (links by their target,
never followed) before and after. The bombs are 2 GiB of zeros built without ever holding them:
after a full flush, zlib compresses every further MiB of zeros to the same ~1 KB.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest

from adlab.data import archive as arc
from adlab.data.errors import DownloadError, UnsafeArchiveError

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BOMB = 2 << 30                                  # 2 GiB of zeros, as in the issue


# ----------------------------------------------------------------------------- builders
def tar_bytes(members: list[tuple], mode: str = "w:gz") -> bytes:
    """A tar from (name, type, link target); regular members hold b"pwned". ok.txt comes first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, kind, link in [("ok.txt", tarfile.REGTYPE, "")] + members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            data = b"ok" if name == "ok.txt" else b"pwned"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def zip_bytes(members: list[tuple]) -> bytes:
    """A zip from (name, data, unix mode or 0); ok.txt comes first."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")            # zipfile warns about duplicate names
        zf.writestr("ok.txt", b"ok")
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode:
                info.create_system = 3             # unix: the mode sits in external_attr
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def encrypted(data: bytes, name: bytes) -> bytes:
    """The zip ``data`` with member ``name`` marked encrypted (flag bit 0, both headers)."""
    out = bytearray(data)
    for signature, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = out.find(signature)
        while at >= 0:
            if out[at + name_at:at + name_at + len(name)] == name:
                out[at + flags_at] |= 0x1
            at = out.find(signature, at + 1)
    return bytes(out)


@functools.lru_cache(maxsize=None)
def deflated_zeros(prefix: bytes = b"", suffix: bytes = b"") -> tuple[bytes, int]:
    """Raw deflate of prefix + BOMB zeros + suffix, and the CRC-32 of that data."""
    zero, crc = bytes(MIB), zlib.crc32(prefix)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(zero) + comp.flush(zlib.Z_FULL_FLUSH)   # the same for every MiB
    for _ in range(BOMB // MIB):
        crc = zlib.crc32(zero, crc)
    tail = comp.compress(suffix) + comp.flush()
    return head + block * (BOMB // MIB) + tail, zlib.crc32(suffix, crc)


def zip_bomb() -> bytes:
    """One zip member ``zeros.bin``: 2 GiB of zeros deflated to about 2 MB (written by hand)."""
    raw, crc = deflated_zeros()
    name = b"zeros.bin"
    fields = (20, 0, 8, 0, 0x21, crc, len(raw), BOMB, len(name))  # version, flags, deflate, date
    local = struct.pack("<4s5H3LHH", b"PK\x03\x04", *fields, 0) + name
    central = struct.pack("<4sH5H3L5HLL", b"PK\x01\x02", 0x0314, *fields, 0, 0, 0, 0,
                          (stat.S_IFREG | 0o644) << 16, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central),
                      len(local) + len(raw), 0)
    return local + raw + central + end


def tar_bomb() -> bytes:
    """A tar.gz holding one member ``zeros.bin`` of 2 GiB of zeros (about 2 MB)."""
    info = tarfile.TarInfo("zeros.bin")
    info.size = BOMB
    header = info.tobuf(tarfile.PAX_FORMAT)
    raw, crc = deflated_zeros(header, bytes(2 * tarfile.BLOCKSIZE))   # + end-of-archive
    size = len(header) + BOMB + 2 * tarfile.BLOCKSIZE
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw
            + struct.pack("<LL", crc, size & 0xFFFFFFFF))


MPDD_FILES = {"bottle/train/good/000.png": b"png0", "bottle/test/good/000.png": b"png1"}
MOVED_LINK = ("top/MPDD/bottle/train/good/001.png", "../../../../../outside_root")


def corpus(outside: Path) -> dict[str, tuple[str, bytes]]:
    """case -> (archive suffix, archive bytes); every one must be refused."""
    sym, hard, reg = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.REGTYPE
    link = stat.S_IFLNK | 0o777
    mpdd = [(f"top/MPDD/{k}", v, 0) for k, v in MPDD_FILES.items()]
    return {
        "tar absolute path": (".tar.gz", tar_bytes([(str(outside / "pwned.txt"), reg, "")])),
        "tar dot-dot": (".tar.gz", tar_bytes([("../outside/pwned.txt", reg, "")])),
        "tar nested dot-dot": (".tar", tar_bytes([("a/b/../../../outside/p.txt", reg, "")], "w")),
        "tar symlink out": (".tar.gz", tar_bytes([("l", sym, "../outside"),
                                                  ("l/pwned.txt", reg, "")])),
        "tar symlink absolute": (".tar.xz", tar_bytes([("l", sym, str(outside))], "w:xz")),
        "tar symlink inside": (".tar.gz", tar_bytes([("alias", sym, "ok.txt")])),
        "tar link chain": (".tar.gz", tar_bytes([("a", sym, "."), ("b", sym, "a/../outside"),
                                                 ("b/pwned.txt", reg, "")])),
        "tar link chain a->b->c->outside": (".tar.gz", tar_bytes(
            [("c", sym, "../outside"), ("b", sym, "c"), ("a", sym, "b")])),
        "tar moved link": (".tar.gz", tar_bytes(
            [(f"top/MPDD/{k}", reg, "") for k in MPDD_FILES]
            + [(MOVED_LINK[0], sym, MOVED_LINK[1])])),
        "tar hardlink out": (".tar.gz", tar_bytes([("hl", hard, "../outside/secret.txt")])),
        "tar hardlink absolute": (".tar.gz", tar_bytes([("hl", hard,
                                                         str(outside / "secret.txt"))])),
        "tar hardlink inside": (".tar.bz2", tar_bytes([("hl", hard, "ok.txt")], "w:bz2")),
        "tar character device": (".tar.gz", tar_bytes([("dev", tarfile.CHRTYPE, "")])),
        "tar block device": (".tar.gz", tar_bytes([("blk", tarfile.BLKTYPE, "")])),
        "tar fifo": (".tar.gz", tar_bytes([("fifo", tarfile.FIFOTYPE, "")])),
        "tar duplicate name": (".tar.gz", tar_bytes([("a/x.png", reg, ""), ("a/x.png", reg, "")])),
        "tar duplicate ignoring case": (".tar.gz", tar_bytes([("a/X.png", reg, ""),
                                                              ("A/x.png", reg, "")])),
        "tar file then folder of that name": (".tar.gz", tar_bytes([("ok.txt/x", reg, "")])),
        "tar bomb": (".tar.gz", tar_bomb()),
        "zip absolute path": (".zip", zip_bytes([(str(outside / "pwned.txt"), b"pwned", 0)])),
        "zip dot-dot": (".zip", zip_bytes([("../outside/pwned.txt", b"pwned", 0)])),
        "zip backslash dot-dot": (".zip", zip_bytes([("..\\outside\\pwned.txt", b"pwned", 0)])),
        "zip drive letter": (".zip", zip_bytes([("C:/outside/pwned.txt", b"pwned", 0)])),
        "zip symlink out": (".zip", zip_bytes([("l", b"../outside", link),
                                               ("l/pwned.txt", b"pwned", 0)])),
        "zip symlink absolute": (".zip", zip_bytes([("l", str(outside).encode(), link)])),
        "zip symlink inside": (".zip", zip_bytes([("alias", b"ok.txt", link)])),
        "zip link chain a->b->c->outside": (".zip", zip_bytes(
            [("c", b"../outside", link), ("b", b"c", link), ("a", b"b", link)])),
        "zip moved link (MPDD)": (".zip", zip_bytes(mpdd + [(MOVED_LINK[0],
                                                             MOVED_LINK[1].encode(), link)])),
        "zip character device": (".zip", zip_bytes([("dev", b"", stat.S_IFCHR | 0o644)])),
        "zip fifo": (".zip", zip_bytes([("fifo", b"", stat.S_IFIFO | 0o644)])),
        "zip duplicate name": (".zip", zip_bytes([("a/x.png", b"1", 0), ("a/x.png", b"2", 0)])),
        "zip encrypted member": (".zip", encrypted(zip_bytes([("s.png", b"x", 0)]), b"s.png")),
        "zip bomb": (".zip", zip_bomb()),
    }


CASES = list(corpus(Path("/x")))


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under ``folder``: file bytes, "dir", or ("link", target); links not followed."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top, name)
            rel = path.relative_to(folder).as_posix()
            found[rel] = (("link", os.readlink(path)) if path.is_symlink() else "dir"
                          if path.is_dir() else path.read_bytes() if path.is_file() else "other")
    return found


@pytest.fixture
def sandbox(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"secret")
    return tmp_path


# ----------------------------------------------------------------------------- safe_extract
@pytest.mark.parametrize("case, tar_filter", [
    (case, tar_filter) for case in CASES for tar_filter in ("no-tar-filter", "tar-filter")
    if case.startswith("tar") or tar_filter == "no-tar-filter"])   # zips never use it
def test_crafted_archive_is_refused_with_nothing_written(sandbox, monkeypatch, case, tar_filter):
    if tar_filter == "no-tar-filter":      # as on Python 3.10.0-3.10.11 and 3.11.0-3.11.3
        monkeypatch.setattr(arc, "_tar_data_filter", None)
    suffix, data = corpus(sandbox / "outside")[case]
    archive = sandbox / f"evil{suffix}"
    archive.write_bytes(data)
    before = snapshot(sandbox)
    with pytest.raises(UnsafeArchiveError) as info:
        arc.safe_extract(archive, sandbox / "dest")
    assert snapshot(sandbox) == before               # not even ok.txt, no dest folder
    message = str(info.value)
    assert str(archive) in message and "download it again" in message and "\n" not in message


def test_the_tar_filter_is_asked_when_present(tmp_path, monkeypatch):
    calls = []

    def spy(member, dest):
        calls.append(member.name)
        return member

    monkeypatch.setattr(arc, "_tar_data_filter", spy)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes([("cat/0.png", tarfile.REGTYPE, "")], "w"))
    arc.safe_extract(archive, tmp_path / "dest")
    assert calls == ["ok.txt", "cat/0.png"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "empty-dest"])
def test_a_header_that_lies_about_its_size_is_caught_while_writing(sandbox, monkeypatch, kind,
                                                                   dest_exists):
    """The checks up front see 1 byte for zeros.bin; the bytes actually written give it away."""
    lister = f"_{kind}_members"
    real = getattr(arc, lister)

    def lying(handle):
        for member in real(handle):
            if member.name == "zeros.bin":
                member.size = 1
            yield member

    monkeypatch.setattr(arc, lister, lying)
    archive = sandbox / f"a.{kind}"
    if kind == "zip":
        archive.write_bytes(zip_bytes([("zeros.bin", bytes(4 * MIB), 0)]))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name, data in (("ok.txt", b"ok"), ("zeros.bin", bytes(4 * MIB))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    dest = sandbox / "dest"
    if dest_exists:
        dest.mkdir()
    before = snapshot(sandbox)
    with pytest.raises(UnsafeArchiveError, match="more data than the 1 bytes its header"):
        arc.safe_extract(archive, dest)
    assert snapshot(sandbox) == before               # ok.txt, written first, is gone again


def test_default_ceiling_refuses_a_declared_size_before_reading(tmp_path):
    """A plain tar whose one member declares 40 GiB (a sparse file: nothing is really stored)."""
    info = tarfile.TarInfo("huge.bin")
    info.size = 40 << 30
    archive = tmp_path / "huge.tar"
    with archive.open("wb") as f:
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.truncate(f.tell() + info.size + 2 * tarfile.BLOCKSIZE)   # ratio 1: only the cap says no
    assert arc.MAX_TOTAL_BYTES < info.size
    with pytest.raises(UnsafeArchiveError, match=r"add up to more than 32\.0 GiB"):
        arc.safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_max_bytes_counts_every_member(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes([(f"f{i}.bin", os.urandom(1000), 0) for i in range(5)]))
    with pytest.raises(UnsafeArchiveError, match="more than"):
        arc.safe_extract(archive, tmp_path / "dest", max_bytes=4000)
    assert not (tmp_path / "dest").exists()
    assert len(snapshot(arc.safe_extract(archive, tmp_path / "dest", max_bytes=5002))) == 6


def test_small_members_may_compress_well(tmp_path):
    """A blank 8 MiB mask compresses 1000-fold: under RATIO_GRACE that is no bomb."""
    archive = tmp_path / "masks.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/ground_truth/bad/000_mask.bmp", bytes(8 * MIB))
    assert zipfile.ZipFile(archive).infolist()[0].compress_size * arc.MAX_RATIO < 8 * MIB
    dest = arc.safe_extract(archive, tmp_path / "dest")
    assert (dest / "cat/ground_truth/bad/000_mask.bmp").read_bytes() == bytes(8 * MIB)


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz", "w:bz2", "zip"])
def test_plain_files_and_folders_are_extracted_byte_for_byte(tmp_path, mode):
    files = {"cat/train/good/0.png": b"a", "cat/test/good/0.png": b"b", "./cat/readme": b"c",
             "cat\\ground_truth\\bad\\0_mask.png": b"d"}
    if mode == "zip":
        data = zip_bytes([("cat/empty/", b"", 0)] + [(n, d, 0) for n, d in files.items()])
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tf:
            top = tarfile.TarInfo("./")                    # tar -C dir -c . starts so
            top.type = tarfile.DIRTYPE
            tf.addfile(top)
            for name, content in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
            folder = tarfile.TarInfo("cat/empty")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        data = buf.getvalue()
    archive = tmp_path / "a.archive"
    archive.write_bytes(data)
    dest = arc.safe_extract(archive, tmp_path / "dest")
    got = snapshot(dest)
    assert {k: v for k, v in got.items() if v != "dir"} == {
        **({"ok.txt": b"ok"} if mode == "zip" else {}),
        "cat/train/good/0.png": b"a", "cat/test/good/0.png": b"b", "cat/readme": b"c",
        "cat/ground_truth/bad/0_mask.png": b"d"}
    assert got["cat/empty"] == "dir"


def test_dest_must_be_new_or_empty(sandbox):
    dest = sandbox / "dest"
    dest.mkdir()
    os.symlink(sandbox / "outside", dest / "escape")      # planted before extraction
    archive = sandbox / "a.tar"
    archive.write_bytes(tar_bytes([("escape/pwned.txt", tarfile.REGTYPE, "")], "w"))
    before = snapshot(sandbox)
    with pytest.raises(DownloadError, match="not an empty folder"):
        arc.safe_extract(archive, dest)
    assert snapshot(sandbox) == before


def test_not_an_archive_is_a_clear_error(tmp_path):
    page = tmp_path / "btad.zip"
    page.write_bytes(b"<html>not an archive</html>")
    with pytest.raises(DownloadError, match="neither a tar nor a zip"):
        arc.safe_extract(page, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_damaged_archive_leaves_nothing(tmp_path):
    data = tar_bytes([("a.png", tarfile.REGTYPE, ""), ("b.png", tarfile.REGTYPE, "")], "w")
    archive = tmp_path / "cut.tar"
    archive.write_bytes(data[:2048 + 512 + 2])              # cut inside b.png's data
    with pytest.raises(DownloadError, match="damaged") as info:
        arc.safe_extract(archive, tmp_path / "dest")
    assert not isinstance(info.value, UnsafeArchiveError)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_check_no_links(tmp_path, kind):
    folder = tmp_path / "data" / "cat" / "train"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(b"x")
    arc.check_no_links(tmp_path / "data")                   # plain files and folders pass
    if kind == "symlink":
        os.symlink("0.png", folder / "1.png")
    elif kind == "hardlink":
        os.link(folder / "0.png", folder / "1.png")
    else:
        os.mkfifo(folder / "1.png")
    with pytest.raises(UnsafeArchiveError, match=f"{folder}/[01].png is (a|not)"):
        arc.check_no_links(tmp_path / "data")


# ----------------------------------------------------------------------------- through the CLI
# the `cli` fixture (data_scripts/download.py as a module) is in tests/conftest.py


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_every_crafted_archive(cli, sandbox, case, capsys):
    """``download.py mpdd --no-verify`` with the crafted archive saved as the manual download."""
    root = sandbox / "root"
    root.mkdir()
    (root / "MPDD.zip").write_bytes(corpus(sandbox / "outside")[case][1])
    before = snapshot(sandbox)
    assert cli.main(["mpdd", "--root", str(root), "--no-verify"]) == cli.EXIT_UNSAFE
    assert snapshot(sandbox) == before                # the archive is kept, nothing else
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "MPDD.zip" in error
    assert "download it again" in error                 # what to do, on the same line


def test_moved_link_case_as_a_command(sandbox):
    """The issue's case, run as a user would: one line on stderr, exit code 4, no link."""
    root = sandbox / "root"
    root.mkdir()
    (root / "MPDD.zip").write_bytes(corpus(sandbox / "outside")["zip moved link (MPDD)"][1])
    before = snapshot(sandbox)
    run = subprocess.run([sys.executable, str(REPO / "data_scripts" / "download.py"), "mpdd",
                          "--root", str(root), "--no-verify"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 4, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "symbolic link" in run.stderr
    assert "Traceback" not in run.stderr
    assert snapshot(sandbox) == before
