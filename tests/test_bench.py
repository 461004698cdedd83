"""The benchmark command end to end on tiny folders (naive detector, so it is fast): results,
and every way a user can get the arguments or the dataset wrong (exit 2, one line)."""
import csv
import math

import numpy as np
import pytest
from PIL import Image

from adlab import __main__ as cli
from adlab import bench
from adlab.data.synthetic import generate


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, size=64, categories=["weave"], n_train=8, n_test_good=4, n_per_defect=2)
    return root


def test_bench_prints_a_table_and_writes_csv(tiny_root, tmp_path, capsys):
    out_csv = tmp_path / "r.csv"
    code = cli.main(["bench", "--methods", "naive", "--root", str(tiny_root), "--image-size", "64",
                     "--csv", str(out_csv)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| method | category | image_auroc" in table and "| naive | weave |" in table
    rows = list(csv.DictReader(open(out_csv)))
    assert [(r["method"], r["category"]) for r in rows] == [("naive", "weave")]
    auroc = float(rows[0]["image_auroc"])
    assert 0.0 <= auroc <= 1.0 and math.isfinite(float(rows[0]["aupro"]))


def test_bench_records_match_evaluate(tiny_root):
    from adlab import evaluate
    from adlab.data.mvtec import load_dataset

    [record] = bench.run(["naive"], ["weave"], root=tiny_root, image_size=64, progress=False)
    det = bench.make_detector("naive").fit(load_dataset("weave", "train", root=tiny_root, image_size=64))
    again = evaluate(det, load_dataset("weave", "test", root=tiny_root, image_size=64))
    assert np.isclose(record["image_auroc"], again["image_auroc"])


def test_a_failing_method_is_reported_and_the_rest_kept(tiny_root, monkeypatch):
    monkeypatch.setitem(bench.METHODS, "broken", "adlab.bench:NoSuchDetector")
    records = bench.run(["broken", "naive"], ["weave"], root=tiny_root, image_size=64, progress=False)
    assert "error" in records[0] and "image_auroc" in records[1]
    table = bench.markdown_table(records, ("method", "category") + bench.METRICS)
    assert "AttributeError" in table and "| naive | weave |" in table


def test_unknown_method_is_explained(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "nope"])
    assert "choose from" in capsys.readouterr().err


def test_bench_on_a_real_style_folder_with_mixed_sizes_grayscale_and_no_masks(tmp_path, capsys):
    """Real folders: images of varying sizes, grayscale ones, and no ground_truth/ at all."""
    from PIL import Image

    rng = np.random.default_rng(0)
    cat = tmp_path / "widget"
    for split, n in [("train/good", 6), ("test/good", 3), ("test/dent", 3)]:
        (cat / split).mkdir(parents=True)
        for i in range(n):
            h, w = [(70, 90), (64, 64), (100, 80)][i % 3]
            pixels = rng.integers(90, 110, (h, w), dtype=np.uint8)
            if split == "test/dent":
                pixels[h // 3:h // 2, w // 3:w // 2] = 250
            img = Image.fromarray(pixels)  # grayscale, converted to RGB by the loader
            (img if i % 2 else img.convert("RGB")).save(cat / split / f"{i:03d}.png")
    code = cli.main(["bench", "--methods", "naive", "--root", str(tmp_path), "--image-size", "64"])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| naive | widget |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert code == 0
    assert float(cells[2]) > 0.9                      # image AUROC: the bright dent is found
    assert cells[5] == "n/a" and cells[8] == "n/a"    # pixel AUROC and AUPRO: no masks


# ----------------------------------------------------------------------------- bad input

def _category(root, name, n_train=4, n_good=2, n_defect=2, size=16):
    """A tiny MVTec-layout category: gray images, one bright square per defect, its mask."""
    folder = root / name
    for split in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (folder / split).mkdir(parents=True)
    for i in range(n_train):
        Image.new("RGB", (size, size), (100 + i, 100, 100)).save(folder / f"train/good/{i:03d}.png")
    for i in range(n_good):
        Image.new("RGB", (size, size), (101, 100, 100)).save(folder / f"test/good/{i:03d}.png")
    for i in range(n_defect):
        image, mask = Image.new("RGB", (size, size), (100, 100, 100)), Image.new("L", (size, size))
        image.paste((250, 250, 250), (4, 4, 9, 9))
        mask.paste(255, (4, 4, 9, 9))
        image.save(folder / f"test/dent/{i:03d}.png")
        mask.save(folder / f"ground_truth/dent/{i:03d}_mask.png")
    return folder


def _bench(capsys, *args):
    code = cli.main(["bench", "--methods", "naive", "--image-size", "16", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAK = {  # case -> (how to break category "bad", a string the error line must name)
    "missing mask": (lambda f: (f / "ground_truth/dent/001_mask.png").unlink(), "001_mask.png"),
    "truncated image": (lambda f: _truncate(f / "test/good/000.png"), "test/good/000.png"),
    "unreadable image": (lambda f: (f / "train/good/002.png").write_bytes(b"not a png"),
                         "train/good/002.png"),
    "mask of another size": (lambda f: Image.new("L", (8, 8)).save(
        f / "ground_truth/dent/000_mask.png"), "ground_truth/dent/000_mask.png"),
    "empty train/good": (lambda f: [p.unlink() for p in (f / "train/good").iterdir()],
                         "bad/train/good"),
}


@pytest.mark.parametrize("case", BREAK)
def test_a_broken_category_is_one_line_and_the_others_are_kept(case, tmp_path, capsys):
    root = tmp_path / "data"
    _category(root, "apple")
    _category(root, "bad")
    _category(root, "zebra")
    breaker, named = BREAK[case]
    breaker(root / "bad")
    out_csv = tmp_path / "r.csv"
    code, out, err = _bench(capsys, "--root", root, "--csv", out_csv)
    assert code == 2
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert named in line and str(root / "bad") in line
    rows = list(csv.DictReader(open(out_csv)))
    assert [(r["category"], bool(r["error"])) for r in rows] == [
        ("apple", False), ("bad", True), ("zebra", False)]
    assert float(rows[2]["image_auroc"]) > 0.9 and "| naive | zebra | 1.000" in out


def test_debug_shows_the_traceback(tmp_path, capsys):
    _category(tmp_path, "bad")
    (tmp_path / "bad/ground_truth/dent/000_mask.png").unlink()
    code, _, err = _bench(capsys, "--root", tmp_path, "--debug")
    assert code == 2 and "Traceback" in err and "DatasetError" in err


@pytest.mark.parametrize("case", ["root is a file", "empty root", "category folder as root",
                                  "category not found"])
def test_root_and_category_errors_are_one_line(case, tmp_path, capsys):
    _category(tmp_path / "data", "apple")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    args, named = {
        "root is a file": (["--root", tmp_path / "notes.txt"], "is a file"),
        "empty root": (["--root", tmp_path / "empty"], "No categories under"),
        "category folder as root": (["--root", tmp_path / "data" / "apple"],
                                    f"parent {tmp_path / 'data'} as the root"),
        "category not found": (["--root", tmp_path / "data", "--categories", "pear"],
                               "Category 'pear' not found"),
    }[case]
    code, out, err = _bench(capsys, *args)
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert named in line


def test_rows_reach_the_csv_as_they_finish(tmp_path, capsys, monkeypatch):
    """A crash (here Ctrl-C) in the second category keeps the first row in the CSV."""
    for name in ("apple", "pear"):
        _category(tmp_path / "data", name)
    real = bench.make_detector

    class Interrupted:
        def fit(self, train):
            raise KeyboardInterrupt

    def make_detector(name):
        made.append(name)
        return real(name) if len(made) == 1 else Interrupted()

    made = []
    monkeypatch.setattr(bench, "make_detector", make_detector)
    out_csv = tmp_path / "r.csv"  # a table from an earlier run: kept, appended to
    out_csv.write_text(",".join(("method", "category") + bench.METRICS + bench.TIMES)
                       + ",error\nnaive,earlier,0.5\n")
    code, out, _ = _bench(capsys, "--root", tmp_path / "data", "--csv", out_csv)
    assert code == 130 and "| naive | apple |" in out
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["category"] for r in rows] == ["earlier", "apple"]  # appended, header kept once


def test_a_bug_in_a_method_shows_its_traceback_and_exits_1(tiny_root, capsys, monkeypatch):
    monkeypatch.setitem(bench.METHODS, "broken", "adlab.bench:NoSuchDetector")
    code = cli.main(["bench", "--methods", "broken,naive", "--root", str(tiny_root),
                     "--image-size", "64"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" in err and "| naive | weave |" in out


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "positive"),
    (["--image-size", "-3"], "positive"),
    (["--image-size", "big"], "whole number"),
    (["--methods", ","], "names no method; choose from naive, padim, patchcore"),
    (["--methods", "naive,nope"], "unknown method(s) nope; choose from naive, padim"),
])
def test_argument_errors_exit_2_argparse_style(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m adlab bench") and message in err


def test_csv_naming_a_folder_is_an_argument_error(tmp_path, tiny_root, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--root", str(tiny_root), "--csv", str(tmp_path)])
    assert info.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_unwritable_cache_names_the_variable(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("ADLAB_PROFILE", "quick")
    monkeypatch.setenv("ADLAB_CACHE", str(blocker / "cache"))  # cannot be created
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--methods", "naive"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "not writable" in err and "Set ADLAB_CACHE" in err


def test_paper_profile_without_adlab_data_or_with_a_bad_profile(monkeypatch, capsys):
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    monkeypatch.delenv("ADLAB_DATA", raising=False)
    code, _, err = _bench(capsys)
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "ADLAB_DATA" in line and "download.py" in line
    monkeypatch.setenv("ADLAB_PROFILE", "fast")
    with pytest.raises(SystemExit) as info:
        _bench(capsys)
    assert info.value.code == 2 and "quick, paper" in capsys.readouterr().err
