#!/usr/bin/env python
"""Write adlab's synthetic anomaly-detection dataset in the MVTec AD folder layout.

Examples::

    python data_scripts/make_synthetic.py --root data/synthetic --seed 0
    python data_scripts/make_synthetic.py --root /tmp/syn --seed 1 --size 256 --categories weave nut

The same seed and size always give byte-identical files. The notebooks do not need this
script (the quick profile generates and caches the data on first use, see
``adlab.data.synthetic.ensure_synthetic``); use it to look at the data, or to point
``ADLAB_DATA`` at a synthetic set.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from adlab.data import synthetic
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adlab.data import synthetic


def parse_args(argv=None) -> argparse.Namespace:
    kinds = ", ".join(f"{name} ({kind}: {', '.join(synthetic.DEFECTS[name])})"
                      for name, kind in synthetic.CATEGORIES.items())
    parser = argparse.ArgumentParser(
        description="Generate the synthetic anomaly-detection dataset (MVTec AD layout: "
                    "<root>/<category>/train/good, test/good, test/<defect>, "
                    "ground_truth/<defect>/<stem>_mask.png).",
        epilog=f"Categories: {kinds}.")
    parser.add_argument("--root", required=True, type=Path,
                        help="output folder: created, or replaced if it holds an earlier "
                             "synthetic set (a folder with other files is refused)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128,
                        help=f"image side in pixels, {synthetic.MIN_SIZE}..{synthetic.MAX_SIZE} "
                             "(default 128)")
    parser.add_argument("--categories", nargs="+", choices=list(synthetic.CATEGORIES),
                        metavar="NAME", help="categories to write (default: all of "
                                             f"{', '.join(synthetic.CATEGORIES)})")
    parser.add_argument("--n-train", type=int, default=synthetic.N_TRAIN,
                        help=f"good training images per category (default {synthetic.N_TRAIN})")
    parser.add_argument("--n-test-good", type=int, default=synthetic.N_TEST_GOOD,
                        help=f"good test images per category (default {synthetic.N_TEST_GOOD})")
    parser.add_argument("--n-per-defect", type=int, default=synthetic.N_PER_DEFECT,
                        help=f"test images per defect kind (default {synthetic.N_PER_DEFECT})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        root = synthetic.generate(args.root, seed=args.seed, size=args.size,
                                  categories=args.categories, n_train=args.n_train,
                                  n_test_good=args.n_test_good, n_per_defect=args.n_per_defect)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    print(f"wrote synthetic dataset (seed {args.seed}, {args.size} px) to {root.resolve()}")
    total = 0
    for category in args.categories or list(synthetic.CATEGORIES):
        folder = root / category
        n_train = len(list((folder / "train" / "good").glob("*.png")))
        n_good = len(list((folder / "test" / "good").glob("*.png")))
        defects = {d: len(list((folder / "test" / d).glob("*.png")))
                   for d in synthetic.DEFECTS[category]}
        total += n_train + n_good + sum(defects.values())
        print(f"  {category:6s} ({synthetic.CATEGORIES[category]}): train/good {n_train}, "
              f"test/good {n_good}, " + ", ".join(f"{d} {n}" for d, n in defects.items()))
    print(f"{total} images (+ masks) in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
