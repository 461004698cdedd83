"""PyramidFlow: "High-Resolution Defect Contrastive Localization using Pyramid Normalizing
Flow" (Lei, Hu, Wang & Liu, CVPR 2023).

No likelihood is modelled. A normalizing flow maps every image to a *latent pyramid*; the
flow is trained so that the latents of two defect-free images are as alike as possible,
and a test image is compared with the *latent template*, the mean latent of the training
images. Because the flow is invertible it cannot map everything to one point (it cannot
throw information away), and *volume normalisation* stops it from shrinking everything
towards zero instead. Where the paper leaves a detail open this file does what the official
code does (gasharper/PyramidFlow, commit 6977d5a; cited below as file:line):

1. Encoder (paper Fig. 2; ``model.py:303-313``): a fixed 1x1 convolution 3 -> C with
   orthogonal weights (``encoder="none"``, trained "from scratch", C = 16,
   ``train.py:120``), or the frozen stem of an ImageNet ResNet-18 (conv1 .. layer1,
   64 channels at a quarter of the input size; the official default, ``train.py:115``).
   Images are ImageNet-normalised first (``util.py:56-57, 80``).
2. Invertible pyramid (supplementary, "Invertible Pyramid"; ``model.py:32-84``): a
   Laplacian pyramid of the encoder's map: :func:`build_pyramid`, exactly undone by
   :func:`compose_pyramid`.
3. Pyramid coupling blocks (Fig. 3(c), 3(d), Algorithm 1; ``model.py:185-276``): affine
   couplings *across scales*: one level is scaled and shifted by a function of its
   neighbouring levels (resized to its size), then mixed over channels by an invertible
   1x1 convolution: :class:`PyramidCoupling`, :class:`DualPyramidCoupling`, stacked as
   ``model.py:291-300`` (:func:`pyramid_blocks`).
4. Volume normalisation (supplementary, "Volume Normalization"; ``model.py:87-104,
   174-176``): the log-scales of every coupling have their batch mean removed, and the 1x1
   convolutions have determinant 1: :class:`VolumeNorm`, :class:`VolumePreservingConv1x1`.
5. Loss (Fig. 2, "Fourier loss"; ``train.py:47-50``, ``util.py:121-134``): for every
   pair of images in the batch, the squared latent differences of each level are recomposed
   into one map, averaged over channels, and the mean magnitude of its 2-D Fourier transform
   is minimised: :func:`pairwise_differences`, :func:`fourier_loss`.
6. Template and map (Fig. 2; ``train.py:59-86``): the template is the mean latent pyramid
   of the training images (:func:`latent_template`); the anomaly map is the channel mean of
   the recomposed ``|latent - template|`` (:func:`anomaly_map`), the image score its
   maximum.

Where we differ from the official code, and why:

* The official code reports the epoch with the best *test* pixel AUROC (``train.py:92-95``).
  We train for a fixed number of steps and keep the last: nothing is chosen on test data.
  The template is computed, as in the official code, over the training images (its "val"
  split is the training folder without augmentation, ``util.py:72-73``).
* The official encoder runs under ``no_grad`` but in training mode (``model.py:320-321``
  inside ``flow.train()``), so a ResNet encoder's BatchNorm uses batch statistics and
  updates its running averages while the flow trains. Ours is frozen in eval mode: an
  image's features do not depend on its batch, and the template sees the same encoder as
  the test images.
* Training is counted in optimiser steps (the shared loop :func:`adlab.train.train`),
  not epochs; the paper profile's default, 15 epochs of batch 2 over ~250 images
  (``train.py:40``), is about 1900 steps.
* The ResNet encoder is timm's ``resnet18`` (same ImageNet weights as torchvision's); in the
  quick profile it is randomly initialised, as every quick-profile backbone.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.flows.coupling import soft_clamp
from adlab.flows.permute import InvertibleConv1x1

#: The official defaults by MVTec AD category (``train.py:130-142``): spatial volume
#: normalisation for these categories, channel volume normalisation for the others ...
SVN_CATEGORIES = ("carpet", "grid", "bottle", "transistor")
#: ... and 8 pyramid levels for these, 2 for screw, 4 for the others.
EIGHT_LEVEL_CATEGORIES = ("metal_nut", "carpet", "transistor")
#: Categories trained with random flips and 90-degree rotations (``util.py:60-67``: the
#: MVTec AD textures); our synthetic textures are added.
TEXTURE_CATEGORIES = ("carpet", "leather", "tile", "wood", "grid", "weave", "stone")


@dataclass
class PyramidFlowConfig:
    """PyramidFlow hyperparameters; defaults follow the active profile."""

    # Encoder (Sec. 4 / supplementary "Pre-trained method"): "none" = a fixed orthogonal 1x1 conv
    # 3 -> channels ("from scratch"); "resnet18" = ImageNet ResNet-18 conv1..layer1, 64 channels
    # (the official default, train.py:115). Quick: "none", the paper's claim that no
    # pretrained model is needed (and a random-init ResNet would carry no ImageNet prior).
    encoder: str = field(default_factory=lambda: by_profile(quick="none", paper="resnet18"))
    # Side of the map the flow works on. Official: 256 (train.py:22: 256 px images for "none",
    # 1024 px for the ResNet, whose stem divides by 4). Quick: 64, about 16x less work.
    flow_size: int = field(default_factory=lambda: by_profile(quick=64, paper=256))
    # Flow channels for encoder "none" (official --numChannel 16, train.py:120); the ResNet
    # stem fixes 64 (model.py:288). Quick: 8, a quarter of the work in every subnet conv.
    channels: int = field(default_factory=lambda: by_profile(quick=8, paper=16))
    # Pyramid levels (official --numLayer auto, train.py:136-142: 4; 8 for metal_nut, carpet,
    # transistor; 2 for screw). None: the official choice for the category, else 4.
    levels: int | None = None
    # Stacks of coupling blocks (official --numStack 4, train.py:121).
    stacks: int = field(default_factory=lambda: by_profile(quick=2, paper=4))
    # Kernel of both subnet convs (official --kernelSize 7, train.py:119). Quick: 5.
    kernel_size: int = field(default_factory=lambda: by_profile(quick=5, paper=7))
    # Soft clamp of the log-scales, 2 * 0.636 * atan(s / 2) (model.py:110, 127).
    clamp: float = 2.0
    # Volume normalisation: "CVN" (batch mean over batch and channels, model.py:89-92), "SVN"
    # (over batch and positions) or "none" (the ablation). None: the official choice for the
    # category (train.py:130-131: SVN for carpet, grid, bottle, transistor, else CVN).
    volume_norm: str | None = None
    # Random flips and rot90 while training (util.py:60-67: textures only). None: by category.
    augment: bool | None = None
    # Adam as the official code (train.py:23, "using cs-flow optimizer"): lr 2e-4, betas
    # (0.5, 0.9), eps 1e-4, weight decay 1e-5; gradient norm clipped at 1 (train.py:52).
    lr: float = 2e-4
    betas: tuple = (0.5, 0.9)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    # Batch (official --batchSize 2, train.py:124: one pair). Quick: 4 images, 6 pairs per step.
    batch_size: int = field(default_factory=lambda: by_profile(quick=4, paper=2))
    # Optimiser steps. Official: 15 epochs (train.py:40): ~1900 steps of 2 for 250 images.
    # Quick: 40 steps (160 images, under 3 passes over the 60 synthetic training images).
    steps: int = field(default_factory=lambda: by_profile(quick=40, paper=2000))
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0
    predict_batch: int = 16    # images per forward pass at test time (memory only)
    # Train and predict with one CPU thread (see one_thread); the paper-size flow wants all.
    single_thread: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))


# ----------------------------------------------------------------------------- the pyramid

def binomial_kernel() -> Tensor:
    """The 5 x 5 binomial (Gaussian-like) kernel ``[1 4 6 4 1]^T [1 4 6 4 1] / 256`` (model.py:35-45)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    return torch.outer(k, k) / 256.0


def blur(x: Tensor) -> Tensor:
    """Each channel convolved with :func:`binomial_kernel`, zero padding (model.py:52-53)."""
    c = x.shape[1]
    kernel = binomial_kernel().to(x).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2)), kernel, groups=c)


def pyramid_down(x: Tensor) -> Tensor:
    """``D(x)``: blur, then 2 x 2 max pooling (the official code pools by max, model.py:55)."""
    return F.max_pool2d(blur(x), 2)


def pyramid_up(x: Tensor, size) -> Tensor:
    """``U(x)``: nearest-neighbour upsampling to ``size``, then blur (model.py:58-66)."""
    return blur(F.interpolate(x, size=tuple(size), mode="nearest"))


def build_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Supplementary "Invertible Pyramid": ``x -> [x_0, ..., x_{L-1}]``, finest first.

    With the Gaussian pyramid ``g_0 = x``, ``g_{l+1} = D(g_l)``: the detail levels
    ``x_l = g_l - U(g_{l+1})`` for ``l < L - 1``, and the coarsest level ``x_{L-1} = g_{L-1}``
    (model.py:68-77). Any ``D`` and ``U`` make this invertible (:func:`compose_pyramid`).
    """
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyramid_down(gaussian[-1]))
    details = [g - pyramid_up(g_next, g.shape[-2:]) for g, g_next in zip(gaussian, gaussian[1:])]
    return details + [gaussian[-1]]


def compose_pyramid(pyramid: list[Tensor]) -> Tensor:
    """The inverse of :func:`build_pyramid`: ``g_{L-1} = x_{L-1}``, ``g_l = x_l + U(g_{l+1})``.

    Linear in the levels, so it also recomposes level-wise differences (model.py:79-84).
    """
    g = pyramid[-1]
    for detail in reversed(pyramid[:-1]):
        g = detail + pyramid_up(g, detail.shape[-2:])
    return g


# ----------------------------------------------------------------------------- the flow

class VolumeNorm(nn.Module):
    """Supplementary "Volume Normalization" (model.py:87-104): remove the mean log-scale.

    Training: ``s <- s - mean(s)``, the mean over the batch and the channels ("CVN", one
    value per position) or over the batch and the positions ("SVN", one value per channel);
    a running mean (momentum 0.1) is kept and subtracted at test time, as BatchNorm does.
    ``mode="none"`` returns ``s`` unchanged. ``shape`` is the log-scale's ``(C, H, W)``: the
    running mean starts at 0 with the shape the batch mean will have (the official buffer
    starts as a broadcastable zero and takes that shape at the first update).
    """

    DIMS = {"CVN": (0, 1), "SVN": (0, 2, 3)}

    def __init__(self, mode: str, shape: tuple[int, int, int], momentum: float = 0.1):
        super().__init__()
        if mode not in ("CVN", "SVN", "none"):
            raise ValueError(f"volume_norm must be 'CVN', 'SVN' or 'none'; got {mode!r}.")
        self.mode, self.momentum = mode, momentum
        c, h, w = shape
        self.register_buffer("running_mean", torch.zeros((1, 1, h, w) if mode == "CVN"
                                                         else (1, c, 1, 1)))

    def forward(self, s: Tensor) -> Tensor:
        if self.mode == "none":
            return s
        if not self.training:
            return s - self.running_mean
        mean = s.mean(dim=self.DIMS[self.mode], keepdim=True)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        return s - mean


class VolumePreservingConv1x1(InvertibleConv1x1):
    """Glow's LU 1x1 convolution whose log-diagonal is centred: ``det W = +-1`` (model.py:174-176).

    With ``centre=False`` it is :class:`~adlab.flows.permute.InvertibleConv1x1` unchanged
    (the "none" ablation; the official class would fail then, model.py:175-176).
    """

    def __init__(self, channels: int, seed: int | None = None, centre: bool = True):
        super().__init__(channels, seed)
        self.centre = centre

    def log_diagonal(self) -> Tensor:
        return self.log_s - self.log_s.mean() if self.centre else self.log_s

    def upper(self) -> Tensor:
        return torch.triu(self.U, diagonal=1) + torch.diag(self.sign_s * torch.exp(self.log_diagonal()))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = math.prod(x.shape[2:]) * self.log_diagonal().sum()
        return self._mix(self.weight(), x), logdet.expand(x.shape[0]).clone()


class AffineParams(nn.Module):
    """The subnet of a pyramid coupling (model.py:106-130): ``(s, t)`` from the conditioning levels.

    Conv(k) - LeakyReLU(0.01) - Conv(k), no biases, hidden = out = 2 C channels, the last
    conv zero-initialised (so every coupling starts as the identity); ``s`` is soft-clamped,
    ``clamp * 0.636 * atan(s / clamp)``, then volume-normalised.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, clamp: float,
                 norm: VolumeNorm):
        super().__init__()
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 2 * channels, kernel_size, padding=pad, bias=False),
            nn.LeakyReLU(0.01),
            nn.Conv2d(2 * channels, 2 * channels, kernel_size, padding=pad, bias=False))
        nn.init.zeros_(self.net[-1].weight)
        self.clamp, self.norm = clamp, norm

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(h).chunk(2, dim=1)
        return self.norm(soft_clamp(s, self.clamp, "atan")), t


def _resize(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class PyramidCoupling(nn.Module):
    """Fig. 3(c), the scale-wise coupling between levels ``i`` and ``i + 1`` (model.py:185-239).

    ``direction="down"``: the coarser level is transformed, with ``(s, t)`` computed from the
    finer level at its own size and then resized (nearest) to the coarser one;
    ``direction="up"``: the finer level is transformed, from the coarser level resized
    (nearest) first. ``y = W (x * exp(s) + t)`` with ``W`` the 1x1 convolution;
    ``log|det J| = sum s + h w log|det W|`` per sample.
    """

    def __init__(self, level: int, direction: str, channels: int, shapes, kernel_size: int = 7,
                 clamp: float = 2.0, volume_norm: str = "CVN", seed: int = 0):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down'; got {direction!r}.")
        self.level, self.direction = level, direction
        self.target = level + 1 if direction == "down" else level
        # (s, t) live at the finer level's size: computed there ("down") or resized there ("up")
        norm = VolumeNorm(volume_norm, (channels, *shapes[level]))
        self.params = AffineParams(channels, channels, kernel_size, clamp, norm)
        self.mix = VolumePreservingConv1x1(channels, seed, centre=volume_norm != "none")

    def _scale_shift(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        fine, coarse = levels[self.level], levels[self.level + 1]
        if self.direction == "up":
            return self.params(_resize(coarse, fine))
        s, t = self.params(fine)
        return _resize(s, coarse), _resize(t, coarse)

    def forward(self, levels: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        s, t = self._scale_shift(levels)
        y, logdet = self.mix(levels[self.target] * torch.exp(s) + t)
        out = list(levels)
        out[self.target] = y
        return out, logdet + s.flatten(1).sum(1)

    def inverse(self, levels: list[Tensor]) -> list[Tensor]:
        out = list(levels)
        out[self.target] = self.mix.inverse(levels[self.target])
        s, t = self._scale_shift(out)            # the conditioning level is unchanged
        out[self.target] = (out[self.target] - t) * torch.exp(-s)
        return out


class DualPyramidCoupling(PyramidCoupling):
    """Fig. 3(d), level ``i + 1`` transformed from levels ``i`` and ``i + 2`` (model.py:242-276).

    Both neighbours are resized (nearest) to level ``i + 1`` and concatenated (2 C channels)
    as the subnet's input.
    """

    def __init__(self, level: int, channels: int, shapes, kernel_size: int = 7,
                 clamp: float = 2.0, volume_norm: str = "CVN", seed: int = 0):
        nn.Module.__init__(self)
        self.level, self.direction, self.target = level, "dual", level + 1
        norm = VolumeNorm(volume_norm, (channels, *shapes[level + 1]))
        self.params = AffineParams(2 * channels, channels, kernel_size, clamp, norm)
        self.mix = VolumePreservingConv1x1(channels, seed, centre=volume_norm != "none")

    def _scale_shift(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        middle = levels[self.level + 1]
        h = torch.cat([_resize(levels[self.level], middle), _resize(levels[self.level + 2], middle)], 1)
        return self.params(h)


def pyramid_blocks(levels: int) -> list[tuple[str, int]]:
    """The order of couplings in one stack, as ``(kind, level)`` (model.py:291-300, Fig. 3(e)).

    First the even-indexed couplings (a dual coupling at ``i = 0, 2, ...`` while ``i + 2``
    exists, else a "down" coupling at the last pair), then an "up" coupling at level 0 and the
    odd-indexed ones. 4 levels: dual 0, down 2, up 0, dual 1.
    """
    blocks = []
    for start in (0, 1):
        if start == 1:
            blocks.append(("up", 0))
        for i in range(start, levels, 2):
            if i + 2 < levels:
                blocks.append(("dual", i))
            elif i + 1 < levels:
                blocks.append(("down", i))
    return blocks


class PyramidFlowNet(nn.Module):
    """The pyramid normalizing flow: a list of levels ``[B, C, H/2^l, W/2^l]`` in and out.

    ``forward(levels) -> (latents, logdet[B])``, ``inverse(latents) -> levels``. The
    log-det is exact (and tested) but, as in the paper, not used by the loss.
    """

    def __init__(self, channels: int, size: int, levels: int = 4, stacks: int = 4,
                 kernel_size: int = 7, clamp: float = 2.0, volume_norm: str = "CVN", seed: int = 0):
        super().__init__()
        shapes = [(size // 2 ** level,) * 2 for level in range(levels)]
        layers = []
        for k, (kind, level) in enumerate(pyramid_blocks(levels) * stacks):
            args = dict(kernel_size=kernel_size, clamp=clamp, volume_norm=volume_norm, seed=seed + k)
            layers.append(DualPyramidCoupling(level, channels, shapes, **args) if kind == "dual"
                          else PyramidCoupling(level, kind, channels, shapes, **args))
        self.layers = nn.ModuleList(layers)

    def forward(self, levels: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        logdet = levels[0].new_zeros(levels[0].shape[0])
        for layer in self.layers:
            levels, ld = layer(levels)
            logdet = logdet + ld
        return levels, logdet

    def inverse(self, levels: list[Tensor]) -> list[Tensor]:
        for layer in reversed(self.layers):
            levels = layer.inverse(levels)
        return levels


# ----------------------------------------------------------------------------- loss, map

def pairwise_differences(latents: list[Tensor]) -> list[Tensor]:
    """``(Y_i - Y_j)^2`` for every pair ``i < j`` of the batch, per level (util.py:121-134, p = 2)."""
    b = latents[0].shape[0]
    if b < 2:
        raise ValueError("PyramidFlow's loss compares pairs of images: the batch needs at least "
                         f"2 images (got {b}); raise batch_size or add training images.")
    i, j = torch.triu_indices(b, b, offset=1, device=latents[0].device)
    return [(y[i] - y[j]) ** 2 for y in latents]


def fourier_loss(latents: list[Tensor]) -> Tensor:
    """Fig. 2 "Fourier loss" (train.py:47-50): ``mean |FFT2(mean_c compose((Y_i - Y_j)^2))|``.

    The squared differences of every pair are recomposed through the pyramid into one
    full-size map per pair, averaged over channels, and the magnitude of its 2-D discrete
    Fourier transform is averaged over pairs and frequencies.
    """
    diff = compose_pyramid(pairwise_differences(latents)).mean(1)          # [pairs, H, W]
    return torch.fft.fft2(diff).abs().mean()


@torch.no_grad()
def latent_template(latents: list[list[Tensor]]) -> list[Tensor]:
    """Fig. 2: the latent template, the mean latent pyramid over the training images.

    ``latents`` is a list of batches, each a list of levels; returns one ``[1, C, h, w]``
    tensor per level (train.py:61-68).
    """
    n = sum(batch[0].shape[0] for batch in latents)
    return [sum(batch[l].sum(0, keepdim=True) for batch in latents) / n
            for l in range(len(latents[0]))]


def anomaly_map(latents: list[Tensor], template: list[Tensor]) -> Tensor:
    """Fig. 2 (train.py:77-78): ``mean_c compose(|Y_l - T_l|)``, a ``[B, H, W]`` map."""
    return compose_pyramid([(y - t).abs() for y, t in zip(latents, template)]).mean(1)


# ----------------------------------------------------------------------------- the detector

class Encoder(nn.Module):
    """Frozen map ``images [B, 3, H, W] in [0, 1] -> [B, C, h, w]`` (model.py:303-313, 320-321).

    ``"none"``: ImageNet normalisation, then a fixed 1x1 convolution 3 -> ``channels`` with
    orthogonal weights (seeded); ``"resnet18"`` / ``"resnet34"``: timm's conv1 .. layer1
    (64 channels, stride 4), ImageNet weights in the paper profile. Always in eval mode.
    """

    def __init__(self, kind: str, channels: int, pretrained: bool | None = None, seed: int = 0):
        super().__init__()
        from adlab.config import profile
        from adlab.features import create_backbone

        self.kind = kind
        if kind == "none":
            self.conv = nn.Conv2d(3, channels, 1, bias=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.orthogonal_(self.conv.weight)
            self.channels, self.stride = channels, 1
        elif kind in ("resnet18", "resnet34"):
            pretrained = profile().pretrained if pretrained is None else bool(pretrained)
            self.net, self.weights_loaded = create_backbone(kind, (1,), pretrained, seed)
            self.channels, self.stride = 64, 4
        else:
            raise ValueError(f"encoder must be 'none', 'resnet18' or 'resnet34'; got {kind!r}.")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen: stays in eval mode whatever is asked."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        from adlab.data.mvtec import normalize

        x = normalize(images)
        return self.conv(x) if self.kind == "none" else self.net(x)[0]


def augment(images: Tensor) -> Tensor:
    """Random horizontal / vertical flips and a random rot90, each with probability 0.5, per image
    (util.py:61, albumentations HorizontalFlip, VerticalFlip, RandomRotate90)."""
    out = []
    for x in images:
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if torch.rand(()) < 0.5:
            x = x.flip(-2)
        if torch.rand(()) < 0.5:
            x = torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))
        out.append(x)
    return torch.stack(out)


@contextmanager
def one_thread(enabled: bool = True):
    """Run the block with one PyTorch CPU thread (``single_thread`` in the config).

    The quick flow's convolutions are tiny (8 channels at 64 px): splitting each over two
    threads saves little, and on a shared CPU it costs a lot, because every operation waits
    for both threads. Measured on the 2-core machine with other jobs running, 40 training
    steps on ``weave`` took ~35 s with one thread and ~10 min with two.
    """
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class PyramidFlow:
    """PyramidFlow detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``flow`` (the :class:`PyramidFlowNet`), ``encoder``, ``template`` (one
    tensor per level), ``history`` (the training loss per step), ``levels``, ``volume_norm``
    and ``augment`` (the values resolved for the category).
    """

    Config = PyramidFlowConfig

    def __init__(self, config: PyramidFlowConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(PyramidFlowConfig, config, overrides)
        self.device = device()
        self.flow = self.template = None

    def _resolve(self, category: str | None) -> None:
        """The official per-category choices (train.py:130-142, util.py:60-67)."""
        c = self.config
        self.levels = c.levels or (8 if category in EIGHT_LEVEL_CATEGORIES else
                                   2 if category == "screw" else 4)
        self.volume_norm = c.volume_norm or ("SVN" if category in SVN_CATEGORIES else "CVN")
        self.augment = c.augment if c.augment is not None else category in TEXTURE_CATEGORIES
        if c.flow_size % 2 ** (self.levels - 1):
            raise ValueError(f"flow_size={c.flow_size} must be divisible by 2^(levels-1) = "
                             f"{2 ** (self.levels - 1)}; change flow_size or levels.")

    def _input(self, images: Tensor) -> Tensor:
        side = self.config.flow_size * self.encoder.stride
        images = images.to(self.device).float()
        if images.shape[-2:] != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                                   antialias=True)
        return images

    def latents(self, images: Tensor) -> list[Tensor]:
        """Images ``[B, 3, H, W]`` in [0, 1] -> the latent pyramid (a list of levels)."""
        feat = self.encoder(self._input(images))
        return self.flow(build_pyramid(feat, self.levels))[0]

    def loss(self, images: Tensor) -> Tensor:
        """The training objective on one batch: :func:`fourier_loss` of its latents."""
        if self.augment:
            images = augment(images)
        return fourier_loss(self.latents(images))

    def fit(self, train, progress: bool = True) -> "PyramidFlow":
        """Train the flow on defect-free images (the Fourier loss), then take the template."""
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress)

    def _build(self) -> None:
        """The encoder and an untrained flow for the resolved levels and volume normalisation."""
        c = self.config
        self.encoder = Encoder(c.encoder, c.channels, c.pretrained, c.seed).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.flow = PyramidFlowNet(self.encoder.channels, c.flow_size, self.levels, c.stacks,
                                       c.kernel_size, c.clamp, self.volume_norm,
                                       c.seed).to(self.device)

    def training_run(self, train, steps: int | None = None):
        """Encoder, flow, the Fourier loss on random batches, for :func:`adlab.train.train`."""
        from adlab.features import images_of
        from adlab.train import RandomBatches, TrainingRun

        c = self.config
        images = images_of(train)
        if len(images) < 2:
            raise ValueError("PyramidFlow trains on pairs of images: it needs at least 2 training "
                             f"images, got {len(images)}.")
        self._resolve(getattr(train, "category", None))
        self._build()
        optimizer = ClippedAdam(self.flow.parameters(), c.grad_clip, lr=c.lr, betas=c.betas,
                                eps=c.eps, weight_decay=c.weight_decay)

        def loss_fn(batch: Tensor) -> Tensor:
            if len(batch) < 2:      # an epoch's last, single image: pair it with a random one
                batch = torch.cat([batch, images[torch.randint(len(images), (1,))]])
            return self.loss(batch)

        batches_ = RandomBatches(images, min(c.batch_size, len(images)), c.seed)
        return TrainingRun(loss_fn, batches_, steps or c.steps, optimizer, {"flow": self.flow},
                           seed=c.seed, desc="PyramidFlow", extra={"images": images},
                           context=lambda: one_thread(c.single_thread))

    def finish_training(self, run) -> None:
        """After the loop: the latent template of the training images."""
        from adlab.features import batches

        self.history = run.history
        self.flow.eval()
        with torch.no_grad():
            self.template = latent_template([self.latents(b) for b in
                                             batches(run.extra["images"], self.config.predict_batch)])

    def state_dict(self) -> dict:
        """Encoder and flow weights, the template (see ``adlab.detector.save_detector``)."""
        return get_state(self, ("levels", "volume_norm", "augment", "encoder", "flow", "template",
                                "history"))

    def load_state_dict(self, state: dict) -> None:
        self.levels, self.volume_norm = state["levels"], state["volume_norm"]
        self._build()
        set_state(self, state)
        self.flow.eval()

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Map = channel mean of the recomposed ``|latent - template|``, upsampled (bilinear) to
        the input size; image score = the map's maximum (train.py:86)."""
        if self.template is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"predict expects images [B, 3, H, W] in [0, 1]; got shape "
                             f"{tuple(images.shape)}.")
        self.flow.eval()
        with one_thread(self.config.single_thread):
            maps = anomaly_map(self.latents(images), self.template)
        maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)


class ClippedAdam(torch.optim.Adam):
    """Adam that first clips the gradient norm of all its parameters to ``max_norm`` (train.py:52).

    The shared loop calls ``optimizer.step()`` right after ``backward()``, so clipping here is
    the official order (clip, then step).
    """

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        nn.utils.clip_grad_norm_(params, self.max_norm)
        return super().step(closure)


__all__ = ["PyramidFlow", "PyramidFlowConfig", "PyramidFlowNet", "PyramidCoupling",
           "DualPyramidCoupling", "VolumeNorm", "VolumePreservingConv1x1", "AffineParams",
           "Encoder", "binomial_kernel", "blur", "pyramid_down", "pyramid_up", "build_pyramid",
           "compose_pyramid", "pyramid_blocks", "pairwise_differences", "fourier_loss",
           "latent_template", "anomaly_map", "augment"]
