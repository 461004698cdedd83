"""EfficientAD: "Accurate Visual Anomaly Detection at Millisecond-Level Latencies"
(Batzner, Heckler & König, WACV 2024).

A student PDN learns to predict a frozen teacher PDN on normal images; where it fails, the
image is anomalous. Where the paper leaves a detail open this file does what
nelson1425/EfficientAD does (commit fcab514; it reproduces the paper; cited as file:line):

1. Teacher (Sec. 3.1): a PDN distilled from WideResNet-101 features
   (:mod:`adlab.distill.teacher`); its outputs are normalised per channel with mean and std
   over the training images (``efficientad.py:159, 341-366``).
2. Student-teacher loss (Sec. 3.2): the hard feature loss (``p_hard = 0.999``, quantile per
   image) plus the penalty ``mean(S(P)^2)`` on pretraining images ``P``
   (:mod:`adlab.distill.losses`; ``efficientad.py:174-187``).
3. Autoencoder (Sec. 3.3): ``L_AE = mean((T(x') - A(x'))^2)`` and
   ``L_STAE = mean((A(x') - S'(x'))^2)``, with ``x'`` a colour-jittered image and ``S'`` the
   student's second ``C`` channels; the autoencoder gets gradients from both terms
   (``efficientad.py:189-198``). Total loss ``L_ST + L_AE + L_STAE``.
4. Training: Adam over student and autoencoder, lr 1e-4, weight decay 1e-5, 70,000 steps of
   one image, lr x 0.1 at 95 % of the steps (``efficientad.py:113, 161-165``); the last
   weights are kept (no selection on test data).
5. Maps (Sec. 3.4): ``st = mean_c (T - S)^2``, ``ae = mean_c (A - S')^2``; each is
   normalised with its 0.9 and 0.995 quantiles ``q_a, q_b`` over the pixels of a validation
   split: ``0.1 (m - q_a) / (q_b - q_a)``; the map is ``0.5 st + 0.5 ae``, padded by 4 cells
   and resized bilinearly to the image; the image score is its maximum
   (``efficientad.py:279-339``).

Where we differ, and why:

* The validation split is a seeded random 10 % of the *training* images (as the reference,
  ``efficientad.py:95-103``); anomalib's implementation takes the quantiles from the test
  set, which we never do.
* The colour jitter is applied after resizing (the reference jitters the full-size image,
  ``efficientad.py:60-61``): the images arrive resized here; it is a per-pixel change up to
  the contrast's mean.
* Without an ImageNet folder (``imagenet=None``, always offline) the penalty images and the
  teacher's pretraining images are crops of scikit-image's bundled photographs
  (:func:`adlab.distill.teacher.offline_images`). The reference disables the penalty when no
  ImageNet path is given (``efficientad.py:77-79``); the paper uses it, so do we.
* Quick profile: 128 px (24 x 24 maps), PDN width 16 (an eighth of the paper's channels),
  C = 64 teacher channels, 200 steps of one image at lr 1e-3, and an *untrained* PDN teacher:
  offline there is no pretrained backbone worth distilling (see ``teacher`` below and notebook
  22's ablation). Same code path as the paper profile.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.data.mvtec import normalize
from adlab.detector import Prediction, make_config
from adlab.distill.autoencoder import PAPER_DECODER_SIZES, autoencoder
from adlab.distill.losses import hard_feature_loss, penalty_loss
from adlab.distill.pdn import output_size, pdn
from adlab.distill.teacher import SKIMAGE_GREY, SKIMAGE_PHOTOS


@dataclass
class EfficientADConfig:
    """EfficientAD hyperparameters; defaults follow the active profile."""

    # "small" (EfficientAD-S) or "medium" (EfficientAD-M), Sec. 3.1 / 4.
    model_size: str = "small"
    # Input side (Sec. 4: 256 px; efficientad.py:46). Quick: 128 px, maps of 24 x 24.
    image_size: int = field(default_factory=lambda: by_profile(quick=128, paper=256))
    # PDN width: first-conv channels of PDN-S (128, common.py:67; PDN-M doubles). Quick: 16.
    width: int = field(default_factory=lambda: by_profile(quick=16, paper=128))
    # Teacher channels C (Sec. 3.1: 384; efficientad.py:45); the student has 2 C. Quick: 64.
    out_channels: int = field(default_factory=lambda: by_profile(quick=64, paper=384))
    # Autoencoder decoder sizes (common.py:26-51 for 256 px); quick: fewer, smaller stages.
    ae_decoder_sizes: tuple = field(default_factory=lambda: by_profile(
        quick=(3, 8, 15), paper=PAPER_DECODER_SIZES))
    # Hard feature mining quantile (Sec. 3.2: 0.999); 0 = plain MSE (the ablation).
    p_hard: float = 0.999
    # Penalty mean(S(P)^2) on pretraining images (Sec. 3.2); off = the ablation.
    penalty: bool = True
    # Autoencoder + the student's second half (Sec. 3.3); off = student-teacher only.
    use_autoencoder: bool = True
    # Map normalisation with validation quantiles (Sec. 3.4; efficientad.py:335-338).
    normalize_maps: bool = True
    q_a: float = 0.9
    q_b: float = 0.995
    # Fraction of the training images held out for the quantiles (efficientad.py:96-103: 10 %).
    val_fraction: float = 0.1
    # Adam lr 1e-4, weight decay 1e-5 (Sec. 4; efficientad.py:161-163; pretraining.py:90 for
    # the teacher). Quick: lr 1e-3, since a few hundred steps replace 70,000.
    lr: float = field(default_factory=lambda: by_profile(quick=1e-3, paper=1e-4))
    weight_decay: float = 1e-5
    # lr x 0.1 after this fraction of the steps (efficientad.py:164-165: 0.95).
    lr_drop_at: float = 0.95
    # Optimiser steps (Sec. 4: 70,000; efficientad.py:39). Quick: 200 (about 4 passes over
    # the 54 fitting images of a synthetic category).
    steps: int = field(default_factory=lambda: by_profile(quick=200, paper=70_000))
    # Images per step (efficientad.py:113: 1).
    batch_size: int = 1
    # Teacher: "distilled" (Sec. 3.1) or "random" (an untrained PDN, seeded). Quick: random.
    # Offline there is no pretrained backbone to distil; distilling a *random* ResNet-18 (the
    # same code path, trained in notebook 20, ablated in notebook 22) gave a worse teacher on the
    # synthetic textures (stone image AUROC 0.73 against 0.93 with a random PDN, seed 0).
    teacher: str = field(default_factory=lambda: by_profile(quick="random", paper="distilled"))
    # Seed of the random teacher: one teacher for every student, as the paper's one distilled
    # teacher (``seed`` varies the student, the autoencoder and the batches only).
    teacher_seed: int = 0
    # A state dict of a pretrained teacher (e.g. nelson1425/EfficientAD models/teacher_small.pth,
    # whose layer keys match pdn()); used whatever ``teacher`` says. None: ``teacher`` decides.
    teacher_weights: str | None = None
    # Distillation target backbone: WideResNet-101 layer2 + layer3 (Sec. 3.1;
    # pretraining.py:62-66). Quick: ResNet-18, random init.
    teacher_backbone: str = field(default_factory=lambda: by_profile(
        quick="resnet18", paper="wide_resnet101_2"))
    # Target layers, and how much larger the target backbone sees the image (pretraining.py:
    # 38-47, 66: layer2 + layer3 at 512 px for the PDN's 256 px). Quick: layer1 + layer2 of the
    # random ResNet-18 at the PDN's own size (same 4 px grid); its layer2 + layer3 at twice
    # the size distilled into a worse teacher (weave / stone 0.82 / 0.63, seed 0).
    teacher_layers: tuple = field(default_factory=lambda: by_profile(
        quick=("layer1", "layer2"), paper=("layer2", "layer3")))
    teacher_target_scale: int = field(default_factory=lambda: by_profile(quick=1, paper=2))
    # Teacher pretraining: 60,000 steps of 16 (pretraining.py:79, 92). Quick: 150 steps of
    # 16 on 128 crops at 64 px (the target sees 128 px).
    teacher_steps: int = field(default_factory=lambda: by_profile(quick=150, paper=60_000))
    # The reference streams ImageNet; here a random sample held in memory (and, in the quick
    # profile, its targets computed once).
    teacher_images: int = field(default_factory=lambda: by_profile(quick=128, paper=2_000))
    cache_targets: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))
    teacher_image_size: int = field(default_factory=lambda: by_profile(quick=64, paper=256))
    # Folder of ImageNet images for the penalty and the teacher; None: offline stand-in.
    imagenet: str | None = None
    # Penalty images held in memory (the reference streams ImageNet, efficientad.py:128-132).
    penalty_images: int = field(default_factory=lambda: by_profile(quick=64, paper=1_000))
    pretrained: bool | None = None   # target backbone weights; None: the profile's choice
    seed: int = 0
    predict_batch: int = 16
    single_thread: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))


# ----------------------------------------------------------------------------- small steps

def color_jitter(images: Tensor, generator: torch.Generator | None = None,
                 strength: float = 0.2) -> Tensor:
    """One random colour change per image: brightness, contrast or saturation by a factor in
    ``[1 - strength, 1 + strength]`` (``efficientad.py:54-58``: RandomChoice of three
    ColorJitter(0.2)); images in [0, 1]."""
    out = []
    for x in images:
        kind = ("brightness", "contrast", "saturation")[int(torch.randint(3, (1,), generator=generator))]
        factor = 1 - strength + 2 * strength * torch.rand(1, generator=generator).item()
        out.append(adjust(x, kind, factor))
    return torch.stack(out)


def adjust(x: Tensor, kind: str, factor: float) -> Tensor:
    """torchvision's ``adjust_brightness / contrast / saturation`` of one image ``[3, H, W]``:
    blend with black, with the mean grey level, or with the image's grey version."""
    gray = (x * torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)).sum(0, keepdim=True)
    other = {"brightness": torch.zeros_like(x), "contrast": gray.mean().expand_as(x),
             "saturation": gray.expand_as(x)}[kind]
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def normalize_map(m: Tensor, q_a: Tensor | float, q_b: Tensor | float) -> Tensor:
    """Sec. 3.4: ``0.1 (m - q_a) / (q_b - q_a)``: q_a maps to 0, q_b to 0.1."""
    return 0.1 * (m - q_a) / (q_b - q_a)


def map_quantiles(maps: Tensor, q_a: float = 0.9, q_b: float = 0.995) -> tuple[Tensor, Tensor]:
    """The ``q_a`` and ``q_b`` quantiles (linear) over all pixels of validation ``maps``."""
    flat = maps.flatten().to(torch.promote_types(maps.dtype, torch.float32))
    return torch.quantile(flat, q_a), torch.quantile(flat, q_b)


def to_image_size(maps: Tensor, size) -> Tensor:
    """PDN maps ``[B, h, w]`` -> ``[B, H, W]``: zero-pad 4 cells (the outputs' 33 px fields
    are centred 16 px in, one 4 px cell from the padded grid's), resize bilinearly
    (``efficientad.py:279-281``)."""
    padded = F.pad(maps[:, None], (4, 4, 4, 4))
    return F.interpolate(padded, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _teacher_key(c: EfficientADConfig) -> str:
    fields = {k: getattr(c, k) for k in ("model_size", "width", "out_channels", "teacher_backbone",
                                         "teacher_steps", "teacher_images", "teacher_image_size",
                                         "imagenet", "pretrained", "lr", "weight_decay",
                                         "teacher_layers", "teacher_target_scale")}
    fields["offline_source"] = SKIMAGE_PHOTOS + SKIMAGE_GREY
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def teacher_for(config: EfficientADConfig, progress: bool = True, refresh: bool = False) -> nn.Module:
    """The teacher PDN for ``config``: loaded, distilled (and cached), or random.

    Distilling is done once per teacher setting and shared by every student (the paper
    pretrains one teacher for all categories); the result is cached under
    ``adlab.config.cache_dir()`` with its loss history (``teacher.history``). ``refresh``
    distils again (deterministic: the same weights) and overwrites the cache.
    """
    from adlab.config import cache_dir
    from adlab.distill.teacher import DistillationTarget, offline_images, pretrain_teacher
    from adlab.train import load_checkpoint, save_checkpoint

    c = config
    if c.teacher not in ("distilled", "random"):
        raise ValueError(f"teacher must be 'distilled' or 'random'; got {c.teacher!r}.")
    teacher = pdn(c.model_size, c.out_channels, c.width)
    if c.teacher_weights is not None:
        try:
            teacher.load_state_dict(torch.load(c.teacher_weights, map_location="cpu",
                                               weights_only=True))
        except Exception as exc:
            raise ValueError(f"Could not load teacher weights {c.teacher_weights} into a PDN-"
                             f"{c.model_size[0].upper()} with width {c.width} and {c.out_channels} "
                             f"channels ({type(exc).__name__}); use a state dict of that layout "
                             "(e.g. nelson1425/EfficientAD models/teacher_small.pth with the "
                             "paper profile's sizes).") from exc
        teacher.history = []
        return teacher.eval().requires_grad_(False)
    if c.teacher == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.teacher_seed)
            teacher = pdn(c.model_size, c.out_channels, c.width)
        teacher.history = []
        return teacher.eval().requires_grad_(False)
    path = cache_dir() / f"efficientad_teacher_{_teacher_key(c)}.pt"
    if path.exists() and not refresh:
        state = load_checkpoint(path)
        teacher.load_state_dict(state["weights"])
        teacher.history = state["history"]
        return teacher.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        padded = pdn(c.model_size, c.out_channels, c.width, padding=True)
    target = DistillationTarget(c.teacher_backbone, c.teacher_layers, c.out_channels,
                                pretrained=c.pretrained, seed=0)
    if c.imagenet is not None:
        images = load_folder(c.imagenet, c.teacher_images, c.teacher_image_size, grayscale_p=0.1,
                             crop=False)
    else:
        images = offline_images(c.teacher_images, c.teacher_image_size, seed=0, grayscale_p=0.1)
    history = pretrain_teacher(padded, target, images, c.teacher_steps, lr=c.lr,
                               weight_decay=c.weight_decay, cache_targets=c.cache_targets,
                               target_scale=c.teacher_target_scale,
                               progress=progress)
    teacher.load_state_dict(padded.state_dict())   # same weights; no padding from now on
    teacher.history = history
    save_checkpoint(path, {"weights": teacher.state_dict(), "history": history})
    return teacher.eval().requires_grad_(False)


def load_folder(folder: str, n: int, size: int, seed: int = 0, grayscale_p: float = 0.0,
                crop: bool = True) -> Tensor:
    """``n`` random images (``*.JPEG``, ``*.jpg``, ``*.png``, searched recursively) of ``folder``,
    a fraction ``grayscale_p`` turned grey. ``crop``: resized to ``2 size`` and centre-cropped
    to ``size`` (the penalty's transform, ``efficientad.py:120-127``); else resized to ``size``
    (the teacher pretraining's, ``pretraining.py:43-47``)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from adlab.distill.teacher import to_grayscale

    files = sorted(p for p in Path(folder).rglob("*")
                   if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise FileNotFoundError(f"No images (*.jpg, *.jpeg, *.png) under {folder}; point imagenet= "
                                "at an ImageNet train folder, or leave it None for the offline set.")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(files), (n,), generator=g)
    out = torch.empty(n, 3, size, size)
    for i, j in enumerate(pick.tolist()):
        side = 2 * size if crop else size
        img = Image.open(files[j]).convert("RGB").resize((side, side), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out[i] = x[:, size // 2:size // 2 + size, size // 2:size // 2 + size] if crop else x
        if torch.rand(1, generator=g).item() < grayscale_p:
            out[i] = to_grayscale(out[i])
    return out


# ----------------------------------------------------------------------------- the detector

class EfficientAD:
    """EfficientAD detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``teacher``, ``student``, ``autoencoder`` (None without it), ``t_mean``,
    ``t_std`` (teacher channel statistics), ``quantiles`` (``{"st": (q_a, q_b), "ae": ...}``),
    ``history`` (total loss per step) and ``parts`` (the loss terms of the last step).
    """

    Config = EfficientADConfig

    def __init__(self, config: EfficientADConfig | None = None, **overrides):
        from adlab.config import device

        self.config = make_config(type(self).Config, config, overrides)
        c = self.config
        if c.model_size not in ("small", "medium"):
            raise ValueError(f"model_size must be 'small' or 'medium'; got {c.model_size!r}.")
        if not 0 <= c.q_a < c.q_b <= 1:
            raise ValueError(f"Need 0 <= q_a < q_b <= 1 for map normalisation; got q_a={c.q_a}, "
                             f"q_b={c.q_b} (the paper uses 0.9 and 0.995).")
        self.map_size = output_size(c.image_size)
        self.device = device()
        self.student = None

    # -- pieces -------------------------------------------------------------------------
    def _input(self, images: Tensor) -> Tensor:
        """Resize to ``image_size`` (ignoring aspect, efficientad.py:50) and ImageNet-normalise."""
        s = self.config.image_size
        images = images.to(self.device).float()
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False,
                                   antialias=True)
        return normalize(images)

    def teacher_features(self, x: Tensor) -> Tensor:
        """Normalised teacher output ``(T(x) - mean) / std`` of a normalised input ``x``."""
        with torch.no_grad():
            return (self.teacher(x) - self.t_mean) / self.t_std

    def losses(self, images: Tensor, penalty_images: Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every loss term of one training step (images in [0, 1]); the terms of the reference
        (efficientad.py:174-198). The student sees the image, the penalty images and the
        jittered image in one batched pass, the teacher the image and the jittered image:
        a PDN has no batch statistics, so this equals separate passes, with less overhead."""
        c, C, B = self.config, self.config.out_channels, len(images)
        views = [self._input(images)]
        if self.autoencoder is not None:
            views.append(self._input(color_jitter(images, generator)))       # x'
        teacher = self.teacher_features(torch.cat(views)).split(B)
        pen = [] if penalty_images is None else [self._input(penalty_images)]
        student = self.student(torch.cat(views[:1] + pen + views[1:]))
        s_x, rest = student[:B], student[B:]
        parts = {"hard": hard_feature_loss(teacher[0], s_x[:, :C], c.p_hard)}
        if penalty_images is not None:
            parts["penalty"] = penalty_loss(rest[:len(penalty_images), :C])
            rest = rest[len(penalty_images):]
        if self.autoencoder is not None:
            a = self.autoencoder(views[1])
            parts["ae"] = ((teacher[1] - a) ** 2).mean()
            parts["stae"] = ((a - rest[:, C:]) ** 2).mean()
        return parts

    @torch.no_grad()
    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Unnormalised ``(st, ae)`` maps ``[B, h, w]`` on the PDN grid (ae None without AE)."""
        C = self.config.out_channels
        x = self._input(images)
        s = self.student(x)
        st = ((self.teacher_features(x) - s[:, :C]) ** 2).mean(1)
        if self.autoencoder is None:
            return st, None
        return st, ((self.autoencoder(x) - s[:, C:]) ** 2).mean(1)

    def combine(self, st: Tensor, ae: Tensor | None, normalized: bool | None = None) -> Tensor:
        """The combined map on the PDN grid: normalised (or not) ``0.5 st + 0.5 ae``."""
        normalized = self.config.normalize_maps if normalized is None else normalized
        if normalized:
            st = normalize_map(st, *self.quantiles["st"])
            ae = None if ae is None else normalize_map(ae, *self.quantiles["ae"])
        return st if ae is None else 0.5 * st + 0.5 * ae

    # -- fit / predict ------------------------------------------------------------------
    def fit(self, train, progress: bool = True) -> "EfficientAD":
        """Train student (and autoencoder) on defect-free images, then take the quantiles."""
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train, progress=progress), progress)

    def training_run(self, train, steps: int | None = None, progress: bool = True):
        """Everything :func:`adlab.train.train` needs (see :class:`adlab.train.TrainingRun`).

        Splits off the validation images, gets the teacher (distilling it first if it is
        not cached: a training stage of its own, with its own bar), normalises it over the
        fitting images, builds student and autoencoder, and the loss of Sec. 3.
        """
        from adlab.distill.teacher import offline_images
        from adlab.features import images_of
        from adlab.flows.pyramidflow import one_thread
        from adlab.train import RandomBatches, TrainingRun, holdout

        c = self.config
        images = images_of(train)
        fit_images, val_images = holdout(images, c.val_fraction, c.seed)
        if len(val_images) == 0 or len(fit_images) == 0:
            raise ValueError(f"EfficientAD needs training images for both fitting and the "
                             f"validation quantiles; {len(images)} images with val_fraction="
                             f"{c.val_fraction} leaves one side empty. Add images or change it.")
        with one_thread(c.single_thread):
            self.teacher = teacher_for(c, progress).to(self.device)
            self.t_mean, self.t_std = self._teacher_stats(fit_images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            C2 = 2 * c.out_channels if c.use_autoencoder else c.out_channels
            self.student = pdn(c.model_size, C2, c.width).to(self.device)
            self.autoencoder = (autoencoder(c.out_channels, c.image_size, self.map_size,
                                            c.ae_decoder_sizes).to(self.device)
                                if c.use_autoencoder else None)
        if c.penalty:
            penalty_bank = (load_folder(c.imagenet, c.penalty_images, c.image_size, c.seed, 0.3)
                            if c.imagenet is not None else
                            offline_images(c.penalty_images, c.image_size, seed=1000 + c.seed,
                                           grayscale_p=0.3))
            penalty_batches = RandomBatches(penalty_bank, c.batch_size, c.seed + 1)
        modules = {"student": self.student}
        if self.autoencoder is not None:
            modules["autoencoder"] = self.autoencoder
        params = [p for m in modules.values() for p in m.parameters()]
        optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        steps = c.steps if steps is None else steps
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, int(c.lr_drop_at * steps)), gamma=0.1)
        jitter = torch.Generator().manual_seed(c.seed)

        def loss_fn(batch: Tensor) -> Tensor:
            parts = self.losses(batch, next(penalty_batches) if c.penalty else None, jitter)
            self.parts = {k: float(v.detach()) for k, v in parts.items()}
            return sum(parts.values())

        for m in modules.values():
            m.train()
        return TrainingRun(loss_fn, RandomBatches(fit_images, c.batch_size, c.seed), steps,
                           optimizer, modules, scheduler=scheduler, seed=c.seed,
                           desc="EfficientAD", extra={"val_images": val_images},
                           context=lambda: one_thread(c.single_thread))

    def finish_training(self, run) -> None:
        """After the loop: eval mode, and the map quantiles over the validation images."""
        from adlab.features import batches

        c = self.config
        self.history = run.history
        for m in run.modules.values():
            m.eval()
        raw = [self.raw_maps(b) for b in batches(run.extra["val_images"], c.predict_batch)]
        self.val_maps = {"st": torch.cat([r[0] for r in raw])}
        self.quantiles = {"st": map_quantiles(self.val_maps["st"], c.q_a, c.q_b)}
        if self.autoencoder is not None:
            self.val_maps["ae"] = torch.cat([r[1] for r in raw])
            self.quantiles["ae"] = map_quantiles(self.val_maps["ae"], c.q_a, c.q_b)

    #: What a fitted detector is (see ``adlab.detector.save_detector``).
    STATE = ("teacher", "student", "autoencoder", "t_mean", "t_std", "quantiles", "history")

    def state_dict(self) -> dict:
        """Teacher, student and autoencoder weights, teacher statistics, map quantiles."""
        from adlab.detector import get_state

        return get_state(self, self.STATE)

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the networks from the config (random init), then take the saved state."""
        from adlab.detector import set_state

        c = self.config
        self.teacher = pdn(c.model_size, c.out_channels, c.width).to(self.device)
        C2 = 2 * c.out_channels if c.use_autoencoder else c.out_channels
        self.student = pdn(c.model_size, C2, c.width).to(self.device)
        self.autoencoder = (autoencoder(c.out_channels, c.image_size, self.map_size,
                                        c.ae_decoder_sizes).to(self.device)
                            if c.use_autoencoder else None)
        set_state(self, state)
        for m in (self.teacher, self.student, self.autoencoder):
            if m is not None:
                m.eval().requires_grad_(False)

    @torch.no_grad()
    def _teacher_stats(self, images: Tensor) -> tuple[Tensor, Tensor]:
        from adlab.distill.teacher import channel_stats
        from adlab.features import batches

        return channel_stats(self.teacher(self._input(b))
                             for b in batches(images, self.config.predict_batch))

    @torch.no_grad()
    def predict(self, images: Tensor, normalized: bool | None = None) -> Prediction:
        """Combined map resized to the input (bilinear, after 4-cell zero padding); score = max."""
        from adlab.flows.pyramidflow import one_thread

        if self.student is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"predict expects images [B, 3, H, W] in [0, 1]; got shape "
                             f"{tuple(images.shape)}.")
        with one_thread(self.config.single_thread):
            maps = to_image_size(self.combine(*self.raw_maps(images), normalized),
                                 images.shape[-2:])
        return Prediction(maps.flatten(1).amax(1), maps)


@dataclass
class EfficientADMediumConfig(EfficientADConfig):
    """EfficientAD-M hyperparameters: the medium PDN (Sec. 3.1), the rest as EfficientAD-S."""

    model_size: str = "medium"


class EfficientADMedium(EfficientAD):
    """EfficientAD-M: the same method with the medium PDN (Sec. 3.1)."""

    Config = EfficientADMediumConfig


__all__ = ["EfficientAD", "EfficientADMedium", "EfficientADConfig", "EfficientADMediumConfig", "color_jitter", "adjust",
           "normalize_map", "map_quantiles", "to_image_size", "teacher_for", "load_folder"]
