"""``python -m adlab dryrun [METHOD...]``: is every method ready for the paper profile?

For each method (default: every one in :data:`adlab.bench.METHODS`) it builds the detector
with the paper profile's settings (``ADLAB_PROFILE=paper``: the papers' backbones, widths,
depths and input sizes) but random initialisation (nothing is downloaded), runs **one**
training step through the shared loop (:func:`adlab.train.train`, via the detector's
``training_run``) and one ``predict`` on random images, and prints one line::

    ok    cflow        params 81.6M (trainable 12.9M)   11.2 s   peak 2.1 GB

It exits 1 if any method fails (its error is on its line), 2 on an unknown method name.
Before hours on a GPU, it shows in seconds that the code runs at the papers' sizes.

A tiny batch changes only what the data decide, never the architecture: two images, a
batch of one or two, few rotated copies, a random instead of a distilled EfficientAD teacher
(the same PDN; distilling it is 60,000 steps of its own) (:data:`TINY`). Two methods get smaller maps with the
same layers and parameters, because the paper size costs minutes on a CPU: PyramidFlow's
flow works on a 16 x 16 map instead of 256 x 256 (``flow_size``; one step at the paper's
1024 px input is ~3e12 multiply-adds), and PaDiM sees 64 px images (:data:`SIZES`): a
16 x 16 grid of Gaussians of the paper's d = 550 dimensions instead of 64 x 64 (4096
inverses of 550 x 550 matrices: ~200 s and ~7 GB on one CPU thread); the diffusion
detectors' DINO ViT-B/8 sees 224 px instead of 512. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (per method); on CPU it is the process's peak
resident memory so far (``resource.getrusage``), which only grows from method to method.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback

import torch

#: Settings of the tiny batch, per method (on top of the paper profile's defaults).
TINY = {
    "cflow": {"batch_size": 2},
    "pyramidflow": {"batch_size": 2, "flow_size": 16},
    "fastflow": {"batch_size": 1, "val_fraction": 0.0},
    "csflow": {"batch_size": 1},
    "differnet": {"batch_size": 2, "train_pool": 2, "n_transforms": 2, "n_transforms_test": 2},
    # the same PDN teacher, random instead of distilled (60,000 steps); 2 penalty images
    "efficientad_s": {"teacher": "random", "penalty_images": 2},
    "efficientad_m": {"teacher": "random", "penalty_images": 2},
    "intra": {"batch_size": 2, "windows_per_image": 2},
    "autoencoder": {"batch_size": 2},
    # Stable Diffusion v1.4's 860M-parameter UNet cannot take an AdamW step on this CPU (~14 GB
    # of weights, gradients and moments): its stand-in with SD's classes and shapes but tiny
    # widths ("tiny-random", adlab.diffusion.denoiser.tiny_stable_diffusion); DINO ViT-B/8 at
    # 512 px images and the rest are the paper's. Two DDIM steps instead of 25. DINO ViT-B/8
    # (the same blocks and weights) sees 224 px instead of 512 (784 patch tokens instead of
    # 4096): at 512 each of its passes costs ~30 s on one CPU thread, and GLAD's dry run makes 4.
    "ddim_recon": {"sd_model": "tiny-random", "batch_size": 1, "num_steps": 2,
                   "feature_size": 224},
    "glad": {"sd_model": "tiny-random", "batch_size": 1, "num_steps": 2, "feature_size": 224},
    # TDAD at 256 px with its paper-size UNets and segmentation network; one DDIM step per
    # stage, self-shuffled sources (DTD cannot be downloaded here).
    "tdad": {"batch_size": 1, "steps1": 1, "steps2": 1, "texture_source": "none"},
}
#: Image side where it is not the paper profile's (see the module docstring).
SIZES = {"padim": 64}
#: Methods fitted in one pass (no optimiser steps): the dry run fits them.
NOT_TRAINED = ("naive", "padim", "patchcore")
IMAGES = 2  # training images (one pair for PyramidFlow; CFlow keeps one for validation)


@contextlib.contextmanager
def paper_profile():
    """Run the block with ``ADLAB_PROFILE=paper`` (restored afterwards)."""
    previous = os.environ.get("ADLAB_PROFILE")
    os.environ["ADLAB_PROFILE"] = "paper"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ADLAB_PROFILE", None)
        else:
            os.environ["ADLAB_PROFILE"] = previous


def parameter_counts(detector) -> tuple[int, int]:
    """(all, trainable) parameters of the detector's modules (each module counted once)."""
    from torch import nn

    seen, total, trainable = set(), 0, 0
    for value in vars(detector).values():
        if isinstance(value, nn.Module):
            for p in value.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def peak_memory_bytes() -> int:
    """Peak GPU memory of this method, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def dry_run(name: str) -> dict:
    """Build ``name`` at paper settings, one training step, one predict; a record of it."""
    from adlab.bench import detector_class
    from adlab.config import profile
    from adlab.train import train_detector

    record = {"method": name, "ok": False}
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with paper_profile():
            cls = detector_class(name)
            overrides = dict(TINY.get(name, {}))
            if hasattr(cls().config, "pretrained"):
                overrides["pretrained"] = False     # random init: nothing to download
            detector = cls(**overrides)
            size = SIZES.get(name, profile().image_size)
            images = torch.rand(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))
            if hasattr(detector, "training_run"):
                run = detector.training_run(images, steps=1)
                train_detector(detector, run, progress=False)
                if not (len(run.history) == 1 and math.isfinite(run.history[0])):
                    raise FloatingPointError(f"the training loss is {run.history}")
            elif name in NOT_TRAINED:
                detector.fit(images, progress=False)
            else:
                raise NotImplementedError(
                    f"{cls.__name__} has no training_run(train_data, steps): it does not follow "
                    "the training protocol of adlab.train yet, so one step cannot be run")
            pred = detector.predict(images[:1])
            if pred.maps.shape != (1, size, size) or not torch.isfinite(pred.scores).all():
                raise ValueError(f"predict gave maps {tuple(pred.maps.shape)} and scores "
                                 f"{pred.scores.tolist()}")
        record["params"], record["trainable"] = parameter_counts(detector)
        record["ok"] = True
    except Exception as exc:  # reported on the method's line; the other methods still run
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        record["traceback"] = traceback.format_exc()
    record["seconds"] = time.perf_counter() - t0
    record["peak_bytes"] = peak_memory_bytes()
    return record


def format_line(record: dict) -> str:
    status = "ok  " if record["ok"] else "FAIL"
    line = f"{status}  {record['method']:<14}"
    if record["ok"]:
        line += (f" params {record['params'] / 1e6:7.2f}M (trainable "
                 f"{record['trainable'] / 1e6:.2f}M)")
    line += f"  {record['seconds']:6.1f} s  peak {record['peak_bytes'] / 2 ** 30:.2f} GB"
    if not record["ok"]:
        line += f"  {record['error']}"
    return line


def main(argv=None) -> int:
    """``python -m adlab dryrun``; 0 when every method ran, 1 if one failed, 2 bad names."""
    from adlab.bench import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m adlab dryrun",
        description="Build each method at paper settings with random initialisation, run one "
                    "training step and one predict on a tiny batch, print one line per method "
                    "(ok / FAIL, parameters, seconds, peak memory). Exit 1 on any failure.")
    parser.add_argument("methods", nargs="*", help=f"default: all of {', '.join(METHODS)}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of failures")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    failed = 0
    for name in args.methods or list(METHODS):
        record = dry_run(name)
        print(format_line(record), flush=True)
        if not record["ok"]:
            failed += 1
            if args.debug:
                print(record["traceback"], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
