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
import secrets
import shutil
import time
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
    """Where generated data and downloaded weights live (``ADLAB_CACHE``, default ~/.cache/adlab).

    Raises a PermissionError saying which variable to set when the folder cannot be written.
    """
    root = Path(os.environ.get("ADLAB_CACHE", Path.home() / ".cache" / "adlab")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = temp_path(root / "write-test")
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"The cache folder {root} is not writable ({type(err).__name__}: {err.strerror or err}). "
            "Set ADLAB_CACHE to a folder you can write, e.g. `export ADLAB_CACHE=/tmp/adlab`.") from err
    return root


# ---------------------------------------------------------------- atomic writes

# A file or folder is written under a temporary name in its own folder, then renamed into
# place (``os.replace`` is atomic on one file system), so a reader never sees half of it.
# The temporary name carries the writer's process id: what a killed process left behind is
# recognised as stale and removed by the next writer, while another live writer is left alone.
TEMP_TAG = ".tmp-"
STALE_AFTER_S = 24 * 3600  # where a process id cannot be checked (Windows): a day old is stale


def temp_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` to write first: ``.<name>.tmp-<pid>-<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _process_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary siblings of ``path`` left by writers that no longer run."""
    path = Path(path)
    prefix = f".{path.name}{TEMP_TAG}"
    if not path.parent.is_dir():
        return
    for tmp in path.parent.iterdir():
        if not tmp.name.startswith(prefix):
            continue
        pid = tmp.name[len(prefix):].split("-")[0]
        try:
            old = time.time() - tmp.lstat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # removed meanwhile by another writer
            continue
        if not pid.isdigit() or old or not _process_running(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


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
