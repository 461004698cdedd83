"""Datasets in the MVTec AD layout, the synthetic factory, anomaly synthesis, downloads.

* :mod:`adlab.data.mvtec` — ``load_dataset(category, split)`` for any MVTec-layout folder;
* :mod:`adlab.data.synthetic` — the seeded synthetic factory the quick profile uses;
* :mod:`adlab.data.synthesis` — training-time anomaly synthesis (Perlin masks, blending);
* :mod:`adlab.data.textures` — the textures it pastes: DTD, or offline stand-ins;
* :mod:`adlab.data.download` — real datasets: verified download, then
  :mod:`adlab.data.catalogue` (what to fetch), :mod:`adlab.data.archive` (safe extraction:
  files and folders only, no bombs), :mod:`adlab.data.convert` (to the MVTec layout).
"""
from adlab.data.mvtec import (IMAGENET_MEAN, IMAGENET_STD, ADDataset, list_categories,
                              load_dataset, load_image, normalize)

__all__ = ["ADDataset", "load_dataset", "list_categories", "load_image", "normalize",
           "IMAGENET_MEAN", "IMAGENET_STD"]
