"""timm backbones as frozen feature extractors, and the offline rule.

The embedding methods (PaDiM, PatchCore) and several flows read intermediate
feature maps of an ImageNet CNN. :class:`FeatureExtractor` wraps
``timm.create_model(..., features_only=True, out_indices=...)``: it takes images
``[B, 3, H, W]`` in [0, 1], normalises them itself (ImageNet mean / std, via
:func:`adlab.data.mvtec.normalize`), and returns the requested layers' maps.

The offline rule (see DESIGN.md): no machine here reaches a model hub. When
pretrained weights are asked for but cannot be loaded, the extractor warns once
(:class:`PretrainedWeightsWarning`) and falls back to a *seeded* random
initialisation, so results stay reproducible. The quick profile asks for random
weights in the first place (``adlab.config.profile().pretrained`` is False). Random
initialisation keeps every residual block active (``zero_init_last=False``, see
:func:`create_backbone`).

Also here, because every feature-based detector needs them: :func:`smooth_map`
(patch scores -> image-size anomaly map: bilinear upsampling + Gaussian blur,
as in the PaDiM and PatchCore papers), :func:`gaussian_blur` and
:func:`images_of` (an ADDataset or a tensor -> the image tensor).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The papers' code loads torchvision's ImageNet weights (PaDiM's reference code and
# PatchCore's official code build ``torchvision.models``); timm serves the same tensors
# under these tags. Other names are passed to timm unchanged (its default weights).
TORCHVISION_WEIGHTS = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
    "wide_resnet101_2": "wide_resnet101_2.tv_in1k",
}


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were requested but could not be loaded: random init is used."""


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ImportError("adlab.features needs timm: `pip install 'timm>=1.0,<2'`.") from exc
    return timm


def layer_names(backbone: str) -> list[str]:
    """The feature layers timm exposes for ``backbone`` (e.g. act1, layer1..layer4 for ResNets).

    Built on PyTorch's ``meta`` device: no weights are allocated or downloaded.
    """
    timm = _timm()
    if not timm.is_model(backbone.split(".")[0]):
        raise ValueError(f"timm has no model {backbone!r}; list candidates with "
                         f"`timm.list_models('*resnet*')`.")
    with torch.device("meta"):
        model = timm.create_model(backbone.split(".")[0], features_only=True, pretrained=False)
    return list(model.feature_info.module_name())


def layer_indices(backbone: str, layers: Sequence[str | int]) -> tuple[int, ...]:
    """Map layer names (``"layer2"``) or integer indices to timm ``out_indices``."""
    names = layer_names(backbone)
    indices = []
    for layer in layers:
        if isinstance(layer, int):
            if not 0 <= layer < len(names):
                raise ValueError(f"{backbone} has feature indices 0..{len(names) - 1}; got {layer}.")
            indices.append(layer)
        elif layer in names:
            indices.append(names.index(layer))
        else:
            raise ValueError(f"{backbone} has no feature layer {layer!r}; choose from "
                             f"{', '.join(names)} (or their indices 0..{len(names) - 1}).")
    if list(indices) != sorted(set(indices)):
        raise ValueError(f"layers must be distinct and ordered shallow to deep; got {list(layers)}.")
    return tuple(indices)


def _offline_message(weights: str, backbone: str, exc: Exception) -> str:
    return (
        f"Pretrained weights {weights!r} could not be loaded ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). Using a RANDOMLY INITIALISED "
        f"{backbone} instead (seeded, so results are reproducible, but features are much weaker "
        f"than the papers'). To get the weights: run this once with internet access (timm "
        f"stores them in the Hugging Face cache, ~/.cache/huggingface/hub, or $HF_HOME), or copy "
        f"a cache that has them there; after that HF_HUB_OFFLINE=1 loads them offline.")


def create_backbone(backbone: str, out_indices: tuple[int, ...], pretrained: bool,
                    seed: int = 0) -> tuple[nn.Module, bool]:
    """``timm.create_model(features_only=True)``; returns (model, weights_loaded).

    Random initialisation happens under ``torch.manual_seed(seed)`` inside a forked RNG,
    so it is reproducible and leaves the caller's random state untouched. If
    ``pretrained`` weights cannot be loaded (offline), warns with
    :class:`PretrainedWeightsWarning` and falls back to that seeded random init.

    Random init uses ``zero_init_last=False``. timm's ResNets default to
    ``zero_init_last=True`` (huggingface/pytorch-image-models, ``timm/models/resnet.py``
    in timm 1.0.31: the ``ResNet.__init__`` default at line 507, applied by
    ``init_weights`` at lines 636-639: every residual block's last BatchNorm weight is
    set to 0, the training trick of Goyal et al. 2017). Untrained, that makes each block the identity on its shortcut:
    "layer1" is then the stem's output and "layer2" a single strided 1x1 convolution,
    so a random-init extractor would have almost no depth. With ``False`` every
    BatchNorm weight keeps its default 1. Pretrained loading is unaffected (the flag
    is only passed here, and loaded weights would overwrite it anyway); architectures
    without the flag (ViT, EfficientNet) are built as timm defines them.
    """
    timm = _timm()
    arch = backbone.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"timm has no model {backbone!r}; list candidates with "
                         f"`timm.list_models('*resnet*')`.")
    with torch.random.fork_rng(devices=[]):
        if pretrained:
            weights = backbone if "." in backbone else TORCHVISION_WEIGHTS.get(backbone, backbone)
            try:
                torch.manual_seed(seed)
                model = timm.create_model(weights, pretrained=True, features_only=True,
                                          out_indices=out_indices)
                return model, True
            except Exception as exc:  # offline, no weights for this tag, corrupt cache, ...
                warnings.warn(_offline_message(weights, arch, exc), PretrainedWeightsWarning,
                              stacklevel=3)
        torch.manual_seed(seed)
        try:
            model = timm.create_model(arch, pretrained=False, features_only=True,
                                      out_indices=out_indices, zero_init_last=False)
        except TypeError as exc:             # an architecture without residual zero-init
            if "zero_init_last" not in str(exc):
                raise
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, features_only=True,
                                      out_indices=out_indices)
    return model, False


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of ``layers``.

    ``forward(images)`` takes ``[B, 3, H, W]`` floats in [0, 1] (normalised here with
    ImageNet statistics) and returns a list of ``[B, C_l, H / r_l, W / r_l]`` tensors,
    shallow to deep. Always in eval mode (BatchNorm uses its running statistics), no
    gradients. ``pretrained=None`` follows the active profile; ``weights_loaded`` tells
    whether pretrained weights are in use.
    """

    def __init__(self, backbone: str = "resnet18",
                 layers: Sequence[str | int] = ("layer2", "layer3"),
                 pretrained: bool | None = None, seed: int = 0):
        super().__init__()
        from adlab.config import profile

        self.backbone = backbone
        self.layers = tuple(layers)
        self.pretrained = profile().pretrained if pretrained is None else bool(pretrained)
        self.out_indices = layer_indices(backbone, self.layers)
        self.model, self.weights_loaded = create_backbone(backbone, self.out_indices,
                                                          self.pretrained, seed)
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return list(self.model.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        """Stride (input pixels per feature cell) of each returned map."""
        return list(self.model.feature_info.reduction())

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Frozen: stays in eval mode whatever is asked."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        from adlab.data.mvtec import normalize

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FeatureExtractor expects images [B, 3, H, W] in [0, 1]; got "
                             f"shape {tuple(images.shape)}.")
        param = next(self.model.parameters())
        x = normalize(images.to(device=param.device, dtype=param.dtype))
        return list(self.model(x))


class FeatureDetector:
    """Shared start of the detectors built on a frozen :class:`FeatureExtractor`.

    Takes either a config dataclass (``Config``, defaults from the profile) or keyword
    overrides of its fields, and builds the backbone on first use from the config's
    ``backbone``, ``layers``, ``pretrained`` and ``seed``.
    """

    Config: type = None  # set by each subclass

    def __init__(self, config=None, **overrides):
        from adlab.config import device
        from adlab.detector import make_config

        self.config = make_config(self.Config, config, overrides)
        self.device = device()
        self.extractor = None

    def _extractor(self) -> FeatureExtractor:
        if self.extractor is None:
            c = self.config
            self.extractor = FeatureExtractor(c.backbone, c.layers, c.pretrained,
                                              seed=c.seed).to(self.device)
        return self.extractor


# --------------------------------------------------------------------------- helpers

class ViTFeatures(nn.Module):
    """Patch tokens of timm vision-transformer blocks ``blocks`` (0-based) as ``[B, C, h, w]``
    maps, with (``norm=True``) or without the model's final LayerNorm; class / distillation
    tokens dropped (timm's ``forward_intermediates``). Inputs in [0, 1], ImageNet-normalised
    here. Frozen. Pretrained weights when asked and available, else a seeded random init with a
    :class:`PretrainedWeightsWarning` that says how to get them."""

    def __init__(self, backbone: str, blocks: Sequence[int], image_size: int, pretrained: bool,
                 seed: int = 0, norm: bool = False):
        super().__init__()
        timm = _timm()
        arch = backbone.split(".")[0]
        self.blocks, self.norm, self.weights_loaded = [int(b) for b in blocks], bool(norm), False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if pretrained:
                try:
                    self.model = timm.create_model(backbone, pretrained=True, img_size=image_size)
                    self.weights_loaded = True
                except Exception as exc:  # offline or no such weights: seeded random init
                    warnings.warn(_offline_message(backbone, arch, exc), PretrainedWeightsWarning,
                                  stacklevel=3)
                    torch.manual_seed(seed)
            if not self.weights_loaded:
                self.model = timm.create_model(arch, pretrained=False, img_size=image_size)
        depth = len(self.model.blocks)
        if not all(0 <= b < depth for b in self.blocks):
            raise ValueError(f"{backbone} has blocks 0..{depth - 1}; got {self.blocks}.")
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "ViTFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        from adlab.data.mvtec import normalize

        x = normalize(images.to(next(self.model.parameters())))
        return self.model.forward_intermediates(x, indices=self.blocks, norm=self.norm,
                                                output_fmt="NCHW", intermediates_only=True)


def images_of(data) -> torch.Tensor:
    """The ``[N, 3, H, W]`` image tensor of an ADDataset (``.images``) or of a tensor itself."""
    images = data.images if hasattr(data, "images") else data
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("Expected an ADDataset (adlab.data.mvtec.load_dataset) or a float tensor "
                         f"[N, 3, H, W] in [0, 1]; got {type(data).__name__}"
                         + (f" of shape {tuple(images.shape)}" if torch.is_tensor(images) else ""))
    if len(images) == 0:
        raise ValueError("No training images: the dataset is empty.")
    return images.float()


def batches(images: torch.Tensor, batch_size: int):
    """Consecutive slices of ``images`` of at most ``batch_size``."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ``int(truncate * sigma + 0.5)`` (scipy's convention)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Indices padding a length-``n`` axis by ``radius`` with symmetric reflection (d c b a | a b c d)."""
    idx = np.arange(-radius, n + radius) % (2 * n)
    return torch.from_numpy(np.where(idx < n, idx, 2 * n - 1 - idx))


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps.

    Same result as ``scipy.ndimage.gaussian_filter(map, sigma)`` with its defaults
    (``mode="reflect"``, ``truncate=4``), which the PaDiM reference code applies with
    sigma = 4. ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(maps)
    r = (len(kernel) - 1) // 2
    x = maps.unsqueeze(1)                                                    # [B, 1, H, W]
    x = x.index_select(3, _reflect_index(x.shape[3], r).to(x.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _reflect_index(x.shape[2], r).to(x.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def smooth_map(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Patch scores ``[B, h, w]`` -> anomaly map ``[B, H, W]`` at the input resolution.

    Bilinear upsampling to ``size``, then a Gaussian blur: PaDiM's reference code and
    PatchCore (Roth et al. 2022, Sec. 3.3: "smoothed with a Gaussian of kernel width
    sigma = 4") both use sigma = 4.
    """
    maps = F.interpolate(patch_scores.unsqueeze(1).float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


def topk_mean(maps: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Image score: mean of the ``k`` largest values of each map (``k = 1``: the max)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, min(int(k), flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


__all__ = ["FeatureExtractor", "PretrainedWeightsWarning", "create_backbone", "layer_names",
           "layer_indices", "images_of", "batches", "gaussian_blur", "gaussian_kernel1d",
           "smooth_map", "topk_mean", "TORCHVISION_WEIGHTS"]
