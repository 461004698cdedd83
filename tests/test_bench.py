"""The benchmark command end to end on a tiny synthetic set (naive detector, so it is fast)."""
import csv
import math

import numpy as np
import pytest

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
