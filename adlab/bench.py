"""Run detectors on a dataset and print one results table (``python -m adlab bench``).

The same :func:`adlab.evaluate` the notebooks call, over every chosen method and
category: a markdown table of every metric plus fit / predict seconds, printed row by
row as each run finishes and appended to a CSV file with ``--csv``, so a failure or
Ctrl-C never loses the rows already computed. A category whose files are broken gets
an error row and the others still run. Quick-profile numbers describe the synthetic
data and small, randomly initialised models: they are not the papers' numbers.

``--checkpoint FILE...`` evaluates detectors saved by ``python -m adlab train`` instead of
fitting: the method, the category and the image size come from each file.

Exit codes: 0 every run finished; 2 bad arguments or dataset files (one line says which
file and what to do; ``--debug`` adds the traceback); 1 a method raised something else
(a bug: its traceback is printed); 130 interrupted.
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
from adlab.data.mvtec import DatasetError

# name -> "module:Class"; each class takes no required arguments (defaults from the profile).
METHODS = {
    "naive": "adlab.embedding.naive:MeanImageDetector",
    "padim": "adlab.embedding.padim:PaDiM",
    "patchcore": "adlab.embedding.patchcore:PatchCore",
    "cflow": "adlab.flows.cflow:CFlow",
    "pyramidflow": "adlab.flows.pyramidflow:PyramidFlow",
    "fastflow": "adlab.flows.fastflow:FastFlow",
    "csflow": "adlab.flows.csflow:CSFlow",
    "differnet": "adlab.flows.differnet:DifferNet",
    "efficientad_s": "adlab.distill.efficientad:EfficientAD",
    "efficientad_m": "adlab.distill.efficientad:EfficientADMedium",
    "intra": "adlab.inpaint.intra:InTra",
    "autoencoder": "adlab.inpaint.autoencoder:ConvAutoencoder",   # InTra's baseline
    "ddim_recon": "adlab.diffusion.reconstruct:DiffusionReconstruction",
    "glad": "adlab.diffusion.glad:GLAD",
    "tdad": "adlab.diffusion.tdad:TDAD",
}
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
           "aupro")
TIMES = ("fit_s", "predict_s", "ms_per_image")


def detector_class(name: str):
    """The class of a registered detector."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_detector(name: str):
    """Instantiate a registered detector by name."""
    return detector_class(name)()


def run(methods, categories=None, root=None, image_size=None, seed=0, progress=True,
        on_record=None, debug=False) -> list[dict]:
    """Fit and evaluate each method on each category; one record per (method, category).

    A category whose files are broken, or a method that fails, gets a record with its
    ``error`` and the others still run. ``on_record(record)`` is called as each record is
    finished (the CLI prints it and appends it to the CSV, so nothing done is lost). A
    failed record has ``error`` (its message) and ``user_error`` (True for a
    :class:`DatasetError`, which the user can fix; False for anything else, a bug). With
    ``progress``, errors are reported on stderr: one line for a DatasetError (its traceback
    too with ``debug``), the traceback for anything else.
    """
    from adlab.data.mvtec import list_categories, load_dataset
    from adlab.detector import evaluate

    categories = list(categories or list_categories(root))
    records = []

    def finish(record):
        records.append(record)
        if on_record is not None:
            on_record(record)

    for category in categories:
        try:
            train = load_dataset(category, "train", root=root, image_size=image_size)
            test = load_dataset(category, "test", root=root, image_size=image_size)
        except Exception as exc:  # this category cannot run; the others still can
            _report(exc, f"{category}: ", progress, debug)
            for name in methods:
                finish({"method": name, "category": category, **_failure(exc)})
            continue
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
                _report(exc, f"{name} / {category}: ", progress, debug)
                record.update(_failure(exc))
            finish(record)
    return records


def run_checkpoints(paths, root=None, progress=True, on_record=None, debug=False) -> list[dict]:
    """Evaluate saved detectors (``python -m adlab train --out``): one record per file.

    Each file names its method, category and image size; the test set of that category is
    loaded from ``root`` at that size. Errors are recorded and reported as in :func:`run`.
    """
    from adlab.data.mvtec import load_dataset
    from adlab.detector import evaluate, load_detector

    records = []
    for path in paths:
        record = {"method": "?", "category": "?", "checkpoint": str(path)}
        try:
            detector = load_detector(path)
            info = detector.info
            record.update(method=info["method"], category=info.get("category", "?"))
            if "category" not in info:
                raise DatasetError(f"{path} records no category (it was not written by "
                                   "`python -m adlab train`); evaluate it with adlab.evaluate.")
            test = load_dataset(info["category"], "test", root=root,
                                image_size=info.get("image_size"))
            record.update(evaluate(detector, test))
            record["ms_per_image"] = 1000 * record["predict_s"] / max(len(test), 1)
        except Exception as exc:  # keep the other files' results; report this one
            _report(exc, f"{path}: ", progress, debug)
            record.update(_failure(exc))
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records


def _describe(exc: Exception) -> str:
    """The error column: the message alone for a DatasetError, else the type and message."""
    return str(exc) if _user_error(exc) else f"{type(exc).__name__}: {exc}"


def _user_error(exc: Exception) -> bool:
    from adlab.detector import DetectorFileError

    return isinstance(exc, (DatasetError, DetectorFileError))


def _failure(exc: Exception) -> dict:
    return {"error": _describe(exc), "user_error": _user_error(exc)}


def _report(exc: Exception, where: str, progress: bool, debug: bool = False) -> None:
    if not progress:
        return
    if debug or not _user_error(exc):
        traceback.print_exception(exc)
    print(f"error: {where}{_describe(exc)}", file=sys.stderr, flush=True)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_header(columns) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(record: dict, columns) -> str:
    return "| " + " | ".join(_fmt(record.get(c)) for c in columns) + " |"


def markdown_table(records: list[dict], columns) -> str:
    """Records as a GitHub markdown table (NaN shown as n/a, e.g. pixel metrics without masks)."""
    if any("error" in r for r in records):
        columns = tuple(columns) + ("error",)
    return "\n".join([markdown_header(columns)] + [markdown_row(r, columns) for r in records])


class CsvLog:
    """Append records to a CSV file as they finish: the header is written once (new or empty
    file), every row is flushed, so rows already computed survive a crash or Ctrl-C."""

    def __init__(self, path: str | Path, columns):
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+", newline="")
        self.file.seek(0)
        header = next(csv.reader(self.file), None)
        if header is not None and header != self.columns:
            self.file.close()
            raise ValueError(f"{self.path} already holds a table with other columns; pass a "
                             "new file name to --csv.")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        if header is None:
            self.writer.writeheader()
            self.file.flush()

    def write(self, record: dict) -> None:
        self.writer.writerow(record)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def positive(what: str):
    """An argparse type: a whole number of at least 1 ``what`` (plural, e.g. "pixels")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what}, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive number of {what}, got {value}")
        return value
    return parse


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse and check the arguments; every mistake exits 2 with argparse's one message."""
    args = parser.parse_args(argv)
    if args.checkpoint and (args.methods is not None or args.categories):
        parser.error("--checkpoint evaluates saved detectors, whose files name the method and the "
                     "category; drop --methods and --categories")
    if args.checkpoint and args.image_size is not None:
        parser.error("--checkpoint uses the image size each detector was trained at; drop "
                     "--image-size")
    args.methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",")
                    if m.strip()]
    if not args.methods:
        parser.error(f"--methods names no method; choose from {', '.join(METHODS)}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.csv is not None and Path(args.csv).is_dir():
        parser.error(f"--csv {args.csv} is a folder; give a file name such as "
                     f"{Path(args.csv) / 'results.csv'}")
    try:
        synthetic = profile().synthetic
    except ValueError as exc:  # ADLAB_PROFILE names no profile
        parser.error(str(exc))
    if args.root is None and synthetic:
        from adlab.config import cache_dir
        try:
            cache_dir()  # the synthetic data are generated there
        except PermissionError as exc:
            parser.error(str(exc))
    return args


def main(argv=None) -> int:
    """``python -m adlab bench``; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m adlab bench",
        description="Fit and evaluate detectors; print a markdown table of every metric, row by "
                    "row as each finishes.")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--categories", nargs="*", default=None,
                        help="categories to run (default: every category under the root)")
    parser.add_argument("--root", default=None,
                        help="an MVTec-layout folder (default: synthetic data in the quick "
                             "profile, $ADLAB_DATA in the paper profile)")
    parser.add_argument("--image-size", type=positive("pixels"), default=None,
                        help="square image side (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None,
                        help="also append each row to this CSV file as it finishes (the header "
                             "is written when the file is new)")
    parser.add_argument("--time", action="store_true",
                        help="show only the timing columns (fit, predict, ms per image)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of dataset errors too")
    parser.add_argument("--checkpoint", nargs="+", default=None, metavar="FILE",
                        help="evaluate detectors saved by `python -m adlab train --out FILE` "
                             "(no training; the method, category and image size come from "
                             "each file) instead of fitting --methods")
    args = _parse(parser, argv)
    prof = profile()
    what = f"{len(args.checkpoint)} checkpoint(s)" if args.checkpoint else \
        f"methods {', '.join(args.methods)}"
    print(f"adlab bench: profile {prof.name}, {what}", file=sys.stderr)
    from adlab.data.mvtec import list_categories
    try:
        found = list_categories(args.root)  # checks the root; a missing category fails alone
    except DatasetError as exc:
        _report(exc, "", True, args.debug)
        return 2
    try:
        log = CsvLog(args.csv, ("method", "category") + METRICS + TIMES + ("error",)) \
            if args.csv else None
    except (OSError, ValueError, csv.Error) as exc:
        parser.error(f"--csv: {exc}")
    columns = ("method", "category") + (TIMES if args.time else METRICS + TIMES) + ("error",)
    print(markdown_header(columns), flush=True)

    def on_record(record):
        print(markdown_row(record, columns), flush=True)
        if log is not None:
            log.write(record)

    try:
        if args.checkpoint:
            records = run_checkpoints(args.checkpoint, args.root, on_record=on_record,
                                      debug=args.debug)
        else:
            records = run(args.methods, args.categories or found, args.root, args.image_size,
                          args.seed, on_record=on_record, debug=args.debug)
    except KeyboardInterrupt:
        print("interrupted: the rows above are complete" + (f" and in {args.csv}" if log else ""),
              file=sys.stderr)
        return 130
    finally:
        if log is not None:
            log.close()
    if prof.is_quick and args.root is None:
        print("\nQuick profile: synthetic data, random-init backbones, small images. These "
              "numbers are not comparable with the papers'.")
    if args.csv:
        print(f"appended {len(records)} row(s) to {args.csv}", file=sys.stderr)
    errors = [r for r in records if "error" in r]
    if not errors:
        return 0
    print(f"{len(errors)} of {len(records)} run(s) failed (see the error column).", file=sys.stderr)
    return 2 if all(r.get("user_error") for r in errors) else 1
