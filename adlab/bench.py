"""Run detectors on a dataset and print one results table (``python -m adlab bench``).

The same :func:`adlab.evaluate` the notebooks call, over every chosen method and
category: a markdown table of every metric plus fit / predict seconds, and CSV
with ``--csv``. Quick-profile numbers describe the synthetic data and small,
randomly initialised models: they are not the papers' numbers.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
import time
import traceback
from pathlib import Path

from adlab.config import profile, seed_everything

# name -> "module:Class"; each class takes no required arguments (defaults from the profile).
METHODS = {
    "naive": "adlab.embedding.naive:MeanImageDetector",
    "padim": "adlab.embedding.padim:PaDiM",
    "patchcore": "adlab.embedding.patchcore:PatchCore",
}
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
           "aupro")
TIMES = ("fit_s", "predict_s", "ms_per_image")


def make_detector(name: str):
    """Instantiate a registered detector by name."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def run(methods, categories=None, root=None, image_size=None, seed=0, progress=True) -> list[dict]:
    """Fit and evaluate each method on each category; one record per (method, category).

    A method that fails on a category gets a record with its error, and the others still run.
    """
    from adlab.data.mvtec import list_categories, load_dataset
    from adlab.detector import evaluate

    categories = list(categories or list_categories(root))
    records = []
    for category in categories:
        train = load_dataset(category, "train", root=root, image_size=image_size)
        test = load_dataset(category, "test", root=root, image_size=image_size)
        for name in methods:
            record = {"method": name, "category": category}
            try:
                seed_everything(seed)
                detector = make_detector(name)
                t0 = time.perf_counter()
                detector.fit(train)
                record["fit_s"] = time.perf_counter() - t0
                record.update(evaluate(detector, test))
                record["ms_per_image"] = 1000 * record["predict_s"] / max(len(test), 1)
            except Exception as exc:  # keep the other results; report this one
                record["error"] = f"{type(exc).__name__}: {exc}"
                if progress:
                    traceback.print_exc()
            records.append(record)
            if progress:
                print(f"  {name:>10} / {category:<12} " + (
                    record.get("error") or f"image AUROC {record['image_auroc']:.3f}"),
                    file=sys.stderr, flush=True)
    return records


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(records: list[dict], columns) -> str:
    """Records as a GitHub markdown table (NaN shown as n/a, e.g. pixel metrics without masks)."""
    if any("error" in r for r in records):
        columns = tuple(columns) + ("error",)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: str | Path, columns) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns) + ["error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adlab bench",
        description="Fit and evaluate detectors; print a markdown table of every metric.")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--categories", nargs="*", default=None,
                        help="categories to run (default: every category under the root)")
    parser.add_argument("--root", default=None,
                        help="an MVTec-layout folder (default: synthetic data in the quick "
                             "profile, $ADLAB_DATA in the paper profile)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image side (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="also write the table as CSV to this path")
    parser.add_argument("--time", action="store_true",
                        help="show only the timing columns (fit, predict, ms per image)")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    prof = profile()
    print(f"adlab bench: profile {prof.name}, methods {', '.join(methods)}", file=sys.stderr)
    records = run(methods, args.categories, args.root, args.image_size, args.seed)
    columns = ("method", "category") + ((TIMES) if args.time else METRICS + TIMES)
    print(markdown_table(records, columns))
    if prof.is_quick and args.root is None:
        print("\nQuick profile: synthetic data, random-init backbones, small images. These "
              "numbers are not comparable with the papers'.")
    if args.csv:
        write_csv(records, args.csv, ("method", "category") + METRICS + TIMES)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 1 if any("error" in r for r in records) else 0
