"""Fixed-step diffusion reconstruction: the baseline detector of the diffusion chapter.

A denoiser trained on defect-free images (:mod:`adlab.diffusion.denoiser`) is given the test
image noised to a fixed step t (DDPM Eq. 4, one fixed eps for every image), and DDIM
(Song et al. 2021, Eq. 12, eta = 0) walks it back to the data. The model only knows normal
appearance, so a defect comes back "repaired"; comparing input and reconstruction locates it.
This is GLAD's baseline (Yao et al., ECCV 2024, Table 6 "baseline": a fixed number of steps
from T, no ADS / SAFF / ATP) and the shape of DiffAD / DDAD style detectors.

The comparison (GLAD Sec. 3.4; hyao1/GLAD ``main.py``, ``test``):

* ``score_map="features"`` (default): a frozen backbone embeds input and reconstruction; per
  layer, each input patch p_i gets ``min_j (1 - cos(p_i, r_j))`` over *all* reconstruction
  patches r_j (``match="min"``, as GLAD), upsampled and summed over layers; plus a pixel term
  ``v * max(map) / max(L1) * L1`` (L1 the channel mean of |x - x_rec|); Gaussian blur; the
  image score is the mean of the top-K pixels. We keep GLAD's min over all patches by default
  because a reconstruction is never pixel-aligned (a texture is re-synthesised a little
  shifted, an edge moves by a pixel): the min asks "does this input patch exist anywhere in
  the repaired image?", which forgives shifts and still flags a defect, which exists nowhere.
  ``match="aligned"`` compares patch i with patch i only (cheaper: O(N) instead of O(N^2);
  stricter for logical defects such as a missing part whose patch looks like background
  elsewhere).
* ``score_map="pixel"``: channel-mean |x - x_rec|; ``"ssim"``: 1 - SSIM (Wang et al. 2004,
  Eq. 13, Gaussian window sigma 1.5) averaged over channels.

Quick profile (CPU, synthetic data): a 64 px pixel-space UNet trained ~1 minute on 32 px crops
and compared with the *pixel* map; each choice is measured in :class:`ReconstructionConfig`'s
comments (random-init ResNet-18 features compared a reconstruction worse than pixels did).

Where we differ from the official code, and why:

* The image is noised to the first step the sampler visits (t_1 = 721 for T = 750, 25 steps,
  SD's ``steps_offset = 1``); the official code noises to T itself and then calls the UNet at
  t_1 (``utilize/utilize.py:75-89``), a small mismatch of noise level we do not copy.
* ``v * max(map) / max(L1)`` uses each image's own maxima; the official code takes them over
  the test batch (``main.py``, ``test``), which makes a score depend on its batch-mates.
* L1 is taken on images in [0, 1]; the official code takes it after ImageNet normalisation
  (a per-channel rescaling; the max-ratio factor cancels the overall scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.config import by_profile
from adlab.detector import Prediction, make_config
from adlab.diffusion.ddim import _alpha_bar_at, ddim_update, predict_x0, q_sample, timesteps
from adlab.diffusion.denoiser import SD_MODEL
from adlab.diffusion.schedules import Schedule
from adlab.features import ViTFeatures, gaussian_blur, images_of, topk_mean

__all__ = ["ReconstructionConfig", "DiffusionReconstruction", "ViTFeatures", "build_extractor",
           "min_cosine_map", "feature_distance_map", "pixel_l1", "ssim_map", "add_pixel_term",
           "ddim_reconstruct", "inference_timesteps", "SCORE_MAPS"]

SCORE_MAPS = ("features", "pixel", "ssim")

#: The notebooks' trained detectors (package data, float16): ``glad_stone_seed{0,1,2}.pt``
#: (ATP) and ``glad_plain_stone_seed{0,1,2}.pt`` (DDPM's loss), each written by
#: ``python -m adlab train glad --category stone --seed S --half --out adlab/checkpoints/FILE``
#: (plus ``--set atp=False`` for the plain ones) with the quick profile's defaults; TDAD's
#: ``tdad_stone_seed{0,1,2}.pt`` and ``tdad_single_stone_seed{0,1,2}.pt`` by ``python -m adlab
#: train tdad --category stone --seed S --half --out ...`` (plus ``--set multiscale=False``).
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: Settings that define the denoiser itself (the rest only change inference).
DENOISER_SETTINGS = ("image_size", "latent", "sd_model", "unet_channels", "layers_per_block",
                     "attention", "schedule")


@dataclass
class ReconstructionConfig:
    """Hyperparameters of the diffusion reconstruction detectors (baseline and GLAD).

    Quick defaults were chosen on the synthetic data (see the comments: measured with
    ``python -m adlab bench``, seed 0, 2 CPU threads); paper defaults cite hyao1/GLAD.
    """

    # --- the denoiser ---------------------------------------------------------------------
    # Paper: 512 px images, SD's VAE -> 64 x 64 latents (train.sh --resolution 512). Quick:
    # a pixel-space UNet at 64 px, trained on 32 px crops (train_crop). Measured (stone, seed 0):
    # at 32 px even PatchCore's image AUROC drops to 0.81 (0.93 at 64 px) and the best fixed-step
    # reconstruction we found at 32 px reached 0.75; at 64 px 0.85.
    image_size: int = field(default_factory=lambda: by_profile(quick=64, paper=512))
    latent: bool = field(default_factory=lambda: by_profile(quick=False, paper=True))
    # A hub id or local folder of Stable Diffusion v1.4 (paper), or "tiny-random" (offline
    # stand-in with SD's shape, tests only).
    sd_model: str = SD_MODEL
    prompt: str = "a photo of sks"          # train.sh --instance_prompt
    guidance_scale: float = 9.0             # utilize/utilize.py: guidance_scale=9 (latent only)
    # Quick UNet widths: (32, 64, 64), one ResNet block per level, no attention (a train step of
    # batch 8 at 32 px: ~0.2 s on one thread, so 300 steps fit the ~60 s budget).
    unet_channels: tuple = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False
    # "linear": DDPM's 1e-4..0.02 (quick); "scaled_linear": SD's 0.00085..0.012 (paper).
    schedule: str = field(default_factory=lambda: by_profile(quick="linear", paper="scaled_linear"))
    # --- training -------------------------------------------------------------------------
    # Paper: 4000 steps, batch 2, AdamW lr 5e-6 constant, weight decay 1e-2, grad clip 1.0
    # (train.sh; main.py argparse defaults adam_weight_decay 1e-2, max_grad_norm 1.0).
    train_steps: int = field(default_factory=lambda: by_profile(quick=300, paper=4000))
    batch_size: int = field(default_factory=lambda: by_profile(quick=8, paper=2))
    lr: float = field(default_factory=lambda: by_profile(quick=2e-3, paper=5e-6))
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # "constant" (the paper: train.sh --lr_scheduler constant) or "cosine" decay to 0 (quick:
    # a short run's last iterate is noisy at a high lr, and its colour bias shows in every
    # reconstruction).
    lr_schedule: str = field(default_factory=lambda: by_profile(quick="cosine", paper="constant"))
    # Training noise levels t ~ U{0 .. train_t_max - 1}. Paper: all 1000 (main.py,
    # train_one_epoch). Quick: only the levels inference visits (T <= 400), so the short training
    # budget is spent where it is used (measured below, with T).
    train_t_max: int = field(default_factory=lambda: by_profile(quick=500, paper=1000))
    # Train on random square crops of this side (None: whole images). A UNet is convolutional,
    # so crops train the same local denoiser at a fraction of the cost (quick; the paper trains
    # on whole 512 px images).
    train_crop: int | None = field(default_factory=lambda: by_profile(quick=32, paper=None))
    # ATP training (GLAD Sec. 3.3); the plain baseline trains with DDPM's loss.
    atp: bool = False
    p_synthetic: float = 0.5                # dataset/dataset.py: half the samples synthetic
    synth_threshold: float = 0.3            # dataset/dataset.py: Perlin threshold 0.3
    foreground: bool = False                # Otsu foreground for objects (some MVTec classes)
    # --- reconstruction -------------------------------------------------------------------
    # Paper: T = 750 for MVTec (main.py CLSNAMES[...][0]), 25 DDIM steps, leading spacing with
    # SD's steps_offset 1 (the first UNet call at t = 721). Quick fixed-step baseline: T = 100,
    # GLAD's quick T, so that the baseline starts from GLAD's maximum step as in the paper's
    # Table 6. It is not the fixed-step detector's best T on the synthetic data: measured (seed 0,
    # pixel map, image AUROC at T 10 / 25 / 50 / 100): nut 0.820 / 0.812 / 0.733 / 0.616, pins
    # 0.802 / 0.792 / 0.739 / 0.661, stone 0.942 / 0.930 / 0.892 / 0.811 (0.723 at 200), weave
    # 0.945 at T 10 (0.898 at 100); the lightest noise keeps the normal texture and still pulls
    # the synthetic (colour / brightness) defects towards normal.
    T: int = field(default_factory=lambda: by_profile(quick=100, paper=750))
    num_steps: int = field(default_factory=lambda: by_profile(quick=10, paper=25))
    offset: int = field(default_factory=lambda: by_profile(quick=0, paper=1))
    # SD's scheduler config: set_alpha_to_one False (the last step ends at alpha_bar[0]).
    set_alpha_to_one: bool = field(default_factory=lambda: by_profile(quick=True, paper=False))
    # --- anomaly map ----------------------------------------------------------------------
    # Paper: "features". Quick: "pixel", chosen by measurement: with random-init ResNet-18
    # features the map found the texture's edges, not the defects (stone, seed 0, T 100: image
    # AUROC 0.61-0.65 over layer / size / matching choices, against 0.81-0.85 for the pixel map).
    score_map: str = field(default_factory=lambda: by_profile(quick="pixel", paper="features"))
    # Paper: DINO ViT-B/8, blocks 3, 6, 9, 12 before the final LayerNorm (main.py, test;
    # dino_model returns patch tokens of those blocks). Quick: random-init ResNet-18.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="vit_base_patch8_224.dino"))
    layers: tuple = field(default_factory=lambda: by_profile(
        quick=("layer1", "layer2", "layer3"), paper=(2, 5, 8, 11)))
    # Side of the images the backbone sees and of the map (main.py: dino_resolution 512 for MVTec /
    # MPDD). Quick: 128, the synthetic data's size.
    feature_size: int = field(default_factory=lambda: by_profile(quick=128, paper=512))
    match: str = "min"
    # Pixel-term weight v: 0 for every MVTec class, 1-7 for VisA (main.py CLSNAMES[...][2]).
    v: float = field(default_factory=lambda: by_profile(quick=0.0, paper=0.0))
    # Gaussian blur sigma in pixels of the feature_size map: 6 at 512 (main.py, test: sigma 6,
    # kernel 2 int(4 sigma + 0.5) + 1 = 49); quick: 1 at 128 px (stone, pixel map, T 100: image
    # AUROC 0.85 at sigma 1, 0.81 at 2, 0.83 at 4).
    sigma: float = field(default_factory=lambda: by_profile(quick=1.0, paper=6.0))
    # Image score: mean of the top-K map pixels at feature_size (main.py, test: 250 of 512^2);
    # quick: the same fraction at 128 px is ~16.
    top_k: int = field(default_factory=lambda: by_profile(quick=16, paper=250))
    # None: the profile's choice (pretrained in paper, random init in quick).
    pretrained: bool | None = None
    val_fraction: float = 0.1
    predict_batch: int = 16
    seed: int = 0


# --------------------------------------------------------------------------- features

def is_vit(backbone: str) -> bool:
    return backbone.split(".")[0].startswith(("vit_", "deit"))


def build_extractor(backbone: str, layers, feature_size: int, pretrained: bool, seed: int = 0):
    """A frozen feature extractor: a timm CNN (:class:`adlab.features.FeatureExtractor`) or ViT."""
    from adlab.features import FeatureExtractor

    if is_vit(backbone):
        # GLAD: DINO ViT-B/8 blocks 3, 6, 9, 12 (1-based) without the model's last LayerNorm
        # (hyao1/GLAD main.py, test)
        return ViTFeatures(backbone, layers, feature_size, pretrained, seed, norm=False)
    return FeatureExtractor(backbone, layers, pretrained, seed=seed)


# --------------------------------------------------------------------------- maps

def min_cosine_map(f_in: Tensor, f_rec: Tensor, match: str = "min") -> Tensor:
    """Per input patch, ``min_j (1 - cos(p_i, r_j))`` over reconstruction patches (GLAD Sec. 3.4;
    hyao1/GLAD ``main.py``, ``test``): ``[B, C, h, w]`` x 2 -> ``[B, h, w]``.

    ``match="aligned"``: ``1 - cos(p_i, r_i)`` (the same position only)."""
    B, C, h, w = f_in.shape
    a = F.normalize(f_in.flatten(2).float(), dim=1)       # [B, C, N]
    b = F.normalize(f_rec.flatten(2).float(), dim=1)
    if match == "min":
        d = (1 - torch.bmm(a.transpose(1, 2), b)).amin(-1)  # [B, N]
    elif match == "aligned":
        d = 1 - (a * b).sum(1)
    else:
        raise ValueError(f"match must be 'min' or 'aligned', got {match!r}.")
    return d.view(B, h, w)


def feature_distance_map(feats_in: Sequence[Tensor], feats_rec: Sequence[Tensor], size,
                         match: str = "min") -> Tensor:
    """Sum over layers of :func:`min_cosine_map`, each upsampled (bilinear) to ``size``."""
    total = 0.0
    for fi, fr in zip(feats_in, feats_rec):
        d = min_cosine_map(fi, fr, match).unsqueeze(1)
        total = total + F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=True)
    return total[:, 0]


def pixel_l1(x: Tensor, x_rec: Tensor) -> Tensor:
    """Channel mean of |x - x_rec|, ``[B, H, W]``."""
    return (x - x_rec).abs().mean(1)


def add_pixel_term(fmap: Tensor, l1: Tensor, v: float) -> Tensor:
    """GLAD's final map (``main.py``, ``test``): ``map + v * max(map) / max(L1) * L1``, per
    image."""
    if v == 0:
        return fmap
    ratio = fmap.flatten(1).amax(1) / l1.flatten(1).amax(1).clamp(min=1e-12)
    return fmap + v * ratio.view(-1, 1, 1) * l1


def ssim_map(x: Tensor, y: Tensor, sigma: float = 1.5, data_range: float = 1.0,
             truncate: float = 3.5) -> Tensor:
    """1 - SSIM per pixel (Wang et al. 2004, Eq. 13; Gaussian window sigma 1.5, K1 0.01,
    K2 0.03, population variances; the window truncated at 3.5 sigma as scikit-image's
    ``structural_similarity(gaussian_weights=True)``), averaged over channels:
    ``[B, C, H, W]`` x 2 -> ``[B, H, W]``."""
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    B, C, H, W = x.shape

    def blur(t):
        return gaussian_blur(t.reshape(B * C, H, W), sigma, truncate).view(B, C, H, W)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    return (1 - s).mean(1)


# --------------------------------------------------------------------------- helpers

def resize_images(images: Tensor, size: int) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] at ``size`` x ``size`` (antialiased bilinear)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def clip_before_every_step(optimizer, params, max_norm: float) -> None:
    """Clip the gradient norm of ``params`` to ``max_norm`` right before each optimiser step
    (after backward and any unscaling); nothing when ``max_norm`` is 0 or None."""
    def clip(*_) -> None:       # a pre-hook that returns something replaces step's arguments
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    if max_norm:
        optimizer.register_step_pre_hook(clip)


# --------------------------------------------------------------------------- sampling

def inference_timesteps(T: int, num_steps: int, offset: int = 0) -> Tensor:
    """The steps visited from noise level T: diffusers' "leading" spacing of a schedule whose
    ``num_train_timesteps`` is set to T (what hyao1/GLAD does, ``utilize/utilize.py:75-89``):
    ``arange(N) * (T // N) + offset`` reversed; e.g. T 750, N 25, offset 1 -> 721, 691, ..., 1."""
    return timesteps(int(num_steps), int(T), "leading", int(offset))


@torch.no_grad()
def ddim_reconstruct(model, z: Tensor, eps: Tensor, ts: Tensor, alpha_bar: Tensor,
                     set_alpha_to_one: bool = True) -> Tensor:
    """Fixed-step reconstruction: x_{t_1} = q_sample(z, t_1, eps) (DDPM Eq. 4), then DDIM
    (Eq. 12, eta 0) over ``ts``: x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat.

    ``model(x_t, t)`` returns eps_hat (for the latent denoiser: the guided prediction)."""
    ts = [int(t) for t in ts]
    x = q_sample(z, ts[0], eps, alpha_bar)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps_hat = model(x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
        ab_prev = _alpha_bar_at(alpha_bar, t_prev, x, set_alpha_to_one)
        x = ddim_update(predict_x0(x, t, eps_hat, alpha_bar), eps_hat, ab_prev)
    return x


# --------------------------------------------------------------------------- the detector

class DiffusionReconstruction:
    """Fixed-step reconstruction detector: ``fit(train)`` trains the denoiser (shared loop),
    ``predict(images)`` noises to T, denoises with DDIM and compares (module docstring).

    ``reconstruction(images)`` and ``score(x, x_rec, size)`` are predict's two halves, for
    notebooks that compare several maps on one reconstruction."""

    Config = ReconstructionConfig
    method = "ddim_recon"

    def __init__(self, config=None, **overrides):
        from adlab.config import device

        self.config = make_config(self.Config, config, overrides)
        c = self.config
        if c.score_map not in SCORE_MAPS:
            raise ValueError(f"score_map must be one of {SCORE_MAPS}; got {c.score_map!r}.")
        if c.match not in ("min", "aligned"):
            raise ValueError(f"match must be 'min' or 'aligned'; got {c.match!r}.")
        self.device = device()
        self.denoiser = None
        self.extractor = None
        self.history: list[float] = []
        sched = {"linear": Schedule.linear, "scaled_linear": Schedule.scaled_linear}
        if c.schedule not in sched:
            raise ValueError(f"schedule must be 'linear' or 'scaled_linear'; got {c.schedule!r}.")
        self.alpha_bar = sched[c.schedule]().alpha_bar.float()

    # -- building blocks ------------------------------------------------------------------
    def build_denoiser(self) -> nn.Module:
        from adlab.diffusion.denoiser import PixelDenoiser, load_stable_diffusion, pixel_unet

        c = self.config
        if c.latent:
            return load_stable_diffusion(c.sd_model, c.prompt, c.guidance_scale).to(self.device)
        return PixelDenoiser(pixel_unet(c.image_size, c.unet_channels, c.layers_per_block,
                                        c.attention, c.seed)).to(self.device)

    def _extractor(self):
        from adlab.config import profile

        c = self.config
        if self.extractor is None:
            pretrained = profile().pretrained if c.pretrained is None else bool(c.pretrained)
            self.extractor = build_extractor(c.backbone, c.layers, c.feature_size, pretrained,
                                             c.seed).to(self.device)
        return self.extractor

    def resize(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] at the denoiser's resolution (antialiased bilinear)."""
        return resize_images(images, self.config.image_size)

    def features(self, x: Tensor) -> list[Tensor]:
        """Backbone maps of model-range images x in [-1, 1], resized to ``feature_size``."""
        s = self.config.feature_size
        img = ((x + 1) / 2).clamp(0, 1)
        if tuple(img.shape[-2:]) != (s, s):
            img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=True)
        return self._extractor()(img)

    def noise(self, shape) -> Tensor:
        """The fixed eps: one seeded draw shared by every image (predictions do not depend on
        the batch an image is in)."""
        g = torch.Generator().manual_seed(self.config.seed + 12345)
        return torch.randn((1, *shape[1:]), generator=g).to(self.device).expand(shape)

    def timesteps(self) -> Tensor:
        c = self.config
        return inference_timesteps(c.T, c.num_steps, c.offset)

    # -- training -------------------------------------------------------------------------
    def fit(self, train, progress: bool = True):
        from adlab.train import train_detector

        return train_detector(self, self.training_run(train), progress)

    def training_run(self, train, steps: int | None = None):
        """The denoiser, AdamW, and DDPM's loss (or ATP's) for :func:`adlab.train.train`."""
        from adlab.data.synthesis import AnomalySynthesizer
        from adlab.diffusion.denoiser import atp_loss, denoising_loss
        from adlab.train import RandomBatches, TrainingRun, holdout

        c = self.config
        images = self.resize(images_of(train))
        fit_images, val_images = holdout(images, c.val_fraction, c.seed)
        if len(fit_images) == 0:
            raise ValueError(f"{type(self).__name__}: all {len(images)} training images went to "
                             f"validation (val_fraction={c.val_fraction}); lower val_fraction.")
        self.denoiser = self.build_denoiser()
        unet = self.denoiser.trainable
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        clip_before_every_step(optimizer, params, c.max_grad_norm)
        total = steps or c.train_steps
        scheduler = None
        if c.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
        elif c.lr_schedule != "constant":
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {c.lr_schedule!r}.")
        synth = AnomalySynthesizer(threshold=c.synth_threshold, foreground=c.foreground,
                                   normal_fraction=1 - c.p_synthetic)
        alpha_bar = self.alpha_bar.to(self.device)
        use_atp = self._trains_with_atp()
        t_max = min(int(c.train_t_max), alpha_bar.numel())
        crop = c.train_crop if c.train_crop and c.train_crop < images.shape[-1] else None

        def loss_fn(batch: Tensor) -> Tensor:
            # every random draw uses the global RNG, which the loop's checkpoint restores: a
            # resumed run is exact
            batch = batch.to(self.device)
            if crop is not None:
                corners = torch.randint(0, batch.shape[-1] - crop + 1, (len(batch), 2))
                batch = torch.stack([b[:, i:i + crop, j:j + crop]
                                     for b, (i, j) in zip(batch, corners.tolist())])
            t = torch.randint(0, t_max, (len(batch),), device=self.device)
            if use_atp:
                anomalous, _ = synth(batch)
                z_norm = self.denoiser.encode(batch * 2 - 1)
                z_anom = self.denoiser.encode(anomalous * 2 - 1)
                return atp_loss(self.denoiser, z_norm, z_anom, alpha_bar, t)
            return denoising_loss(self.denoiser, self.denoiser.encode(batch * 2 - 1), alpha_bar, t)

        self.denoiser.train()
        return TrainingRun(loss_fn, RandomBatches(fit_images, c.batch_size, c.seed),
                           total, optimizer, {"unet": unet}, scheduler=scheduler, seed=c.seed,
                           desc=type(self).__name__, extra={"val_images": val_images})

    def _trains_with_atp(self) -> bool:
        return bool(self.config.atp)

    def finish_training(self, run) -> None:
        self.history = run.history
        self.denoiser.eval()
        self.val_images = run.extra["val_images"]

    # -- save / load ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.denoiser is None:
            raise RuntimeError("Nothing to save: fit the detector first.")
        extractor = self._extractor().state_dict() if self.uses_backbone() else None
        return {"denoiser": self.denoiser.describe(), "weights": self.denoiser.state_dict(),
                "extractor": extractor, "history": list(self.history)}

    def uses_backbone(self) -> bool:
        """Whether any comparison runs the feature backbone (a pixel map needs none)."""
        return self.config.score_map == "features"

    def load_state_dict(self, state: dict) -> None:
        from adlab.diffusion.denoiser import denoiser_from_description

        self.denoiser = denoiser_from_description(state["denoiser"]).to(self.device)
        self.denoiser.load_state_dict(state["weights"])
        self.denoiser.eval()
        if state["extractor"] is not None:
            self._extractor().load_state_dict(state["extractor"])
        self.history = list(state["history"])

    @classmethod
    def with_denoiser_of(cls, path, **overrides):
        """This class with today's defaults (plus ``overrides``) and the trained denoiser of the
        detector file ``path``: one trained denoiser serves the fixed-step baseline and every
        GLAD variant, since T, delta, the steps and the map change only inference. The seed
        (which also fixes the reconstruction noise) is the file's unless given. The file's
        :data:`DENOISER_SETTINGS` must equal the new config's."""
        from adlab.detector import DetectorFileError, read_detector_file

        saved = read_detector_file(path)
        stored = saved["config"]
        overrides.setdefault("seed", stored.get("seed", 0))
        detector = cls(**overrides)
        for key in DENOISER_SETTINGS:
            ours = getattr(detector.config, key)
            theirs = stored.get(key)
            if (list(ours) if isinstance(ours, tuple) else ours) != \
                    (list(theirs) if isinstance(theirs, tuple) else theirs):
                raise DetectorFileError(f"{path}: its denoiser has {key}={theirs!r}, this "
                                        f"{cls.__name__} {key}={ours!r}; pass {key}={theirs!r}.")
        detector.load_state_dict(saved["state"])
        detector.info = {"method": saved["method"], **saved.get("info", {}),
                         "trained_with": {k: stored.get(k) for k in ("atp", "seed", "train_steps")}}
        return detector

    # -- predict --------------------------------------------------------------------------
    def reconstruct(self, z: Tensor, eps: Tensor) -> tuple[Tensor, dict]:
        """Model-space reconstruction of z and per-image extras (none for the baseline)."""
        c = self.config
        z_rec = ddim_reconstruct(self.denoiser.guided, z, eps, self.timesteps(),
                                 self.alpha_bar.to(z), c.set_alpha_to_one)
        return z_rec, {}

    def anomaly_maps(self, x: Tensor, x_rec: Tensor, feats_in=None) -> Tensor:
        """``[B, s, s]`` maps at ``feature_size`` (before blur) comparing x and x_rec in [-1, 1]."""
        c = self.config
        s = c.feature_size
        if c.score_map == "features":
            fi = self.features(x) if feats_in is None else feats_in
            fmap = feature_distance_map(fi, self.features(x_rec), (s, s), c.match)
            if c.v:
                up = lambda t: F.interpolate(t, size=(s, s), mode="bilinear", align_corners=True)
                fmap = add_pixel_term(fmap, pixel_l1(up((x + 1) / 2), up((x_rec + 1) / 2)), c.v)
            return fmap
        a, b = ((x + 1) / 2).clamp(0, 1), ((x_rec + 1) / 2).clamp(0, 1)
        a, b = (F.interpolate(t, size=(s, s), mode="bilinear", align_corners=True) for t in (a, b))
        return pixel_l1(a, b) if c.score_map == "pixel" else ssim_map(a, b)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Prediction:
        if self.denoiser is None:
            raise RuntimeError(f"{type(self).__name__}.predict before fit: call fit(train) first.")
        images = images_of(images)
        parts = [self._predict(images[i:i + self.config.predict_batch])
                 for i in range(0, len(images), self.config.predict_batch)]
        extras = {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras}
        return Prediction(torch.cat([p.scores for p in parts]),
                          torch.cat([p.maps for p in parts]), extras)

    def _predict(self, images: Tensor) -> Prediction:
        x, x_rec, extras = self.reconstruction(images)
        scores, maps = self.score(x, x_rec, tuple(images.shape[-2:]), extras.pop("_feats_in", None))
        return Prediction(scores, maps, {k: v.cpu() for k, v in extras.items()})

    @torch.no_grad()
    def reconstruction(self, images: Tensor) -> tuple[Tensor, Tensor, dict]:
        """``(x, x_rec, extras)``: the images at the denoiser's resolution in [-1, 1], their
        reconstructions (decoded in latent mode) and the per-image extras; in chunks of
        ``predict_batch`` images."""
        images = images_of(images)
        n = self.config.predict_batch
        if len(images) > n:
            parts = [self.reconstruction(images[i:i + n]) for i in range(0, len(images), n)]
            extras = {k: torch.cat([p[2][k] for p in parts]) for k in parts[0][2]}
            return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), extras)
        c = self.config
        self.denoiser.eval()
        x = self.resize(images_of(images)).to(self.device) * 2 - 1
        g = torch.Generator(self.device).manual_seed(c.seed)
        z = self.denoiser.encode(x, g)
        z_rec, extras = self.reconstruct(z, self.noise(z.shape))
        x_rec = self.denoiser.decode(z_rec)
        return x, x_rec, extras

    @torch.no_grad()
    def score(self, x: Tensor, x_rec: Tensor, size, feats_in=None) -> tuple[Tensor, Tensor]:
        """Image scores and maps (at ``size``) from images and reconstructions in [-1, 1]: the
        configured map (:meth:`anomaly_maps`), Gaussian blur, mean of the top-K pixels."""
        c = self.config
        smooth = gaussian_blur(self.anomaly_maps(x, x_rec, feats_in), c.sigma)
        scores = topk_mean(smooth, c.top_k)
        maps = F.interpolate(smooth.unsqueeze(1), size=tuple(size), mode="bilinear",
                             align_corners=False)[:, 0]
        return scores, maps
