"""``python -m adlab bench | train | dryrun | assign | grade ...``: the command-line entry point."""
import sys

USAGE = """usage: python -m adlab COMMAND ...

  bench    fit and evaluate detectors, print a results table (python -m adlab bench --help);
           --checkpoint FILE evaluates a detector saved by train
  train    train one detector on a category and save it (python -m adlab train --help);
           several GPUs: torchrun --nproc_per_node K -m adlab train ...
  dryrun   build every method at paper settings (random init), one training step and one
           predict on a tiny batch; one line per method (python -m adlab dryrun [METHOD...])
  assign   write student versions of notebooks: solutions stubbed, outputs cleared
           (python -m adlab assign NOTEBOOK... --out DIR; needs pip install -e ".[teach]")
  grade    run a notebook, print pass/FAIL and points per check cell and the total
           (python -m adlab grade NOTEBOOK)"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from adlab.bench import main as bench_main
        return bench_main(rest)
    if command == "train":
        from adlab.cli_train import main as train_main
        return train_main(rest)
    if command == "dryrun":
        from adlab.dryrun import main as dryrun_main
        return dryrun_main(rest)
    if command in ("assign", "grade"):
        from adlab import assign
        return assign.assign_main(rest) if command == "assign" else assign.grade_main(rest)
    print(f"unknown command {command!r}; try `python -m adlab --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
