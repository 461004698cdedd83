"""CS-Flow: "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection"
(Rudolph, Wehrbein, Rosenhahn & Wandt, WACV 2022).

One normalizing flow models the CNN feature maps of an image seen at three sizes at once.
Its couplings are fully convolutional and exchange information between the scales, so the
likelihood of a feature cell depends on its neighbourhood and on the coarser and finer views
of the same place. Where the paper leaves a detail open this file does what the official
code does (marco-rudolph/cs-flow, commit 88a13b8; cited below as file:line):

1. Multi-scale features (paper Sec. 3.1): the image and two copies shrunk by 2 and 4
   (nearest-neighbour ``F.interpolate``, ``model.py:54``) go through the same frozen
   backbone; EfficientNet-B5 up to block 35, 304 channels at stride 32
   (``model.py:44-52``, ``config.py:33``): maps of 24^2, 12^2 and 6^2 cells at 768 px.
   The features are extracted once, before training (``config.py:12`` ``pre_extracted``).
2. Cross-scale flow (paper Sec. 3.2): 4 blocks (``config.py:24``), each a fixed random
   channel permutation per scale and a two-sided affine coupling whose subnetwork sees all
   scales: per scale a conv, LeakyReLU(0.1), a conv, plus the hidden map of the next finer
   scale through a strided conv and that of the next coarser scale upsampled and through a
   conv; the result is multiplied by a learned scalar ``gamma`` per scale that starts at 0,
   so every block starts as the identity (``freia_funcs.py:23-109``). The log-scale is
   soft-clamped with ``3 * 0.636 * atan(s / 3)`` (``freia_funcs.py:180-184``, clamp 3,
   ``config.py:22``).
3. Objective (paper Sec. 3.3): the negative log-likelihood per dimension,
   ``mean_batch(||z||^2 / 2 - log|det J|) / D`` over all scales together (``utils.py:26-29``).
4. Scores (paper Sec. 3.4): image score = mean over every latent dimension of ``z^2 / 2``
   (``train.py:67-68``); the map (mean over channels of ``z^2`` at the finest scale,
   bilinearly upsampled, ``evaluate.py:176-178`` and ``127``) is for pictures in the repo;
   here it gives the pixel metrics.

Differences from the official code, and why: the official script evaluates on the *test*
set every 60 epochs and its summary reports the best of those AUROCs (``train.py:50-82``,
``Score_Observer``); we train for the configured number of epochs and keep the last weights,
so nothing is chosen on test data (there is nothing to choose, hence no validation split).
Its reverse pass reads ``t`` from the wrong subnetwork output (``freia_funcs.py:227-229``;
the code never runs it); ours is the exact inverse (tested). The backbone comes from timm
(see :class:`CSFlowConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.features import batches, create_backbone, images_of
from adlab.flows.core import FlowLayer, sum_except_batch
from adlab.flows.coupling import soft_clamp
from adlab.flows.permute import RandomPermutation


@dataclass
class CSFlowConfig:
    """CS-Flow hyperparameters; defaults follow the active profile (quick | paper)."""

    # Paper Sec. 4 / model.py:42: EfficientNet-B5, ImageNet weights of lukemelas'
    # EfficientNet-PyTorch (converted TensorFlow weights, TF "same" padding). timm's ports of
    # the TensorFlow weights are the tf_efficientnet_b5 tags; we take the AutoAugment one.
    # Quick: a random-init ResNet-18 (the quick profile never loads weights).
    backbone: str = field(default_factory=lambda: by_profile(
        quick="resnet18", paper="tf_efficientnet_b5.aa_in1k"))
    # model.py:44-52: the output of block 35 of 39 (304 channels, stride 32), the last block of
    # stage 5. timm names that stage "blocks.5" (its features_only indices stop at blocks.4 and
    # blocks.6, so the trunk is cut by name, see feature_trunk). Quick: "layer1" (64 channels,
    # stride 4): a 32 x 32 finest map at 128 px (seed 0, weave / stone image AUROC 0.761 / 0.883
    # with layer2, 0.806 / 0.934 with layer1).
    layer: str = field(default_factory=lambda: by_profile(quick="layer1", paper="blocks.5"))
    # config.py:16: the largest scale is 768 x 768 (the others 384, 192). The detector resizes
    # its input to this side (load the data at 768 px to avoid upsampling); None keeps the
    # input size (quick: the profile's 128 px).
    input_size: int | None = field(default_factory=lambda: by_profile(quick=None, paper=768))
    # config.py:21: n_scales = 3 (image, 1/2, 1/4).
    n_scales: int = 3
    # config.py:24: n_coupling_blocks = 4.
    n_blocks: int = 4
    # config.py:25: fc_internal = 1024 hidden channels in every subnetwork conv. Quick: 32
    # (a training step costs ~0.4 s of one CPU core at 128 px with 32 and layer1 features).
    hidden: int = field(default_factory=lambda: by_profile(quick=32, paper=1024))
    # config.py:38: kernel 3 in every block but the last, which uses 5. None: that rule.
    kernel_sizes: tuple | None = None
    # config.py:22: clamp = 3 for the atan soft clamp (freia_funcs.py:182).
    clamp: float = 3.0
    # freia_funcs.py:27: LeakyReLU slope 0.1 in the subnetwork.
    leaky_slope: float = 0.1
    # Sec. 3.2: the cross-scale connections; False gives independent scales (the ablation).
    cross_scale: bool = True
    # config.py:42-43: 4 x 60 = 240 epochs. Quick: 12 epochs of 60 images, 96 steps of 8.
    epochs: int = field(default_factory=lambda: by_profile(quick=12, paper=240))
    # config.py:37: batch_size = 16. Quick: 8 (more, cheaper steps).
    batch_size: int = field(default_factory=lambda: by_profile(quick=8, paper=16))
    # train.py:12 and config.py:26: Adam, lr 2e-4, eps 1e-4, weight decay 1e-5. Quick: 2e-3
    # for the few steps a CPU can afford.
    lr: float = field(default_factory=lambda: by_profile(quick=2e-3, paper=2e-4))
    eps: float = 1e-4
    weight_decay: float = 1e-5
    # train.py:43 and config.py:23: the gradient norm is clipped to 1 before every step.
    max_grad_norm: float = 1.0
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0               # flow initialisation, batch order, random-init backbone
    feature_batch: int = 16     # images per feature-extraction batch (memory only)

    def block_kernels(self) -> tuple:
        """The kernel size of each coupling block (config.py:38 when ``kernel_sizes`` is None)."""
        if self.kernel_sizes is None:
            return (3,) * (self.n_blocks - 1) + (5,)
        if len(self.kernel_sizes) != self.n_blocks:
            raise ValueError(f"kernel_sizes has {len(self.kernel_sizes)} entries for "
                             f"{self.n_blocks} blocks; give one odd size per block.")
        return tuple(self.kernel_sizes)


# ----------------------------------------------------------------------------- Sec. 3.1

def image_pyramid(images: Tensor, n_scales: int = 3) -> list[Tensor]:
    """Sec. 3.1: the image and copies shrunk by 2, 4, ... (nearest neighbour, ``model.py:54``).

    ``F.interpolate``'s default mode is "nearest", which is what the official code calls.
    """
    h, w = images.shape[-2:]
    return [images] + [F.interpolate(images, size=(h // 2 ** s, w // 2 ** s))
                       for s in range(1, n_scales)]


def feature_trunk(backbone: str, layer: str, pretrained: bool, seed: int = 0) -> nn.Module:
    """The frozen backbone from its input up to ``layer`` (its output is the feature map).

    ``layer`` names a top-level part of timm's feature model (``"layer2"`` of a ResNet) or a
    stage inside one (``"blocks.5"`` of an EfficientNet: stem, then stages 0..5). Weights and
    the offline rule come from :func:`adlab.features.create_backbone`.
    """
    from adlab.features import layer_names

    model, _ = create_backbone(backbone, (len(layer_names(backbone)) - 1,), pretrained, seed)
    parts = []
    for name, child in model.named_children():
        if name == layer:
            parts.append(child)
            break
        if layer.startswith(name + ".") and layer[len(name) + 1:].isdigit():
            parts.extend(child[:int(layer[len(name) + 1:]) + 1])
            break
        parts.append(child)
    else:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"{backbone} has no part {layer!r}; use one of {names} or a stage "
                         f"inside one, e.g. 'blocks.5'.")
    trunk = nn.Sequential(*parts).eval()
    trunk.requires_grad_(False)
    return trunk


# ----------------------------------------------------------------------------- Sec. 3.2

class CrossScaleSubnet(nn.Module):
    """The subnetwork of a cross-scale coupling: all scales in, one output per scale.

    Per scale ``i`` (``freia_funcs.py:82-109``): ``h_i = LeakyReLU(conv(x_i))`` and

        out_i = gamma_i * ( conv(h_i) + conv(up(h_{i+1})) + conv_stride2(h_{i-1}) )

    with ``up`` bilinear x2, every conv ``kernel_size`` with zero padding, separate weights per
    scale and per connection, and ``gamma_i`` a learned scalar initialised to 0. Scale 0 is the
    finest. ``cross_scale=False`` drops the two neighbour terms (independent scales).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int = 3,
                 n_scales: int = 3, leaky_slope: float = 0.1, cross_scale: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the map size (got {kernel_size}).")

        def conv(i, o, stride=1):
            return nn.Conv2d(i, o, kernel_size, stride=stride, padding=kernel_size // 2)

        self.leaky_slope, self.cross_scale = leaky_slope, cross_scale
        self.inner = nn.ModuleList(conv(in_channels, hidden) for _ in range(n_scales))
        self.outer = nn.ModuleList(conv(hidden, out_channels) for _ in range(n_scales))
        n_links = n_scales - 1 if cross_scale else 0
        self.up = nn.ModuleList(conv(hidden, out_channels) for _ in range(n_links))      # i+1 -> i
        self.down = nn.ModuleList(conv(hidden, out_channels, 2) for _ in range(n_links))  # i -> i+1
        self.gamma = nn.Parameter(torch.zeros(n_scales))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        h = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.inner, xs)]
        out = [conv(h_i) for conv, h_i in zip(self.outer, h)]
        for i in range(len(self.up)):
            out[i] = out[i] + self.up[i](F.interpolate(h[i + 1], scale_factor=2, mode="bilinear",
                                                       align_corners=False))
            out[i + 1] = out[i + 1] + self.down[i](h[i])
        return [g * o for g, o in zip(self.gamma, out)]


class ParallelPermutation(FlowLayer):
    """A fixed random channel permutation per scale (``freia_funcs.py:112-146``); log-det 0.

    As the official code, block ``k`` draws its permutations from NumPy's generator seeded
    with ``k`` (``np.random.seed(k)``, then one ``np.random.permutation(C)`` per scale).
    """

    def __init__(self, channels: int, n_scales: int, seed: int):
        super().__init__()
        rng = np.random.RandomState(seed)
        self.perms = nn.ModuleList(RandomPermutation(channels, perm=torch.from_numpy(
            rng.permutation(channels))) for _ in range(n_scales))

    def forward(self, xs: list[Tensor], cond=None) -> tuple[list[Tensor], Tensor]:
        return [p(x)[0] for p, x in zip(self.perms, xs)], xs[0].new_zeros(len(xs[0]))

    def inverse(self, zs: list[Tensor], cond=None) -> list[Tensor]:
        return [p.inverse(z) for p, z in zip(self.perms, zs)]


class CrossScaleCoupling(FlowLayer):
    """Sec. 3.2: a two-sided affine coupling of all scales at once (``freia_funcs.py:156-248``).

    Each scale's map is split along channels into ``x_1`` (the first ``C // 2``) and ``x_2``;
    with ``sigma(s) = clamp * 0.636 * atan(s / clamp)`` and the subnetworks of
    :class:`CrossScaleSubnet` (each sees every scale):

        [s_1, t_1] = subnet_1(x_2),   y_1 = x_1 * exp(sigma(s_1)) + t_1
        [s_2, t_2] = subnet_2(y_1),   y_2 = x_2 * exp(sigma(s_2)) + t_2

    ``log|det J| = sum sigma(s_1) + sum sigma(s_2)`` over channels, positions and scales. The
    outputs are clipped to +-1e6 as the official code (``freia_funcs.py:239-241``).
    """

    def __init__(self, channels: int, hidden: int, kernel_size: int = 3, n_scales: int = 3,
                 clamp: float = 3.0, leaky_slope: float = 0.1, cross_scale: bool = True):
        super().__init__()
        if channels < 2:
            raise ValueError(f"A coupling needs at least 2 channels to split (got {channels}).")
        self.split = (channels // 2, channels - channels // 2)
        self.clamp = clamp
        kw = dict(hidden=hidden, kernel_size=kernel_size, n_scales=n_scales,
                  leaky_slope=leaky_slope, cross_scale=cross_scale)
        self.subnet_1 = CrossScaleSubnet(self.split[1], 2 * self.split[0], **kw)
        self.subnet_2 = CrossScaleSubnet(self.split[0], 2 * self.split[1], **kw)

    def scale_and_shift(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """A subnet output ``[s, t]`` -> ``(sigma(s), t)``: the atan soft clamp of the log-scale."""
        s, t = r.chunk(2, dim=1)
        return soft_clamp(s, self.clamp, "atan"), t

    def forward(self, xs: list[Tensor], cond=None) -> tuple[list[Tensor], Tensor]:
        x1, x2 = zip(*[x.split(self.split, dim=1) for x in xs])
        logdet = xs[0].new_zeros(len(xs[0]))
        y1 = []
        for x, r in zip(x1, self.subnet_1(list(x2))):
            s, t = self.scale_and_shift(r)
            y1.append(x * torch.exp(s) + t)
            logdet = logdet + sum_except_batch(s)
        y2 = []
        for x, r in zip(x2, self.subnet_2(y1)):
            s, t = self.scale_and_shift(r)
            y2.append(x * torch.exp(s) + t)
            logdet = logdet + sum_except_batch(s)
        return [torch.cat(y, dim=1).clamp(-1e6, 1e6) for y in zip(y1, y2)], logdet

    def inverse(self, zs: list[Tensor], cond=None) -> list[Tensor]:
        y1, y2 = zip(*[z.split(self.split, dim=1) for z in zs])
        x2 = [(y - t) * torch.exp(-s) for y, (s, t) in
              zip(y2, map(self.scale_and_shift, self.subnet_2(list(y1))))]
        x1 = [(y - t) * torch.exp(-s) for y, (s, t) in
              zip(y1, map(self.scale_and_shift, self.subnet_1(x2)))]
        return [torch.cat(x, dim=1) for x in zip(x1, x2)]


class CrossScaleFlow(FlowLayer):
    """The whole flow (``model.py:15-35``): ``n_blocks`` x [per-scale permutation, coupling].

    ``forward(xs)`` takes the list of feature maps (finest first), returns the latent maps and
    the summed log-det ``[B]``; ``inverse(zs)`` undoes it. Block ``k`` uses permutation seed
    ``k`` and ``kernel_sizes[k]``.
    """

    def __init__(self, channels: int, n_scales: int = 3, n_blocks: int = 4, hidden: int = 1024,
                 kernel_sizes: tuple = (3, 3, 3, 5), clamp: float = 3.0, leaky_slope: float = 0.1,
                 cross_scale: bool = True):
        super().__init__()
        self.n_scales = n_scales
        layers = []
        for k in range(n_blocks):
            layers.append(ParallelPermutation(channels, n_scales, seed=k))
            layers.append(CrossScaleCoupling(channels, hidden, kernel_sizes[k], n_scales, clamp,
                                             leaky_slope, cross_scale))
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: list[Tensor], cond=None) -> tuple[list[Tensor], Tensor]:
        check_scales(xs, self.n_scales)
        logdet = xs[0].new_zeros(len(xs[0]))
        for layer in self.layers:
            xs, ld = layer(xs)
            logdet = logdet + ld
        return xs, logdet

    def inverse(self, zs: list[Tensor], cond=None) -> list[Tensor]:
        check_scales(zs, self.n_scales)
        for layer in reversed(self.layers):
            zs = layer.inverse(zs)
        return zs


def check_scales(xs, n_scales: int) -> None:
    """Raise a clear error unless ``xs`` is ``n_scales`` maps, each half the previous one's size."""
    if not isinstance(xs, (list, tuple)) or len(xs) != n_scales:
        raise ValueError(f"CS-Flow expects a list of {n_scales} feature maps [B, C, H, W] "
                         f"(finest first); got {type(xs).__name__}"
                         + (f" of {len(xs)}" if isinstance(xs, (list, tuple)) else ""))
    for fine, coarse in zip(xs, xs[1:]):
        if tuple(2 * s for s in coarse.shape[-2:]) != tuple(fine.shape[-2:]):
            raise ValueError(
                f"CS-Flow's cross-scale convolutions need each map exactly half the size of the "
                f"previous one; got {[tuple(x.shape[-2:]) for x in xs]}. Use an image side that "
                f"is a multiple of the backbone stride times 2^{n_scales} (e.g. 128 for stride "
                f"8 and 3 scales; the official code asks for multiples of 128 at stride 32).")


# ----------------------------------------------------------------------------- Sec. 3.3-3.4

def nll_loss(zs: list[Tensor], logdet: Tensor) -> Tensor:
    """Sec. 3.3: ``mean_batch(||z||^2 / 2 - log|det J|) / D``, all scales together (utils.py:26-29).

    The negative log-likelihood of the features under the flow without the constant
    ``D/2 log(2 pi)``, divided by the number ``D`` of latent dimensions per image.
    """
    z = torch.cat([z.flatten(1) for z in zs], dim=1)
    return (0.5 * (z ** 2).sum(1) - logdet).mean() / z.shape[1]


def anomaly_score(zs: list[Tensor]) -> Tensor:
    """Sec. 3.4: the image score, ``z^2 / 2`` averaged over every latent dimension (train.py:68)."""
    return 0.5 * torch.cat([z.flatten(1) for z in zs], dim=1).pow(2).mean(1)


def anomaly_map(zs: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Sec. 3.4: ``mean_c z^2`` of the finest scale, upsampled bilinearly (evaluate.py:178, 127)."""
    m = zs[0].pow(2).mean(1, keepdim=True)
    return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class ClippedAdam(torch.optim.Adam):
    """Adam that first clips the global gradient norm to ``max_grad_norm`` (train.py:43).

    The shared :func:`adlab.train.train` loop calls ``optimizer.step()`` right after
    ``backward()``, so the clipping lives in the step.
    """

    def __init__(self, params, max_grad_norm: float = 1.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


# ----------------------------------------------------------------------------- detector

class CSFlow:
    """CS-Flow detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``flow`` (the :class:`CrossScaleFlow`), ``history`` (loss per step) and
    ``grid`` (the finest feature map's size).
    """

    Config = CSFlowConfig

    def __init__(self, config: CSFlowConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(CSFlowConfig, config, overrides)
        self.device = device()
        self.trunk, self.flow, self.history = None, None, []

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """Images ``[B, 3, H, W]`` in [0, 1] -> the feature map of each scale, finest first."""
        from adlab.data.mvtec import normalize

        c = self.config
        self._trunk()
        x = images.to(self.device, torch.float32)
        if c.input_size is not None and tuple(x.shape[-2:]) != (c.input_size,) * 2:
            x = F.interpolate(x, size=(c.input_size,) * 2, mode="bilinear", align_corners=False)
        return [self.trunk(xs) for xs in image_pyramid(normalize(x), c.n_scales)]

    def build_flow(self, channels: int) -> CrossScaleFlow:
        """The flow for ``channels``-channel features, initialised from the config's seed."""
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            return CrossScaleFlow(channels, c.n_scales, c.n_blocks, c.hidden, c.block_kernels(),
                                  c.clamp, c.leaky_slope, c.cross_scale).to(self.device)

    def fit(self, train, progress: bool = True, checkpoint=None) -> "CSFlow":
        """Extract the features of the defect-free images once, then train the flow on them."""
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress, checkpoint=checkpoint)

    def training_run(self, train, steps: int | None = None):
        """The features of the training images, then :meth:`features_run` on them."""
        images = images_of(train)
        parts = [self.features(b) for b in batches(images, self.config.feature_batch)]
        return self.features_run([torch.cat(scale) for scale in zip(*parts)], steps)

    def fit_features(self, feats: list[Tensor], progress: bool = True,
                     checkpoint=None) -> "CSFlow":
        """Train the flow on precomputed features (one ``[N, C, h, w]`` tensor per scale).

        ``epochs * ceil(N / batch_size)`` steps of :func:`adlab.train.train` on the loss of
        :func:`nll_loss`; the last weights are kept. ``checkpoint`` (a file) resumes training.
        """
        from adlab.train import train_detector

        return train_detector(self, self.features_run(feats), progress, checkpoint=checkpoint)

    def features_run(self, feats: list[Tensor], steps: int | None = None):
        """A new flow and what :func:`adlab.train.train` needs to train it on ``feats``."""
        from adlab.train import RandomBatches, TrainingRun

        c = self.config
        check_scales(feats, c.n_scales)
        n = len(feats[0])
        self.grid = tuple(feats[0].shape[-2:])
        self.flow = self.build_flow(feats[0].shape[1])
        optimizer = ClippedAdam(self.flow.parameters(), c.max_grad_norm, lr=c.lr, eps=c.eps,
                                weight_decay=c.weight_decay)

        def loss_fn(index: Tensor) -> Tensor:
            zs, logdet = self.flow([f[index.to(f.device)] for f in feats])
            return nll_loss(zs, logdet)

        steps = steps or c.epochs * math.ceil(n / c.batch_size)
        return TrainingRun(loss_fn, RandomBatches(torch.arange(n), c.batch_size, c.seed), steps,
                           optimizer, {"flow": self.flow}, seed=c.seed, desc="CS-Flow")

    def finish_training(self, run) -> None:
        self.history = run.history

    def _trunk(self) -> nn.Module:
        from adlab.config import profile

        c = self.config
        if self.trunk is None:
            pretrained = profile().pretrained if c.pretrained is None else c.pretrained
            self.trunk = feature_trunk(c.backbone, c.layer, pretrained, c.seed).to(self.device)
        return self.trunk

    def state_dict(self) -> dict:
        """Backbone trunk and flow weights (see ``adlab.detector.save_detector``)."""
        state = get_state(self, ("trunk", "flow", "grid", "history"))
        return {**state, "channels": self.flow.layers[0].perms[0].channels}

    def load_state_dict(self, state: dict) -> None:
        self._trunk()
        self.flow = self.build_flow(state["channels"])
        set_state(self, {k: v for k, v in state.items() if k != "channels"})

    @torch.no_grad()
    def latents(self, images: Tensor) -> list[Tensor]:
        """The latent maps ``z`` of each scale for ``images`` (after :meth:`fit`)."""
        if self.flow is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        self.flow.eval()
        return self.flow(self.features(images))[0]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Score = mean ``z^2 / 2`` over all scales; map = finest ``mean_c z^2``, upsampled."""
        zs = self.latents(images)
        return Prediction(anomaly_score(zs), anomaly_map(zs, images.shape[-2:]))


__all__ = ["CSFlow", "CSFlowConfig", "image_pyramid", "feature_trunk", "CrossScaleSubnet",
           "ParallelPermutation", "CrossScaleCoupling", "CrossScaleFlow", "check_scales",
           "nll_loss", "anomaly_score", "anomaly_map", "ClippedAdam"]
