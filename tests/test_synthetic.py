"""Tests of the synthetic dataset factory (adlab.data.synthetic) and its CLI.

Small counts and 64 px keep the whole file to a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from adlab.data import synthetic as S

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_train=2, n_test_good=1, n_per_defect=2)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return S.generate(tmp_path_factory.mktemp("syn") / "a", seed=3, size=64, **TINY)


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_byte_identical_files(tiny_set, tmp_path):
    again = S.generate(tmp_path / "b", seed=3, size=64, **TINY)
    first, second = _files(tiny_set), _files(again)
    assert list(first) == list(second)
    assert all(first[k] == second[k] for k in first)


def test_different_seed_gives_different_images(tiny_set, tmp_path):
    other = _files(S.generate(tmp_path / "c", seed=4, size=64, **TINY))
    first = _files(tiny_set)
    assert list(first) == list(other)                    # same layout ...
    pngs = [k for k in first if "ground_truth" not in k]
    differing = [k for k in pngs if first[k] != other[k]]
    assert len(differing) == len(pngs)                   # ... but every image differs


def test_sample_equals_the_written_file(tiny_set):
    """``sample`` (in memory) and ``generate`` (on disk) draw the same pixels."""
    for category in S.CATEGORIES:
        defect = S.DEFECTS[category][0]
        s = S.sample(category, defect, seed=3, index=1, size=64)
        on_disk = np.asarray(Image.open(tiny_set / category / "test" / defect / "001.png"))
        mask = np.asarray(Image.open(tiny_set / category / "ground_truth" / defect / "001_mask.png"))
        np.testing.assert_array_equal(on_disk, s.image)
        np.testing.assert_array_equal(mask > 0, s.mask)
        train = S.sample(category, seed=3, index=0, size=64, split="train/good")
        np.testing.assert_array_equal(
            np.asarray(Image.open(tiny_set / category / "train" / "good" / "000.png")), train.image)


# ----------------------------------------------------------------------------- layout

def test_mvtec_layout(tiny_set):
    assert sorted(p.name for p in tiny_set.iterdir()) == sorted([S.MARKER, *S.CATEGORIES])
    for category, defects in S.DEFECTS.items():
        folder = tiny_set / category
        assert [p.name for p in (folder / "train").iterdir()] == ["good"]     # train: only good
        assert len(list((folder / "train" / "good").glob("*.png"))) == TINY["n_train"]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *defects])
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(defects)
        for path in (folder / "test" / "good").glob("*.png"):
            with Image.open(path) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
        for defect in defects:
            images = sorted((folder / "test" / defect).glob("*.png"))
            assert len(images) == TINY["n_per_defect"]
            for path in images:
                mask_path = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
                assert mask_path.exists(), mask_path
                with Image.open(path) as im, Image.open(mask_path) as mk:
                    assert im.mode == "RGB" and mk.mode == "L"
                    assert im.size == mk.size == (64, 64)
                    values = np.unique(np.asarray(mk))
                assert set(values.tolist()) <= {0, 255}, (mask_path, values)
                assert 255 in values, f"empty mask {mask_path}"


def test_categories_and_defect_kinds():
    kinds = list(S.CATEGORIES.values())
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    assert set(S.DEFECTS) == set(S.CATEGORIES)
    every = {d for ds in S.DEFECTS.values() for d in ds}
    assert every <= set(S.DEFECT_FUNCTIONS)
    assert every & {"scratch", "crack"} and every & {"hole", "chip"}
    assert {"stain", "foreign_patch"} <= every
    assert {"missing_pin", "extra_pin", "misplaced_pin"} <= set(S.DEFECTS["pins"])
    for category, defects in S.DEFECTS.items():
        assert len(defects) >= 3 and len(set(defects)) == len(defects)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("category", list(S.CATEGORIES))
def test_mask_is_where_the_drawing_changed_pixels(category):
    """Pixels outside the mask are untouched; most pixels inside it did change."""
    for defect in S.DEFECTS[category]:
        for index in range(3):
            s = S.sample(category, defect, seed=5, index=index, size=64)
            changed = (s.image != s.clean).any(-1)
            assert s.mask.any()
            assert not (changed & ~s.mask).any(), f"{category}/{defect}: change outside the mask"
            # the mask is the drawing's support (edge pixels may be only a fraction covered)
            assert changed[s.mask].mean() > 0.8, f"{category}/{defect}: mask larger than the change"


def _count_pins(image: np.ndarray) -> int:
    """Count gold blobs (R well above B) as an independent check of the pin count."""
    f = image.astype(float) / 255
    gold = (f[..., 0] - f[..., 2] > 0.25) & (f[..., 0] > 0.35)
    return ndimage.label(gold)[1]


@pytest.mark.parametrize("defect,expected", [("good", 8), ("missing_pin", 7), ("extra_pin", 9),
                                             ("misplaced_pin", 8)])
def test_logical_defects_change_the_count_or_the_place(defect, expected):
    for index in range(4):
        s = S.sample("pins", defect, seed=7, index=index, size=128)
        assert _count_pins(s.image) == expected
        if defect == "misplaced_pin":         # the mask holds two discs: the socket and the pin
            assert ndimage.label(s.mask)[1] in (1, 2)


def test_logical_defects_come_locally_odd_and_locally_plausible():
    """Both variants occur: a missing pin leaves an empty socket (dark bore pixels in the mask)
    or bare board (no dark pixel, mostly green); an extra pin lies loose (no socket-ring
    pixels around it) or sits in a socket of its own (ring-coloured pixels in its mask)."""
    kinds = {"missing_pin": set(), "extra_pin": set()}
    for defect in kinds:
        for index in range(8):
            s = S.sample("pins", defect, seed=7, index=index, size=128)
            f = s.image.astype(float)[s.mask] / 255
            dark = (f.max(-1) < 0.15).mean()
            green = (f[:, 1] - f[:, 0] > 0.1).mean()
            ring = (np.abs(f - [0.55, 0.50, 0.38]).max(-1) < 0.06).mean()
            if defect == "missing_pin":
                kinds[defect].add("empty socket" if dark > 0.05 else
                                  "bare board" if dark == 0 and green > 0.8 else "?")
            else:
                kinds[defect].add("in a socket" if ring > 0.05 else
                                  "loose" if ring == 0 else "?")
    assert kinds == {"missing_pin": {"empty socket", "bare board"},
                     "extra_pin": {"in a socket", "loose"}}


def test_size_range_and_errors():
    for size in (64, 256):
        for category in S.CATEGORIES:
            s = S.sample(category, S.DEFECTS[category][-1], seed=1, size=size)
            assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (size, size) and s.mask.any()
    for bad in (32, 63, 513, 1024, 128.0, "128", True):
        with pytest.raises(ValueError, match="64 to 512"):
            S.check_size(bad)
    with pytest.raises(ValueError, match="64 to 512"):
        S.generate("unused-folder", size=600)
    assert not Path("unused-folder").exists()
    with pytest.raises(ValueError, match="unknown synthetic categories"):
        S.generate("unused-folder", categories=["carpet"])
    with pytest.raises(ValueError, match="has no defect"):
        S.sample("nut", "missing_pin")


# ----------------------------------------------------------------------------- cache

def test_ensure_synthetic_caches_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    for name, n in (("N_TRAIN", 2), ("N_TEST_GOOD", 1), ("N_PER_DEFECT", 1)):
        monkeypatch.setattr(S, name, n)
    # a half-written folder (no marker) from an interrupted run must not be used
    stale = tmp_path / "synthetic-s2-px64"
    (stale / "weave" / "train" / "good").mkdir(parents=True)
    root = S.ensure_synthetic(seed=2, size=64)
    assert root == stale
    info = json.loads((root / S.MARKER).read_text())
    assert info["seed"] == 2 and info["size"] == 64
    assert len(list((root / "weave" / "train" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-s2-px64"]  # no temp left
    # second call: reused as is (not regenerated)
    stamp = (root / "nut" / "train" / "good" / "000.png").stat().st_mtime_ns
    os.utime(root / S.MARKER)
    assert S.ensure_synthetic(seed=2, size=64) == root
    assert (root / "nut" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    # size None follows the profile (quick: 128)
    monkeypatch.setenv("ADLAB_PROFILE", "quick")
    assert S.ensure_synthetic(seed=2).name == "synthetic-s2-px128"


def test_an_interrupted_generation_keeps_the_previous_set(tmp_path, monkeypatch):
    """Regenerating over a finished set and failing halfway leaves the old set as it was."""
    root = S.generate(tmp_path / "set", seed=3, size=64, **TINY)
    before = _files(root)
    real_save, saved = S._save_png, []

    def interrupted(array, path):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(array, path)

    monkeypatch.setattr(S, "_save_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.generate(root, seed=4, size=64, **TINY)
    assert _files(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


KILLED_FIRST_USE = """
import os, signal
from adlab.data import synthetic as S
S.N_TRAIN, S.N_TEST_GOOD, S.N_PER_DEFECT = 2, 1, 1
real_save, saved = S._save_png, []
def killed(array, path):
    if len(saved) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    saved.append(path)
    real_save(array, path)
S._save_png = killed
S.ensure_synthetic(seed=2, size=64)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_a_killed_first_use_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(REPO), ADLAB_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", KILLED_FIRST_USE], env=env, capture_output=True,
                         timeout=300)
    assert run.returncode == -9, run.stderr
    [leftover] = list(tmp_path.iterdir())                # the killed writer's temporary folder
    assert leftover.name.startswith(".synthetic-s2-px64.tmp-")
    assert not (tmp_path / "synthetic-s2-px64").exists()  # nothing under the final name
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    for name, n in (("N_TRAIN", 2), ("N_TEST_GOOD", 1), ("N_PER_DEFECT", 1)):
        monkeypatch.setattr(S, name, n)
    root = S.ensure_synthetic(seed=2, size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-s2-px64"]  # cleaned up
    assert json.loads((root / S.MARKER).read_text())["seed"] == 2


def test_generate_never_replaces_a_folder_that_is_not_ours(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not an adlab synthetic dataset.*new or empty folder"):
        S.generate(mine, size=64, categories=["nut"], **TINY)
    assert (mine / "thesis.tex").read_text() == "precious" and len(list(mine.iterdir())) == 1
    old_style = tmp_path / "old"                         # category folders only, no marker
    (old_style / "nut" / "train").mkdir(parents=True)
    S.generate(old_style, size=64, categories=["pins"], **TINY)
    assert sorted(p.name for p in old_style.iterdir()) == [S.MARKER, "pins"]


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_a_tiny_set(tmp_path):
    script = REPO / "data_scripts" / "make_synthetic.py"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(script), "--root", str(tmp_path / "out"),
                          "--seed", "1", "--size", "64", "--categories", "nut", "pins",
                          "--n-train", "2", "--n-test-good", "1", "--n-per-defect", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "nut" in run.stdout and "pins" in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [S.MARKER, "nut", "pins"]
    assert (tmp_path / "out" / "pins" / "ground_truth" / "extra_pin" / "000_mask.png").exists()
    expected = S.sample("pins", "extra_pin", seed=1, index=0, size=64).image
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "pins" / "test" / "extra_pin" / "000.png")),
        expected)


def test_cli_help_and_bad_size(tmp_path, capsys, synthetic_cli):
    cli = synthetic_cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--categories" in out and "--seed" in out and "weave" in out
    assert cli.main(["--root", str(tmp_path / "x"), "--size", "16"]) == 2
    assert "64 to 512" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["--root", str(tmp_path), "--size", "64", "--n-train", "1"]) == 2
    assert "new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
