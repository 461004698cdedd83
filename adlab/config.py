"""Profiles, device, seeds and paths: the one place that knows the environment.

Two profiles (see DESIGN.md):

* ``quick`` (default): any CPU, the synthetic factory, small images, short
  training, random-init backbones unless weights are already cached.
* ``paper``: one GPU, real data from ``ADLAB_DATA``, the papers' image sizes,
  steps and pretrained backbones.

Select with the environment variable ``ADLAB_PROFILE``. Method settings read the
active profile through :func:`by_profile`, so every notebook runs unchanged
under either profile::

    @dataclass
    class PatchCoreConfig:
        backbone: str = field(default_factory=lambda: by_profile(
            quick="resnet18", paper="wide_resnet50_2"))  # Sec. 4.1
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

PROFILES = ("quick", "paper")
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """The resolved settings every module reads."""

    name: str
    image_size: int      # side of the square images fed to detectors
    pretrained: bool     # load pretrained backbone weights (paper) or random init (quick)
    synthetic: bool      # use the synthetic factory instead of a real dataset
    seed: int            # default seed for data splits and training

    @property
    def is_quick(self) -> bool:
        return self.name == "quick"


def profile_name() -> str:
    """The active profile name from ``ADLAB_PROFILE`` (default ``quick``)."""
    name = os.environ.get("ADLAB_PROFILE", "quick").strip().lower() or "quick"
    if name not in PROFILES:
        raise ValueError(
            f"ADLAB_PROFILE={name!r} is not a profile; use one of {', '.join(PROFILES)} "
            "(e.g. `export ADLAB_PROFILE=paper`).")
    return name


def profile() -> Profile:
    """Resolve the active profile (re-read on every call, so a notebook may change it)."""
    name = profile_name()
    if name == "quick":
        return Profile(name="quick", image_size=128, pretrained=False, synthetic=True, seed=0)
    return Profile(name="paper", image_size=256, pretrained=True, synthetic=False, seed=0)


def by_profile(quick: T, paper: T) -> T:
    """Pick the value for the active profile (used as dataclass ``default_factory``)."""
    return quick if profile_name() == "quick" else paper


def device() -> torch.device:
    """Best available device: CUDA, then Apple MPS, then CPU (``ADLAB_DEVICE`` overrides)."""
    forced = os.environ.get("ADLAB_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def cache_dir() -> Path:
    """Where generated data and downloaded weights live (``ADLAB_CACHE``, default ~/.cache/adlab)."""
    root = Path(os.environ.get("ADLAB_CACHE", Path.home() / ".cache" / "adlab")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_root() -> Path:
    """The folder holding real datasets in the MVTec layout (``ADLAB_DATA``)."""
    value = os.environ.get("ADLAB_DATA")
    if not value:
        raise FileNotFoundError(
            "The paper profile reads real datasets from the folder named by ADLAB_DATA, which is "
            "not set. Download one with `python data_scripts/download.py mvtec_ad --root DIR`, "
            "then `export ADLAB_DATA=DIR/mvtec_ad`; or use the synthetic data with ADLAB_PROFILE=quick.")
    return Path(value).expanduser()


def print_setup() -> Profile:
    """Print the resolved profile and device (every notebook's first code cell calls this)."""
    prof, dev = profile(), device()
    print(f"adlab profile: {prof.name}  (image_size={prof.image_size}, "
          f"pretrained={prof.pretrained}, data={'synthetic' if prof.synthetic else 'ADLAB_DATA'})")
    print(f"device: {dev}  (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    if prof.name == "paper" and dev.type == "cpu":
        warnings.warn("The paper profile is running without a GPU: expect hours, not minutes. "
                      "Use ADLAB_PROFILE=quick on a laptop.", stacklevel=2)
    return prof
