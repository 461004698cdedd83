"""``python -m adlab train METHOD --category C --out FILE``: train one detector, save it.

The detector is built from the active profile (``ADLAB_PROFILE``), trained on the
category's defect-free images through the one shared loop (:func:`adlab.train.train`: a
progress bar with steps, loss, it/s and ETA; a checkpoint every ``--checkpoint-every``
steps), then finished (validation maxima, templates...) and written to ``--out`` with
:func:`adlab.detector.save_detector`. ``python -m adlab bench --checkpoint FILE`` evaluates
that file without training again. Methods without gradient training (naive, PaDiM,
PatchCore) are fitted and saved the same way.

The loop's own checkpoint sits next to the output, ``<out>.train.pt`` (weights, optimiser,
batch order, random generators): ``--resume`` continues it exactly after a crash, or to
more ``--steps``. It is kept after training and never overwritten without ``--resume``.

Several processes: ``torchrun --nproc_per_node K -m adlab train ...`` (or ``accelerate
launch -m adlab train ...``) trains data-parallel, each process on its shard of every
batch (:mod:`adlab.distributed`); only rank 0 prints and writes files.

Exit codes: 0 saved; 2 a mistake in the arguments, the data or the checkpoint (one line
says what to do; nothing already written is touched); 130 interrupted (the last
checkpoint is kept).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adlab import distributed
from adlab.bench import positive

PRECISION_HELP = ("numeric precision of training: 32 (float32), bf16 (autocast to bfloat16; "
                  "CPU and CUDA), 16-mixed (autocast to float16 with a gradient scaler; CUDA "
                  "only). Default: 16-mixed on a CUDA GPU, else 32")


def training_checkpoint(out: Path) -> Path:
    """Where the loop's checkpoint of ``--out FILE`` lives: ``FILE`` with ``.train`` before
    its suffix (``runs/cflow.pt`` -> ``runs/cflow.train.pt``)."""
    return out.with_name(f"{out.stem}.train{out.suffix or '.pt'}")


def default_precision() -> str:
    from adlab.config import device

    return "16-mixed" if device().type == "cuda" else "32"


def parser() -> argparse.ArgumentParser:
    from adlab.bench import METHODS

    p = argparse.ArgumentParser(
        prog="python -m adlab train",
        description="Train one detector of the active profile (ADLAB_PROFILE) on a category's "
                    "defect-free images and save it; evaluate the file with `python -m adlab "
                    "bench --checkpoint FILE`. Several GPUs or machines: launch the same command "
                    "with `torchrun --nproc_per_node K -m adlab train ...`.")
    p.add_argument("method", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--category", required=True, help="the category folder to train on")
    p.add_argument("--out", required=True, help="the detector file to write, e.g. runs/cflow.pt")
    p.add_argument("--root", default=None,
                   help="an MVTec-layout folder (default: synthetic data in the quick profile, "
                        "$ADLAB_DATA in the paper profile)")
    p.add_argument("--steps", type=positive("steps"), default=None,
                   help="optimiser steps (default: the method's, from its config)")
    p.add_argument("--resume", action="store_true",
                   help="continue the training checkpoint <out>.train.pt (after a crash, or to "
                        "more --steps)")
    p.add_argument("--precision", choices=("16-mixed", "bf16", "32"), default=None,
                   help=PRECISION_HELP)
    p.add_argument("--image-size", type=positive("pixels"), default=None,
                   help="square image side the data are loaded at (default: the profile's)")
    p.add_argument("--seed", type=int, default=0,
                   help="the detector's seed (its config.seed: split, initialisation, batch "
                        "order); default 0, as bench")
    p.add_argument("--checkpoint-every", type=positive("steps"), default=500,
                   help="write the training checkpoint every N steps (default 500)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the method's config, e.g. --set atp=False "
                        "(repeatable; VALUE is a Python literal or a plain string)")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16: half the file (loading turns them back "
                        "into float32); the notebooks' shipped checkpoints use it")
    return p


def parse_settings(p: argparse.ArgumentParser, config, settings: list[str]) -> dict:
    """``--set KEY=VALUE`` items as overrides of ``config``'s fields (argparse errors name the
    mistake and the valid keys)."""
    import ast
    import dataclasses

    names = [f.name for f in dataclasses.fields(config)]
    out = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            p.error(f"--set {item!r}: write KEY=VALUE, e.g. --set seed=1")
        if key not in names:
            p.error(f"--set {key}: {type(config).__name__} has no such setting; its settings: "
                    f"{', '.join(names)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text                      # a plain string such as a backbone name
        out[key] = value
    if "seed" in out:
        p.error("--set seed=...: use --seed, which also seeds the data order")
    return out


def _check(p: argparse.ArgumentParser, args) -> Path:
    """Argument mistakes that need no data: exit 2 with one line (argparse's ``error``)."""
    from adlab.bench import METHODS, detector_class

    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    cls = detector_class(args.method)
    if not hasattr(cls, "state_dict"):
        p.error(f"{args.method} cannot be saved yet (its class has no state_dict); train it in "
                "Python with fit()")
    if args.steps is not None and not hasattr(cls, "training_run"):
        p.error(f"{args.method} has no training steps (it is fitted in one pass); drop --steps")
    out = Path(args.out)
    if out.is_dir():
        p.error(f"--out {out} is a folder; give a file name such as {out / (args.method + '.pt')}")
    partial = training_checkpoint(out)
    if args.resume and not partial.exists():
        p.error(f"--resume: there is no training checkpoint {partial} to continue; drop --resume "
                "to start training")
    if not args.resume and partial.exists():
        p.error(f"{partial} holds an earlier training run; pass --resume to continue it (or "
                "delete it to start again)")
    if not args.resume and out.exists():
        p.error(f"{out} exists; choose another --out, or delete it to train again")
    precision = args.precision or default_precision()
    if precision == "16-mixed":
        from adlab.config import device

        if device().type != "cuda":
            p.error("--precision 16-mixed needs a CUDA GPU; use bf16 or 32 on this machine")
    args.precision = precision
    return out


def main(argv=None) -> int:
    """``python -m adlab train``; returns the exit code (see the module docstring)."""
    from adlab.bench import detector_class
    from adlab.config import profile, seed_everything
    from adlab.data.mvtec import DatasetError, load_dataset
    from adlab.detector import config_dict, save_detector
    from adlab.train import CheckpointMismatchError, train_detector

    p = parser()
    args = p.parse_args(argv)
    try:
        prof = profile()
    except ValueError as exc:  # ADLAB_PROFILE names no profile
        p.error(str(exc))
    out = _check(p, args)
    distributed.setup()
    main_process = distributed.is_main()

    def say(text: str) -> None:
        if main_process:
            print(text, file=sys.stderr, flush=True)

    try:
        data = load_dataset(args.category, "train", root=args.root, image_size=args.image_size)
    except DatasetError as exc:
        say(f"error: {exc}")
        return 2
    cls = detector_class(args.method)
    seed_everything(args.seed)
    overrides = parse_settings(p, cls().config, args.settings)
    detector = cls(**overrides)
    if hasattr(detector.config, "seed"):
        detector.config.seed = args.seed
    trained = hasattr(detector, "training_run")
    world = distributed.world_size()
    say(f"adlab train: {args.method} on {args.category} ({len(data)} images, "
        f"{tuple(data.images.shape[-2:])} px), profile {prof.name}, precision {args.precision}"
        + (f", {world} processes" if world > 1 else ""))
    t0 = time.perf_counter()
    try:
        if trained:
            run = detector.training_run(data, steps=args.steps)
            meta = {"method": args.method, "category": args.category,
                    "image_size": int(data.images.shape[-1]), "config": config_dict(detector.config)}
            train_detector(detector, run, progress=main_process,
                           checkpoint=training_checkpoint(out), precision=args.precision,
                           checkpoint_every=args.checkpoint_every, meta=meta)
        else:
            detector.fit(data, progress=main_process)
    except CheckpointMismatchError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say(f"interrupted: the last checkpoint {training_checkpoint(out)} is kept; continue "
            "with --resume" if trained else "interrupted: nothing was saved")
        return 130
    if main_process:
        save_detector(detector, out, method=args.method, half=args.half, category=args.category,
                      image_size=int(data.images.shape[-1]), profile=prof.name,
                      steps=len(getattr(detector, "history", []) or []))
        root = f" --root {args.root}" if args.root else ""
        say(f"saved {out} after {time.perf_counter() - t0:.1f} s; evaluate it with "
            f"`python -m adlab bench --checkpoint {out}{root}`")
    distributed.barrier()
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
