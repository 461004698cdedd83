"""FastFlow: "Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows" (Yu et al. 2021).

A frozen backbone turns the image into feature maps; on each map a *2-D* flow
(couplings whose subnets are convolutions, so the map keeps its height and width)
maps the features to a standard normal ``z`` of the same shape. Training maximises
the likelihood of the defect-free features; at test time a cell whose ``z`` lies far
from the origin is unlikely, hence anomalous.

The paper's authors released no code. The implementation the issue and the
literature (anomalib) follow is gathierry/FastFlow (commit 2cf1f2f, unofficial but
reproducing the paper's numbers); "the reference code" below means that repository,
cited as file:line:

1. Features (paper Sec. 3, feature extractor): CNNs give stages 1-3 of timm's
   ``features_only`` model (``fastflow.py:58-63``, ``out_indices=[1, 2, 3]``), each
   followed by a trainable ``LayerNorm([C, H, W])`` (``fastflow.py:69-76``; not in the
   paper). Vision transformers give one map: the tokens after block 7 (DeiT) or 40
   (CaiT) and the model's final norm, prefix tokens dropped (``fastflow.py:95-130``).
2. The 2-D flow (paper Sec. 3, 2D flow model): ``flow_steps`` FrEIA ``AllInOneBlock``
   steps (clamp 2.0, hard permutation), subnet Conv-ReLU-Conv with ``'same'`` padding and
   ``int(hidden_ratio * ceil(C/2))`` hidden channels, kernel 3 at even steps and 1 at odd
   steps unless ``conv3x3_only`` (``fastflow.py:11-36``). Ours is
   :class:`adlab.flows.allinone.AllInOneBlock`, tested equal to FrEIA 0.2's block.
3. Loss: for each map, the batch mean of ``0.5 ||z||^2 - log|det J|``, summed over the
   maps (``fastflow.py:135-141``); Adam, lr 1e-3, weight decay 1e-5, batch 32, 500 epochs
   (``constants.py:33-36``, ``main.py:62-65``).
4. Map: per map ``-exp(-0.5 mean_c z^2)`` (a per-cell likelihood without the log-det),
   bilinear to the input size, mean over the maps (``fastflow.py:145-158``); no smoothing.

Where we differ, and why:

* Image score: the reference code computes none (it reports pixel AUROC only); ours is
  the map's maximum, the usual choice (CFlow and PatchCore take the max as well).
* Epoch choice: the reference code evaluates on the *test* set every 10 epochs
  (``main.py:122-123``, ``constants.py:39``), which invites picking the best test epoch.
  Ours holds out a seeded random ``val_fraction`` of the *training* images
  (:func:`adlab.train.holdout`), computes their loss every ``eval_every`` epochs and keeps
  the weights with the lowest one. The test set is never looked at.
* Speed: the backbone is frozen and the reference code uses no augmentation, so we
  extract the features of the training images once and train the flows on them (the
  reference code recomputes them every step; the result is the same). Memory: the
  features of one image are ~7 MB for WideResNet-50 at 256 px (MVTec's largest training
  set, 391 images: 2.8 GB of CPU memory).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, make_config, set_state
from adlab.features import FeatureExtractor, ViTFeatures, images_of, topk_mean
from adlab.flows.allinone import AllInOneBlock
from adlab.flows.core import SequentialFlow
from adlab.flows.coupling import conv_subnet


def is_transformer(backbone: str) -> bool:
    """True for the vision transformers FastFlow uses (timm ``vit_*``, ``deit_*``, ``cait_*``)."""
    return backbone.split(".")[0].startswith(("vit_", "deit", "cait"))


def official_settings(backbone: str) -> dict:
    """The reference code's flow settings for a backbone (``configs/*.yaml`` of gathierry/FastFlow).

    ResNet-18: 8 steps, hidden ratio 1.0, 3x3 kernels only (``configs/resnet18.yaml:3-5``);
    other CNNs as WideResNet-50: 8 steps, ratio 1.0, 3x3 / 1x1 alternating
    (``configs/wide_resnet50_2.yaml:3-5``); transformers as DeiT and CaiT: 20 steps,
    ratio 0.16, alternating (``configs/deit.yaml:3-5``, ``configs/cait.yaml:3-5``); the
    transformer block is 7 for DeiT and 40 for CaiT (``fastflow.py:112, 124``).
    """
    arch = backbone.split(".")[0]
    if is_transformer(arch):
        return dict(flow_steps=20, hidden_ratio=0.16, conv3x3_only=False,
                    block=40 if arch.startswith("cait") else 7)
    return dict(flow_steps=8, hidden_ratio=1.0, conv3x3_only=arch == "resnet18", block=None)


@dataclass
class FastFlowConfig:
    """FastFlow hyperparameters; defaults follow the active profile."""

    # Paper Table 1 / reference configs: ResNet-18, WideResNet-50, DeiT, CaiT. Paper profile:
    # WideResNet-50 (configs/wide_resnet50_2.yaml:2); quick: ResNet-18, random init.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="wide_resnet50_2"))
    # CNN stages 1-3 (fastflow.py:62, out_indices=[1, 2, 3]); unused for transformers.
    layers: tuple = ("layer1", "layer2", "layer3")
    # None = the reference config for the backbone (official_settings): 8 steps for CNNs,
    # 20 for transformers; ratio 1.0 / 0.16; 3x3 only for ResNet-18; block 7 (DeiT) / 40 (CaiT).
    flow_steps: int | None = None
    hidden_ratio: float | None = None
    conv3x3_only: bool | None = None
    block: int | None = None
    # AllInOneBlock affine_clamping=2.0 (fastflow.py:23 default, passed at line 33).
    clamp: float = 2.0
    # Adam lr 1e-3, weight decay 1e-5 (constants.py:35-36).
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # constants.py:33: batch 32; quick: 16 (the synthetic categories have 60 training images).
    batch_size: int = field(default_factory=lambda: by_profile(quick=16, paper=32))
    # constants.py:34: 500 epochs. Quick: 20, ~35 s per category on 2 CPU threads (seed 0, image
    # AUROC on the synthetic objects pins / nut 0.767 / 0.672 at 10 epochs, 0.906 / 0.725 at 20).
    epochs: int = field(default_factory=lambda: by_profile(quick=20, paper=500))
    # Ours (the reference code evaluates on the test set every 10 epochs, constants.py:39):
    # the validation loss every eval_every epochs picks the weights kept.
    eval_every: int = field(default_factory=lambda: by_profile(quick=5, paper=10))
    val_fraction: float = 0.1
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0               # backbone init, permutations, flow init, batch order, split
    feature_batch: int = 16     # feature extraction batch (memory only)


# --------------------------------------------------------------------------- features

class TransformerFeatures(ViTFeatures):
    """One feature map of a timm vision transformer: the tokens after ``block``, final norm applied.

    As the reference code (``fastflow.py:95-130``): patch embedding, position embedding,
    blocks ``0..block``, the model's final ``norm``, the class / distillation tokens dropped,
    tokens reshaped to ``[B, C, H/16, W/16]`` (timm's ``forward_intermediates`` with
    ``norm=True`` does exactly these steps; :class:`adlab.features.ViTFeatures`). Frozen,
    ImageNet normalisation inside.
    """

    def __init__(self, backbone: str, block: int, image_size: int, pretrained: bool,
                 seed: int = 0):
        super().__init__(backbone, [block], image_size, pretrained, seed, norm=True)
        self.block = block


# --------------------------------------------------------------------------- the 2-D flow

def fastflow_flow(channels: int, steps: int, hidden_ratio: float, conv3x3_only: bool,
                  clamp: float = 2.0, seed: int = 0) -> SequentialFlow:
    """The 2-D flow of one feature map (paper Sec. 3, 2D flow model; ``fastflow.py:23-36``).

    ``steps`` AllInOne blocks; block ``i`` uses a Conv(k)-ReLU-Conv(k) subnet with
    ``k = 1`` at odd ``i`` and ``k = 3`` at even ``i`` (always 3 if ``conv3x3_only``): the
    3x3 steps mix neighbouring cells (local context), the 1x1 steps are cheap. Each block
    ends with a fixed random permutation of the channels (``permute_soft=False``).
    """
    blocks = []
    for i in range(steps):
        k = 1 if i % 2 == 1 and not conv3x3_only else 3
        blocks.append(AllInOneBlock(channels, conv_subnet(hidden_ratio, k), clamp=clamp,
                                    permute_soft=False, seed=seed * 1000 + i))
    return SequentialFlow(*blocks)


def fastflow_loss(zs: list[Tensor], logdets: list[Tensor]) -> Tensor:
    """Negative log-likelihood of the features, up to a constant (``fastflow.py:135-141``).

    ``sum_maps mean_batch (0.5 ||z||^2 - log|det dz/dx|)``: the change of variables
    ``log p(x) = log N(z; 0, I) + log|det dz/dx|`` with the constant ``D/2 log 2 pi`` dropped;
    the squared norm runs over channels, height and width of each map.
    """
    loss = 0.0
    for z, logdet in zip(zs, logdets):
        loss = loss + (0.5 * z.pow(2).flatten(1).sum(1) - logdet).mean()
    return loss


def anomaly_map(zs: list[Tensor], size: tuple[int, int]) -> Tensor:
    """``[B, H, W]``: mean over maps of ``-exp(-0.5 mean_c z^2)``, bilinear to ``size`` (``fastflow.py:145-158``).

    ``exp(-0.5 mean_c z^2)`` is the geometric mean over channels of the per-channel standard
    normal density (without ``1/sqrt(2 pi)``) of the cell: near 1 where ``z`` is near 0
    (normal), near 0 far from it. Its negative is the anomaly map, in ``[-1, 0]``; the
    log-det is left out, as in the reference code.
    """
    maps = [F.interpolate(-torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True)), size=tuple(size),
                          mode="bilinear", align_corners=False) for z in zs]
    return torch.stack(maps, 0).mean(0)[:, 0]


class FastFlowModel(nn.Module):
    """The trainable part: one LayerNorm (CNNs only) and one 2-D flow per feature map."""

    def __init__(self, shapes: list[tuple[int, int, int]], layer_norm: bool, steps: int,
                 hidden_ratio: float, conv3x3_only: bool, clamp: float, seed: int = 0):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        # fastflow.py:69-76: elementwise-affine LayerNorm over [C, H, W] for CNN features;
        # transformer features already passed the model's own norm.
        self.norms = nn.ModuleList(nn.LayerNorm(list(s)) if layer_norm else nn.Identity()
                                   for s in self.shapes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.flows = nn.ModuleList(
                fastflow_flow(s[0], steps, hidden_ratio, conv3x3_only, clamp, seed * 10 + i)
                for i, s in enumerate(self.shapes))

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Features -> (``z`` per map, log-det per map ``[B]``)."""
        shapes = [tuple(f.shape[1:]) for f in features]
        if shapes != self.shapes:
            raise ValueError(f"FastFlow was fitted on feature maps {self.shapes} but got {shapes}: "
                             "predict on images of the size used in fit (the LayerNorm and the "
                             "flows are built for that size).")
        zs, logdets = [], []
        for norm, flow, f in zip(self.norms, self.flows, features):
            z, logdet = flow(norm(f))
            zs.append(z)
            logdets.append(logdet)
        return zs, logdets


# --------------------------------------------------------------------------- the detector

class ValidatedBatches:
    """FastFlow's random batches (of feature indices) with its validation record: the steps
    taken, ``val_history`` and the ``best`` validation loss with its weights.

    All of it is in :meth:`state_dict`, so a resumed run (``adlab.train.train`` with a
    checkpoint) validates at the same steps and keeps the same best weights as an
    uninterrupted one.
    """

    def __init__(self, indices: Tensor, batch_size: int, seed: int = 0):
        from adlab.train import RandomBatches

        self.batches = RandomBatches(indices, batch_size, seed)
        self.step, self.val_history = 0, []
        self.best = {"loss": math.inf, "state": None, "step": 0}

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        return next(self.batches)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "step": self.step,
                "val_history": list(self.val_history), "best": dict(self.best)}

    def check_state_dict(self, state: dict) -> None:
        self.batches.check_state_dict(state["batches"])

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.step, self.val_history = int(state["step"]), list(state["val_history"])
        self.best.clear()
        self.best.update(state["best"])


class FastFlow:
    """FastFlow detector: ``fit(train)`` on defect-free images, ``predict(images) -> Prediction``.

    ``FastFlow(backbone="wide_resnet50_2")`` or ``FastFlow(FastFlowConfig(...))``. After
    ``fit``: ``history`` (training loss per step), ``val_history`` (``(step, validation
    loss)`` pairs) and ``best_step`` (the step whose weights are kept).
    """

    Config = FastFlowConfig

    def __init__(self, config: FastFlowConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(FastFlowConfig, config, overrides)
        c = self.config
        settings = official_settings(c.backbone)
        for key, value in settings.items():   # None fields take the reference config's value
            if getattr(c, key) is None:
                setattr(c, key, value)
        self.device = device()
        self.extractor = None
        self.model = None
        self.image_size = None
        self.history: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        self.best_step = 0

    def _extractor(self, image_size: int) -> nn.Module:
        from adlab.config import profile

        c = self.config
        if self.extractor is None:
            pretrained = profile().pretrained if c.pretrained is None else bool(c.pretrained)
            if is_transformer(c.backbone):
                self.extractor = TransformerFeatures(c.backbone, c.block, image_size, pretrained,
                                                     c.seed)
            else:
                self.extractor = FeatureExtractor(c.backbone, c.layers, pretrained, seed=c.seed)
            self.extractor.to(self.device)
        return self.extractor

    def features(self, images: Tensor) -> list[Tensor]:
        """Backbone feature maps of ``images`` ``[B, 3, H, W]`` in [0, 1] (batched, no grad)."""
        extractor = self._extractor(images.shape[-1])
        parts = [extractor(images[i:i + self.config.feature_batch].to(self.device))
                 for i in range(0, len(images), self.config.feature_batch)]
        return [torch.cat(maps) for maps in zip(*parts)]

    def fit(self, train, progress: bool = True) -> "FastFlow":
        """Train the flows on defect-free images; keep the weights of the best validation loss."""
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress)

    def _build_model(self, shapes) -> FastFlowModel:
        c = self.config
        return FastFlowModel(shapes, layer_norm=not is_transformer(c.backbone),
                             steps=c.flow_steps, hidden_ratio=c.hidden_ratio,
                             conv3x3_only=c.conv3x3_only, clamp=c.clamp,
                             seed=c.seed).to(self.device)

    def training_run(self, train, steps: int | None = None):
        """Features, flows, optimiser and the validation every ``eval_every`` epochs, for
        :func:`adlab.train.train` (``steps``: instead of ``epochs``)."""
        from adlab.train import TrainingRun, holdout

        c = self.config
        images = images_of(train)
        self.image_size = images.shape[-1]
        fit_images, val_images = holdout(images, c.val_fraction, c.seed)
        if len(fit_images) == 0:
            raise ValueError(f"FastFlow: all {len(images)} training images went to validation "
                             f"(val_fraction={c.val_fraction}); lower val_fraction.")
        feats, val_feats = self.features(fit_images), self.features(val_images)
        self.model = self._build_model([tuple(f.shape[1:]) for f in feats])
        optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        steps_per_epoch = math.ceil(len(fit_images) / c.batch_size)
        steps, check_every = steps or c.epochs * steps_per_epoch, c.eval_every * steps_per_epoch
        batches = ValidatedBatches(torch.arange(len(fit_images)), c.batch_size, seed=c.seed)
        best = batches.best

        def validate(step: int) -> None:
            if not len(val_images):
                return
            self.model.eval()
            with torch.no_grad():
                loss = float(fastflow_loss(*self.model(val_feats)))
            self.model.train()
            batches.val_history.append((step, loss))
            if loss < best["loss"]:
                best.update(loss=loss, state=copy.deepcopy(self.model.state_dict()), step=step)

        def loss_fn(index: Tensor) -> Tensor:
            if batches.step % check_every == 0 and batches.step > 0:
                validate(batches.step)
            batches.step += 1
            zs, logdets = self.model([f[index] for f in feats])
            return fastflow_loss(zs, logdets)

        return TrainingRun(loss_fn, batches, steps, optimizer, {"fastflow": self.model},
                           seed=c.seed, desc="FastFlow", extra={"validate": validate})

    def finish_training(self, run) -> None:
        """After the loop: a last validation, then keep the best weights."""
        best = run.batches.best
        self.history = run.history
        run.extra["validate"](run.steps)
        self.val_history = run.batches.val_history
        if best["state"] is not None:
            self.model.load_state_dict(best["state"])
        self.best_step = best["step"] if best["state"] is not None else run.steps
        self.model.eval()

    def state_dict(self) -> dict:
        """Backbone and flow weights and the training record (see ``adlab.detector.save_detector``)."""
        state = get_state(self, ("extractor", "model", "image_size", "history", "val_history",
                                 "best_step"))
        return {**state, "shapes": [tuple(s) for s in self.model.shapes]}

    def load_state_dict(self, state: dict) -> None:
        self._extractor(state["image_size"])
        self.model = self._build_model([tuple(s) for s in state["shapes"]])
        set_state(self, {k: v for k, v in state.items() if k != "shapes"})
        self.model.eval()

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        if self.model is None:
            raise RuntimeError("FastFlow.predict before fit: call fit(train_images) first.")
        images = images_of(images)
        self.model.eval()
        zs, _ = self.model(self.features(images))
        maps = anomaly_map(zs, images.shape[-2:])
        return Prediction(topk_mean(maps, 1), maps)


__all__ = ["FastFlow", "FastFlowConfig", "FastFlowModel", "TransformerFeatures", "anomaly_map",
           "fastflow_flow", "fastflow_loss", "is_transformer", "official_settings"]
