"""``python -m adlab bench ...``: the command-line entry point."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m adlab bench [--methods ...] [--categories ...] [--root DIR] "
              "[--csv PATH]\n\n  bench   fit and evaluate detectors, print a results table "
              "(python -m adlab bench --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from adlab.bench import main as bench_main
        return bench_main(rest)
    print(f"unknown command {command!r}; try `python -m adlab bench --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
