"""The one interface every detector follows, and ``evaluate``.

* ``fit(train)`` trains on defect-free images only (an :class:`~adlab.data.mvtec.ADDataset`);
* ``predict(images) -> Prediction`` with ``images`` a float tensor ``[B, 3, H, W]`` in
  [0, 1]; ``scores[B]`` and ``maps[B, H, W]`` (at input resolution), larger = more anomalous.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Prediction:
    """Image scores ``[B]`` and anomaly maps ``[B, H, W]`` (CPU float tensors).

    ``extras``: optional per-image values a method records, each a tensor whose first axis
    is the batch (e.g. GLAD's adaptive step, ``extras["step"]``); empty for most methods.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores).detach().float().cpu().reshape(-1)
        self.maps = torch.as_tensor(self.maps).detach().float().cpu()
        if self.maps.ndim == 4 and self.maps.shape[1] == 1:
            self.maps = self.maps[:, 0]
        if self.maps.ndim != 3 or self.maps.shape[0] != self.scores.shape[0]:
            raise ValueError(f"Prediction needs scores [B] and maps [B, H, W]; got "
                             f"{tuple(self.scores.shape)} and {tuple(self.maps.shape)}")
        self.extras = {k: torch.as_tensor(v).detach().cpu() for k, v in dict(self.extras).items()}
        for key, value in self.extras.items():
            if value.ndim == 0 or value.shape[0] != self.scores.shape[0]:
                raise ValueError(f"Prediction extras[{key!r}] needs one value per image "
                                 f"({self.scores.shape[0]}); got shape {tuple(value.shape)}")


def make_config(config_class, config=None, overrides=None):
    """A detector's hyperparameters: the given config, or ``config_class(**overrides)``."""
    if config is not None and overrides:
        raise ValueError(f"Pass either a {config_class.__name__} or keyword overrides, not both.")
    return config or config_class(**(overrides or {}))


@runtime_checkable
class Detector(Protocol):
    def fit(self, train) -> "Detector": ...

    def predict(self, images: torch.Tensor) -> Prediction: ...


def predict_dataset(detector: Detector, dataset, batch_size: int = 16) -> Prediction:
    """Run ``detector.predict`` over a whole dataset in batches."""
    preds = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            preds.append(detector.predict(dataset.images[start:start + batch_size]))
    extras = {key: torch.cat([p.extras[key] for p in preds]) for key in preds[0].extras
              if all(key in p.extras for p in preds)}
    return Prediction(torch.cat([p.scores for p in preds]), torch.cat([p.maps for p in preds]),
                      extras)


def evaluate(detector: Detector, dataset, batch_size: int = 16) -> dict:
    """Score a fitted detector on a test set: every metric of :mod:`adlab.metrics` as one record.

    Pixel metrics are NaN when the category has no ground-truth masks.
    Adds ``predict_s`` (wall-clock seconds) and ``n_images``.
    """
    from adlab.metrics import compute_all

    t0 = time.perf_counter()
    pred = predict_dataset(detector, dataset, batch_size)
    seconds = time.perf_counter() - t0
    record = compute_all(dataset.labels, pred.scores, dataset.masks, pred.maps)
    record.update(predict_s=seconds, n_images=len(dataset))
    return record


# --------------------------------------------------------------------------- save / load

#: Marks a file written by :func:`save_detector` (a training checkpoint of the loop has none).
DETECTOR_FORMAT = "adlab-detector/1"


class DetectorFileError(ValueError):
    """A detector file that cannot be loaded: another kind of file, another method, damaged."""


def get_state(detector, names) -> dict:
    """The named attributes of a fitted detector as checkpoint values.

    A module becomes its ``state_dict`` (frozen backbones included, so a loaded detector
    predicts the same even where pretrained weights cannot be downloaded); tensors, numbers,
    tuples and lists of them are kept as they are.
    """
    from torch import nn

    return {name: (value.state_dict() if isinstance(value, nn.Module) else value)
            for name in names for value in [getattr(detector, name)]}


def set_state(detector, state: dict) -> None:
    """Undo :func:`get_state` on a detector whose modules are built (same architecture)."""
    from torch import nn

    device = getattr(detector, "device", torch.device("cpu"))

    def to_device(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, (list, tuple)):
            return type(value)(to_device(v) for v in value)
        return value

    for name, value in state.items():
        current = getattr(detector, name, None)
        if isinstance(current, nn.Module):
            current.load_state_dict(value)
        else:
            setattr(detector, name, to_device(value))


def config_dict(config) -> dict:
    """A config dataclass as a plain dict (what a checkpoint stores)."""
    import dataclasses

    return dataclasses.asdict(config)


def _cast_floats(tree, dtype):
    """``tree`` (nested dicts / lists / tuples) with every float32 / float16 tensor cast to
    ``dtype``; other values unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.dtype in (torch.float32, torch.float16) else tree
    if isinstance(tree, dict):
        return type(tree)((k, _cast_floats(v, dtype)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast_floats(v, dtype) for v in tree)
    return tree


def save_detector(detector, path, method: str, half: bool = False, **info) -> None:
    """Write a fitted detector to ``path`` atomically: its method name, config and fitted state.

    ``info`` adds facts for whoever evaluates it (``python -m adlab train`` stores the
    category and the image size, which ``bench --checkpoint`` reads). ``half`` stores the
    float32 tensors as float16 (half the file; the notebooks' shipped checkpoints), and
    :func:`read_detector_file` turns them back into float32. Load with :func:`load_detector`.
    """
    from adlab.train import save_checkpoint

    if not hasattr(detector, "state_dict"):
        raise TypeError(f"{type(detector).__name__} has no state_dict(); it cannot be saved.")
    state = detector.state_dict()
    if half:
        state = _cast_floats(state, torch.float16)
    save_checkpoint(path, {"format": DETECTOR_FORMAT, "method": method,
                           "config": config_dict(detector.config), "info": dict(info),
                           "stored_as": "float16" if half else "float32", "state": state})


def read_detector_file(path, method: str | None = None) -> dict:
    """The contents of a detector file, checked: its kind and (if given) its method."""
    from pathlib import Path

    from adlab.train import load_checkpoint

    if not Path(path).is_file():
        raise DetectorFileError(f"No detector file {path}; train one with `python -m adlab "
                                "train METHOD --category C --out FILE`.")
    try:
        saved = load_checkpoint(path)
    except ValueError as exc:
        raise DetectorFileError(f"{path} is not a readable detector file ({exc}).") from None
    if not isinstance(saved, dict) or saved.get("format") != DETECTOR_FORMAT:
        kind = ("a training checkpoint of the loop (its .train.pt file), not a finished "
                "detector" if isinstance(saved, dict) and "optimizer" in saved else
                "not a detector file written by adlab.detector.save_detector")
        raise DetectorFileError(f"{path} is {kind}; pass the file given to --out of "
                                "`python -m adlab train`.")
    if method is not None and saved["method"] != method:
        raise DetectorFileError(f"{path} holds a {saved['method']} detector, not {method}.")
    if saved.get("stored_as") == "float16":
        saved["state"] = _cast_floats(saved["state"], torch.float32)
    return saved


def load_detector(path, method: str | None = None):
    """A detector saved by :func:`save_detector`, ready to ``predict`` (no training, no download).

    The modules are rebuilt from the stored config with random initialisation and then
    take the stored weights, so nothing is downloaded and the scores equal those of the
    detector that was saved. ``method`` (optional) must match the file's. ``detector.info``
    holds the method name and the facts saved with it.
    """
    from adlab.bench import METHODS, detector_class

    saved = read_detector_file(path, method)
    if saved["method"] not in METHODS:
        raise DetectorFileError(f"{path} holds a {saved['method']!r} detector, which this adlab "
                                f"does not know ({', '.join(METHODS)}).")
    cls = detector_class(saved["method"])
    try:
        config_class = getattr(cls, "Config", None) or type(cls().config)
        config = config_class(**saved["config"])
    except TypeError as exc:
        raise DetectorFileError(f"{path} was saved with other {saved['method']} settings than "
                                f"this adlab has ({exc}).") from None
    pretrained = getattr(config, "pretrained", None)
    if hasattr(config, "pretrained"):
        config.pretrained = False  # random init, then the stored weights: no download
    detector = cls(config)
    try:
        detector.load_state_dict(saved["state"])
    except (RuntimeError, KeyError) as exc:
        raise DetectorFileError(f"{path} does not fit a {saved['method']} detector built from "
                                f"its own settings ({str(exc)[:200]}).") from None
    if hasattr(config, "pretrained"):
        config.pretrained = pretrained
    detector.info = {"method": saved["method"], **saved.get("info", {})}
    return detector
