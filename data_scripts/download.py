#!/usr/bin/env python
"""Download, verify, extract and convert a real anomaly-detection dataset to the MVTec layout.

    python data_scripts/download.py --list
    python data_scripts/download.py mvtec_ad --root ~/data
    python data_scripts/download.py visa --root ~/data --url https://mirror.example/VisA.tar
    python data_scripts/download.py mpdd --root ~/data --no-verify     # no published checksum
    python data_scripts/download.py dtd --root ~/data     # textures for anomaly synthesis

The dataset ends up in <root>/<name>; point the paper profile at it with
``export ADLAB_DATA=<root>/<name>``. DTD is not an anomaly dataset but the texture images
that DRAEM / GLAD / TDAD paste into normal images: it ends up in <root>/dtd/<class>/*.jpg,
read by ``adlab.data.textures.texture_bank(size, source="dtd", root=<root>)``.
Offline, the command fails within --timeout seconds and prints where to put an archive
downloaded by hand; running it again verifies and uses it.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout, too

from adlab.data import download as dl  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECKSUM, EXIT_UNSAFE, EXIT_LAYOUT = 0, 1, 2, 3, 4, 5

EPILOG = """exit codes:
  0  dataset ready (or listed)
  1  download failed (offline, HTTP error, manual download needed): see the message
  2  wrong command-line usage or unknown dataset
  3  checksum mismatch, or no known checksum without --no-verify
  4  unsafe archive refused (absolute or '..' paths, links, device files, duplicate names,
     zip/tar bomb)
  5  unexpected folder layout after extraction
"""


# Argument types: a bad value ends in argparse's "error: argument --x: ..." and exit code 2.
def dataset_name(text: str) -> str:
    try:
        return dl.resolve_name(text)
    except dl.DownloadError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def sha256_hex(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a sha256: give the 64 hex digits that sha256sum prints")
    return text.strip().lower()


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def root_folder(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a file, not a folder: give a folder (it is created if missing)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download a real dataset, check its sha256, extract it safely and "
                    "arrange it in the MVTec AD folder layout (dtd: one folder per texture "
                    "class, for anomaly synthesis).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", type=dataset_name,
                        help=f"dataset: {', '.join(dl.CATALOGUE)}")
    parser.add_argument("--root", type=root_folder,
                        help="folder for the archive and the dataset (required); "
                             "the dataset goes to ROOT/NAME")
    parser.add_argument("--url", help="download from this URL (a mirror) instead of the "
                                      "catalogue's; the catalogue checksum still applies")
    parser.add_argument("--sha256", type=sha256_hex,
                        help="expected sha256 of the archive (overrides the catalogue; for "
                             "mirrors or datasets without one)")
    parser.add_argument("--no-verify", action="store_true",
                        help="use the archive even if its sha256 is unknown or differs "
                             "(prints the sha256 so you can check it)")
    parser.add_argument("--timeout", type=seconds, default=dl.DEFAULT_TIMEOUT,
                        help="seconds to wait for a connection or data (default %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:      # argparse ends usage errors with SystemExit(2) after a one-line message
        args = parser.parse_args(argv)
        if not args.list and not args.name:
            parser.error(f"give a dataset name ({', '.join(dl.CATALOGUE)}) or --list")
        if not args.list and not args.root:
            parser.error("--root DIR is required (the archive and DIR/NAME go there)")
    except SystemExit as stop:
        return stop.code
    if args.list:
        for entry in dl.CATALOGUE.values():
            print(dl.describe(entry))
        return EXIT_OK
    try:
        dl.download(args.name, args.root, url_override=args.url, sha256=args.sha256,
                    verify=not args.no_verify, timeout=args.timeout)
    except dl.DownloadError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        exit_codes = ((dl.ChecksumError, EXIT_CHECKSUM), (dl.UnsafeArchiveError, EXIT_UNSAFE),
                      (dl.LayoutError, EXIT_LAYOUT), (dl.DownloadError, EXIT_FAILED))
        return next(code for kind, code in exit_codes if isinstance(err, kind))
    except OSError as err:      # disk full, permission denied, ...: nothing half-built is kept
        print(f"\nerror: {err}. Check that {args.root} is a folder you can write to, with "
              "room for the archive and the dataset, and run again.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; partial files were removed, run again to resume from scratch",
              file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
