"""CFlow-AD: "Real-Time Unsupervised Anomaly Detection with Localization via Conditional
Normalizing Flows" (Gudovskiy, Ishizaka & Kozuka, WACV 2022).

A frozen CNN encoder gives feature maps at several scales. Every feature vector (a
"fibre": the C values at one position of one map) gets a likelihood from a conditional
normalizing flow, one flow ("decoder") per encoder layer, conditioned on a sinusoidal
encoding of the fibre's position. Low likelihood = anomalous. Where the paper leaves a
detail open this file does what the official code does (gudovskiy/cflow-ad, commit
b2ebf9e; cited below as file:line):

1. Encoder: layers 2, 3, 4 of an ImageNet WideResNet-50 (``model.py:93-113``,
   ``--pool-layers 3``, ``config.py:15,19``), frozen, in eval mode.
2. Condition: a 2-D sinusoidal positional encoding with P = 128 channels
   (``model.py:11-30``, ``main.py:44``): :func:`positional_encoding_2d`.
3. Decoders: 8 FrEIA ``AllInOneBlock`` steps per layer (``model.py:46-53``,
   ``config.py:21``), clamp 1.9 (``main.py:43``), soft (rotation) permutations,
   subnet Linear(D, 2D) - ReLU - Linear(2D, 2 floor(C/2)) with D = ceil(C/2) + P
   (``model.py:33-34``): :func:`cflow_decoder`, built on
   :class:`adlab.flows.allinone.AllInOneBlock` (tested equal to FrEIA's block).
4. Training on random fibres: each batch of images is encoded, all its B H W fibres of a
   layer are shuffled and consumed N = 256 at a time, one optimiser step each, layer
   after layer (``train.py:47-83``, ``train.py:287``): :class:`FibreBatches`. The loss
   of a fibre is ``-log sigmoid(log p(x) / C)`` (``train.py:76-78``;
   ``get_logp`` in ``utils.py:38-40``): :func:`log_likelihood_per_dim`,
   :func:`cflow_loss`.
5. Map (``train.py:313-329``): per layer, ``log p / C`` minus its maximum, exp, bilinear
   upsampling (``align_corners=True``) to the image, summed over layers; the anomaly map
   is the maximum of that sum minus the sum; the image score is the map's maximum
   (``train.py:331``): :func:`likelihood_map`, :class:`CFlow.predict`.

Where we differ from the official code, and why:

* The two maxima of step 5 are taken in the official code over the whole *test* set
  (``train.py:316`` and ``train.py:329``), so each test score depends on the other test
  images. We take them over a validation split of the *training* images
  (:func:`adlab.train.holdout`), so a prediction needs nothing but the image itself.
  Image and pixel AUROC do not change under the per-layer shift when one layer is used;
  with several layers the per-layer maxima weigh the layers, so results can differ
  slightly from the transductive version.
* The official code picks the reported epoch on the test set (``train.py:338-340``, the
  best segmentation AUROC); we train for a fixed number of epochs and keep the last.
* Backbones are timm's (zero padding); the official code builds its own ResNets with
  reflect padding (``custom_models/resnet.py:24``). Same weights, different borders.
* The official learning rate follows a cosine per meta epoch with a linear warm-up over
  the first 2 of 25 meta epochs (``custom_models/utils.py:48-73``, ``main.py:62-75``);
  ours is the same curve evaluated per optimiser step.
* When a layer of an image batch has fewer than N fibres (tiny batches, deep layers at
  small sizes) the official code stops with an assertion (``train.py:66``); we use all
  of them as one smaller step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, set_state
from adlab.features import FeatureDetector, batches, images_of, topk_mean
from adlab.flows.allinone import AllInOneBlock
from adlab.flows.core import SequentialFlow
from adlab.flows.coupling import mlp_subnet
from adlab.flows.likelihood import log_likelihood
from adlab.train import RandomBatches, TrainingRun, holdout, train_detector


@dataclass
class CFlowConfig:
    """CFlow-AD hyperparameters; defaults follow the active profile."""

    # Official default encoder wide_resnet50_2 (config.py:15); quick: ResNet-18, random init.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="wide_resnet50_2"))
    # Official --pool-layers 3 = layer2, layer3, layer4 (config.py:19, model.py:93-113).
    # Quick: layer1 alone (32 x 32 cells at 128 px). Random-init deeper layers carry no learned
    # semantics, and summing their maps hurt: seed 0, 8 epochs, lr 3e-3, image AUROC on the
    # synthetic objects pins / nut 0.888 / 0.734 with layer1, 0.780 / 0.686 with layers 1-2,
    # 0.719 / 0.727 with layers 2-3.
    layers: tuple = field(default_factory=lambda: by_profile(
        quick=("layer1",), paper=("layer2", "layer3", "layer4")))
    # Official --coupling-blocks 8 (config.py:21).
    coupling_blocks: int = 8
    # Official c.clamp_alpha = 1.9 (main.py:43), FrEIA's affine_clamping.
    clamp: float = 1.9
    # Official c.condition_vec = 128 (main.py:44). 0: no condition, the official
    # unconditional 'freia-flow' decoder (model.py:37-43), the paper's ablation.
    condition_vec: int = 128
    # Official N = 256 fibres per optimiser step (train.py:287).
    fibres: int = 256
    # Official --batch-size 32 images (config.py:29); quick: 8 (54 training images).
    batch_size: int = field(default_factory=lambda: by_profile(quick=8, paper=32))
    # Official --lr 2e-4 (config.py:31), Adam (train.py:272). Quick: 3e-3, to learn in the
    # ~2000 steps a CPU budget allows (pins 0.714 at 1e-3, 0.773 at 3e-3; 8 epochs, layers 1-3).
    lr: float = field(default_factory=lambda: by_profile(quick=3e-3, paper=2e-4))
    # Passes over the training images. Official: 25 meta epochs x 8 sub-epochs
    # (config.py:33-36, train.py:28) = 200. Quick: 8 (about 2000 steps of 256 fibres; with
    # layer1 alone, mean image AUROC over the 4 synthetic categories 0.846 at 4, 0.887 at 8).
    epochs: float = field(default_factory=lambda: by_profile(quick=8.0, paper=200.0))
    # Official warm-up: lr/10 -> lr over 2 of 25 meta epochs (main.py:65-69); cosine down to
    # lr * 0.1^3 (main.py:64,71).
    warmup_fraction: float = 2 / 25
    final_lr_factor: float = 1e-3
    # Official training transform RandomRotation(5) (custom_datasets/loader.py:67).
    # Quick: 0, the synthetic images are aligned.
    rotation_deg: float = field(default_factory=lambda: by_profile(quick=0.0, paper=5.0))
    # Validation images (from the training images) for the map's maxima; ours, see above.
    val_fraction: float = 0.1
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0              # split, fibre order, rotations, mixing matrices, random init
    predict_chunk: int = 8192  # fibres per decoder call at test time (memory only)


# ----------------------------------------------------------------------------- condition

def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """The condition c_i of every position: a 2-D sinusoidal encoding ``[P, H, W]`` (Sec. 4).

    The first P/2 channels encode the column index ``x``, the last P/2 the row index
    ``y``, each as Transformer-style sin / cos pairs with frequencies
    ``w_k = 10000^(-2k / (P/2))``, k = 0 .. P/4 - 1 (official ``positionalencoding2d``,
    ``model.py:11-30``):
    channel ``2k`` = sin(x w_k), ``2k+1`` = cos(x w_k), ``P/2 + 2k`` = sin(y w_k),
    ``P/2 + 2k + 1`` = cos(y w_k).
    """
    if channels % 4 != 0 or channels <= 0:
        raise ValueError(f"The 2-D positional encoding needs a positive multiple of 4 channels "
                         f"(sin and cos for rows and columns); got condition_vec={channels}.")
    half = channels // 2
    w = torch.pow(10000.0, -torch.arange(0, half, 2, dtype=torch.float64) / half)  # [P/4]
    x = torch.arange(width, dtype=torch.float64)[:, None] * w                      # [W, P/4]
    y = torch.arange(height, dtype=torch.float64)[:, None] * w                     # [H, P/4]
    pe = torch.zeros(channels, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(x).T[:, None, :]
    pe[1:half:2] = torch.cos(x).T[:, None, :]
    pe[half::2] = torch.sin(y).T[:, :, None]
    pe[half + 1::2] = torch.cos(y).T[:, :, None]
    return pe.float()


def fibres_of(feature: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B H W, C]``: one row per position (image-major, then row, column)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


# ----------------------------------------------------------------------------- decoder

def cflow_decoder(channels: int, condition_vec: int = 128, coupling_blocks: int = 8,
                  clamp: float = 1.9, seed: int = 0) -> SequentialFlow:
    """One conditional decoder g_l for fibres of ``channels`` values (Sec. 4).

    ``coupling_blocks`` AllInOne steps with soft permutations (random rotations), clamp
    ``alpha`` and the subnet Linear(D, 2D) - ReLU - Linear(2D, 2 floor(C/2)),
    D = ceil(C/2) + ``condition_vec`` (official ``freia_cflow_head``, ``model.py:46-53``,
    and ``subnet_fc``, ``model.py:33-34``). ``condition_vec=0`` builds the unconditional
    decoder (``freia_flow_head``, ``model.py:37-43``). Seeded: the rotations and the
    initial weights depend on ``seed`` only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SequentialFlow(AllInOneBlock(channels, mlp_subnet(hidden_ratio=2.0),
                                            cond_channels=condition_vec, clamp=clamp,
                                            permute_soft=True, seed=seed * 1000 + k)
                              for k in range(coupling_blocks))


# ----------------------------------------------------------------------------- likelihood

def log_likelihood_per_dim(z: Tensor, logdet: Tensor) -> Tensor:
    """``log p(x) / C`` per fibre, the change of variables with a standard normal base (Sec. 3).

    ``log p(x) = -C/2 log(2 pi) - ||z||^2 / 2 + log|det J|`` (official ``get_logp``,
    ``utils.py:38-40``), divided by the fibre's dimension C as the official training and
    test code do (``train.py:77``, ``train.py:160``: "likelihood per dim").
    """
    return log_likelihood(z, logdet) / z.shape[1]


def cflow_loss(log_p_per_dim: Tensor) -> Tensor:
    """Training loss: the batch mean of ``-log sigmoid(log p(x) / C)`` (``train.py:78-80``).

    For very likely fibres (log p / C >> 0) it vanishes; for unlikely ones it tends to
    ``-log p / C``, the negative log-likelihood per dimension, so the fibres the flow
    explains worst dominate the gradient. (The paper's objective is the plain negative
    log-likelihood; the sigmoid is in the official code only.)
    """
    return -F.logsigmoid(log_p_per_dim).mean()


def likelihood_map(log_p: list[Tensor], log_p_max: list[float], size: tuple[int, int]) -> Tensor:
    """Sum over layers of ``exp(log p / C - max)``, upsampled to ``size``: ``[B, H, W]`` (Sec. 4).

    ``log_p[l]`` is ``[B, h_l, w_l]`` (per-dimension log-likelihoods of layer l);
    ``log_p_max[l]`` its normalising maximum. As the official ``train.py:313-326``:
    shift to ``(-inf, 0]``, exp to "probabilities" in (0, 1], bilinear upsampling with
    ``align_corners=True``, sum. Computed in float64 as the official code does. The anomaly
    map is a constant minus this (:meth:`CFlow.predict`).

    Ours, not official: the shifted value is capped at 0. The official maximum is over the
    very fibres being scored, so the shift is never positive; with a maximum from validation
    images a test fibre can be more likely still (and an untrained flow's can overflow exp to
    inf). The cap keeps the official range (0, 1] and only touches fibres more likely than
    every validation fibre, which are normal either way.
    """
    total = 0.0
    for lp, top in zip(log_p, log_p_max):
        prob = torch.exp((lp.double() - top).clamp(max=0.0))
        total = total + F.interpolate(prob.unsqueeze(1), size=tuple(size), mode="bilinear",
                                      align_corners=True)[:, 0]
    return total


# ----------------------------------------------------------------------------- training data

class FibreBatches:
    """The official order of training fibres (``train.py:31-83``), as an iterator of steps.

    Draws image batches (:class:`adlab.train.RandomBatches`), optionally rotates each image
    by a random angle in ``[-rotation_deg, rotation_deg]``, encodes them, and for each layer
    in turn shuffles all ``B H W`` fibres and yields them ``n`` at a time as
    ``(layer, fibres [n, C_l], condition [n, P])``; ``E // n`` steps per layer as the
    official code (a layer with fewer than ``n`` fibres gives one smaller step).

    :meth:`state_dict` makes a resumed run exact without storing fibres: it holds the
    generators as they were before the current image batch was drawn and how many steps of
    it were used, and :meth:`load_state_dict` draws and encodes that batch again.
    """

    def __init__(self, encode, images: Tensor, batch_size: int, n: int, condition_vec: int,
                 rotation_deg: float = 0.0, seed: int = 0):
        self.encode, self.n, self.p, self.rotation_deg = encode, n, condition_vec, rotation_deg
        self.images = RandomBatches(images, batch_size, seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.queue: list = []
        self.before_refill, self.used = None, 0

    def __iter__(self):
        return self

    def steps_per_batch(self, grid_sizes: list[int], batch_size: int) -> int:
        """Optimiser steps one image batch gives, for layers of ``grid_sizes`` (h w) cells."""
        return sum(max(1, batch_size * s // self.n) for s in grid_sizes)

    def _rotate(self, images: Tensor) -> Tensor:
        if self.rotation_deg <= 0:
            return images
        angle = (torch.rand(len(images), generator=self.generator) * 2 - 1) \
            * math.radians(self.rotation_deg)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                             torch.stack([sin, cos, zero], 1)], 1).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, align_corners=False)  # zeros outside, as torchvision

    def _refill(self) -> None:
        self.before_refill = {"images": self.images.state_dict(),
                              "generator": self.generator.get_state()}
        self.used = 0
        for layer, feature in enumerate(self.encode(self._rotate(next(self.images)))):
            e = fibres_of(feature)
            cond = None
            if self.p:
                pe = positional_encoding_2d(self.p, *feature.shape[-2:]).to(e)
                cond = pe.flatten(1).T.repeat(len(feature), 1)                     # [E, P]
            perm = torch.randperm(len(e), generator=self.generator).to(e.device)
            n_steps = max(1, len(e) // self.n)
            for f in range(n_steps):
                idx = perm[f * self.n:(f + 1) * self.n]
                self.queue.append((layer, e[idx], None if cond is None else cond[idx]))
        self.queue.reverse()

    def __next__(self):
        if not self.queue:
            self._refill()
        self.used += 1
        return self.queue.pop()

    def state_dict(self) -> dict:
        if self.before_refill is None:  # nothing drawn yet
            return {"images": self.images.state_dict(), "generator": self.generator.get_state(),
                    "used": None}
        return {**self.before_refill, "used": self.used}

    def check_state_dict(self, state: dict) -> None:
        self.images.check_state_dict(state["images"])

    def load_state_dict(self, state: dict) -> None:
        self.images.load_state_dict(state["images"])
        self.generator.set_state(state["generator"])
        self.queue, self.before_refill, self.used = [], None, 0
        if state["used"] is not None:  # draw and encode that image batch again, skip used steps
            self._refill()
            for _ in range(state["used"]):
                next(self)


def warmup_cosine(steps: int, warmup_fraction: float, final_factor: float):
    """Learning-rate factor per step: linear from 0.1 over the warm-up, then cosine to
    ``final_factor`` (the official schedule, ``custom_models/utils.py:48-73``, per step)."""
    warm = int(warmup_fraction * steps)

    def factor(step: int) -> float:
        cosine = final_factor + (1 - final_factor) * (1 + math.cos(math.pi * step / steps)) / 2
        if step < warm:
            end = final_factor + (1 - final_factor) * (1 + math.cos(math.pi * warm / steps)) / 2
            return 0.1 + (end - 0.1) * step / warm
        return cosine
    return factor


# ----------------------------------------------------------------------------- detector

class CFlow(FeatureDetector):
    """CFlow-AD detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``decoders`` (one flow per layer), ``history`` (the loss per step),
    ``log_p_max`` (per layer) and ``map_max`` (the normalising maxima, from validation
    images drawn from the training images).
    """

    Config = CFlowConfig

    def __init__(self, config: CFlowConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.decoders = None
        self.image_size = None

    def encode(self, images: Tensor) -> list[Tensor]:
        """Images ``[B, 3, H, W]`` -> the encoder's maps, one per layer."""
        return self._extractor()(images.to(self.device))

    def build(self) -> nn.ModuleList:
        """One decoder per layer, with the channel counts of the encoder."""
        c = self.config
        return nn.ModuleList(
            cflow_decoder(ch, c.condition_vec, c.coupling_blocks, c.clamp, seed=c.seed + 17 * l)
            for l, ch in enumerate(self._extractor().channels)).to(self.device)

    @torch.no_grad()
    def layer_log_p(self, images: Tensor) -> list[Tensor]:
        """``log p / C`` of every fibre: a list of ``[B, h_l, w_l]`` maps, one per layer."""
        c, out = self.config, []
        for decoder, feature in zip(self.decoders, self.encode(images)):
            b, _, h, w = feature.shape
            e = fibres_of(feature)
            cond = None
            if c.condition_vec:
                pe = positional_encoding_2d(c.condition_vec, h, w).to(e)
                cond = pe.flatten(1).T.repeat(b, 1)
            parts = []
            for s in range(0, len(e), c.predict_chunk):
                z, logdet = decoder(e[s:s + c.predict_chunk],
                                    None if cond is None else cond[s:s + c.predict_chunk])
                parts.append(log_likelihood_per_dim(z, logdet))
            out.append(torch.cat(parts).view(b, h, w))
        return out

    def fit(self, train_data, progress: bool = True) -> "CFlow":
        """Train the decoders on defect-free images, then set the map's maxima on validation
        images held out from them."""
        return train_detector(self, self.training_run(train_data), progress)

    def training_run(self, train_data, steps: int | None = None) -> TrainingRun:
        """Build the decoders and everything the loop needs (``steps``: instead of ``epochs``)."""
        c = self.config
        images = images_of(train_data)
        fit_images, val_images = holdout(images, c.val_fraction, c.seed)
        self.image_size = tuple(images.shape[-2:])
        self.decoders = self.build()
        fibres = FibreBatches(self.encode, fit_images, c.batch_size, c.fibres, c.condition_vec,
                              c.rotation_deg, c.seed)
        with torch.no_grad():
            grids = [f.shape[-2] * f.shape[-1] for f in self.encode(fit_images[:1])]
        batch = min(c.batch_size, len(fit_images))
        per_epoch = max(1, len(fit_images) // batch) * fibres.steps_per_batch(grids, batch)
        steps = steps or max(1, round(c.epochs * per_epoch))
        optimizer = torch.optim.Adam(self.decoders.parameters(), lr=c.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps, c.warmup_fraction, c.final_lr_factor))

        def loss_fn(step):
            layer, e, cond = step
            return cflow_loss(log_likelihood_per_dim(*self.decoders[layer](e, cond)))

        return TrainingRun(loss_fn, fibres, steps, optimizer, {"decoders": self.decoders},
                           scheduler=scheduler, seed=c.seed, desc="CFlow: train decoders",
                           extra={"val_images": val_images})

    def finish_training(self, run: TrainingRun) -> None:
        """After the loop: the map's maxima on the validation images."""
        self.history = run.history
        self.decoders.eval()
        self._normalise(run.extra["val_images"])

    def state_dict(self) -> dict:
        """Encoder and decoder weights, the maxima (see ``adlab.detector.save_detector``)."""
        return get_state(self, ("extractor", "decoders", "image_size", "log_p_max", "map_max",
                                "history"))

    def load_state_dict(self, state: dict) -> None:
        self.decoders = self.build()
        set_state(self, state)
        self.decoders.eval()

    @torch.no_grad()
    def _normalise(self, val_images: Tensor) -> None:
        """The two maxima of the official map (``train.py:316``, ``train.py:329``), taken over
        validation images from the training set instead of over the test set."""
        log_p = [torch.cat(parts) for parts in zip(*(self.layer_log_p(b)
                                                     for b in batches(val_images, 8)))]
        self.log_p_max = [float(lp.max()) for lp in log_p]
        self.map_max = float(likelihood_map(log_p, self.log_p_max, self.image_size).max())

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        """Anomaly map = validation maximum - sum of per-layer likelihoods; score = its max."""
        if self.decoders is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"CFlow was fitted on {self.image_size} images (its positional "
                             f"condition is per cell); got shape {tuple(images.shape)}. Resize "
                             "them (load_dataset(..., image_size=...)) to the training size.")
        maps = self.map_max - likelihood_map(self.layer_log_p(images), self.log_p_max,
                                             self.image_size)
        maps = maps.float()
        return Prediction(topk_mean(maps, 1), maps)


__all__ = ["CFlow", "CFlowConfig", "FibreBatches", "cflow_decoder", "cflow_loss", "fibres_of",
           "likelihood_map", "log_likelihood_per_dim", "positional_encoding_2d", "warmup_cosine"]
