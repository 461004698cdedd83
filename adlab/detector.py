"""The one interface every detector follows, and ``evaluate``.

* ``fit(train)`` trains on defect-free images only (an :class:`~adlab.data.mvtec.ADDataset`);
* ``predict(images) -> Prediction`` with ``images`` a float tensor ``[B, 3, H, W]`` in
  [0, 1]; ``scores[B]`` and ``maps[B, H, W]`` (at input resolution), larger = more anomalous.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Prediction:
    """Image scores ``[B]`` and anomaly maps ``[B, H, W]`` (CPU float tensors)."""

    scores: torch.Tensor
    maps: torch.Tensor

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores).detach().float().cpu().reshape(-1)
        self.maps = torch.as_tensor(self.maps).detach().float().cpu()
        if self.maps.ndim == 4 and self.maps.shape[1] == 1:
            self.maps = self.maps[:, 0]
        if self.maps.ndim != 3 or self.maps.shape[0] != self.scores.shape[0]:
            raise ValueError(f"Prediction needs scores [B] and maps [B, H, W]; got "
                             f"{tuple(self.scores.shape)} and {tuple(self.maps.shape)}")


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
    scores, maps = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            pred = detector.predict(dataset.images[start:start + batch_size])
            scores.append(pred.scores)
            maps.append(pred.maps)
    return Prediction(torch.cat(scores), torch.cat(maps))


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
