"""The noise predictors eps_theta(x_t, t) of the diffusion detectors, and their training losses.

Two settings share one interface (``encode`` images -> model space, ``decode`` back,
``forward(x_t, t)`` the training prediction, ``guided(x_t, t)`` the inference prediction):

* :class:`PixelDenoiser` (quick profile): a small diffusers ``UNet2DModel`` on the images
  themselves, mapped to [-1, 1] (DDPM, Ho et al. 2020, Sec. 4: data scaled to [-1, 1]).
* :class:`LatentDenoiser` (paper profile): GLAD's latent setting (Yao et al., "GLAD: Towards
  Better Reconstruction with Global and Local Adaptive Diffusion Models for Unsupervised
  Anomaly Detection", ECCV 2024, Sec. 4.1): Stable Diffusion v1.4's VAE (``AutoencoderKL``,
  latents = posterior *sample* x 0.18215) and its ``UNet2DConditionModel`` conditioned on
  the fixed prompt "a photo of sks", with classifier-free guidance at inference
  (eps = eps_u + s (eps_c - eps_u), s = 9; hyao1/GLAD ``main.py``, ``reconstruction`` and
  ``utilize/utilize.py:75-89``). The prompt is fixed, so its text embedding is a constant
  computed once when the model is loaded (no text encoder is kept).

Losses:

* :func:`denoising_loss`: DDPM's simplified objective, Ho et al. 2020 Eq. (14):
  ``|| eps - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t) ||^2``, t ~ U{0..T-1}.
* :func:`atp_target` / :func:`atp_loss`: GLAD's Anomaly-oriented Training Paradigm (Sec. 3.3,
  Eq. 9-10; hyao1/GLAD ``main.py``, ``predict_eps`` and ``train_one_epoch``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.diffusion.ddim import _alpha_bar_at, q_sample

__all__ = ["PixelDenoiser", "LatentDenoiser", "pixel_unet", "tiny_stable_diffusion",
           "load_stable_diffusion", "denoising_loss", "atp_mix", "atp_target", "atp_loss",
           "SD_MODEL"]

#: The model GLAD fine-tunes (hyao1/GLAD ``train.sh``: ``--pretrained_model_name_or_path``).
SD_MODEL = "CompVis/stable-diffusion-v1-4"


# --------------------------------------------------------------------------- pixel space

def pixel_unet(image_size: int, channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
               attention: bool = False, seed: int = 0, in_channels: int = 3) -> nn.Module:
    """A small diffusers ``UNet2DModel`` (``in_channels`` -> 3 channels), seeded random init.

    ``in_channels`` > 3: the extra channels carry a condition concatenated to x_t (TDAD's
    second stage).

    Without ``attention`` every block is a plain ResNet block (``DownBlock2D``/``UpBlock2D``),
    the cheapest layout on a CPU; with it the deepest level gets self-attention as in DDPM.
    """
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(8, min(channels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=3,
                           block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                           down_block_types=tuple(down), up_block_types=tuple(up),
                           norm_num_groups=groups)


class PixelDenoiser(nn.Module):
    """eps_theta on images in [-1, 1] (the quick profile's setting); encode / decode are
    identities."""

    latent = False

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def trainable(self) -> nn.Module:
        return self.unet

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t).sample

    def guided(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The inference prediction (no guidance in pixel space)."""
        return self(x_t, t)

    def describe(self) -> dict:
        return {"kind": "pixel", "unet": dict(self.unet.config)}


# --------------------------------------------------------------------------- latent space

class LatentDenoiser(nn.Module):
    """Stable Diffusion's VAE + conditional UNet with a fixed prompt (GLAD's paper setting).

    ``prompt_embeds`` / ``negative_embeds``: the text-encoder outputs of the prompt and of
    "" ([1, L, D]), stored as buffers. ``guidance_scale`` s: ``guided`` returns
    eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, classifier-free guidance; GLAD uses s = 9);
    ``forward`` (training) is the conditional prediction only: GLAD trains with the fixed
    prompt and no unconditional dropout (``main.py``, ``train_one_epoch``).
    """

    latent = True

    def __init__(self, vae: nn.Module, unet: nn.Module, prompt_embeds: Tensor,
                 negative_embeds: Tensor, guidance_scale: float = 9.0):
        super().__init__()
        self.vae, self.unet = vae, unet
        self.vae.requires_grad_(False)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone())
        self.register_buffer("negative_embeds", negative_embeds.detach().clone())
        self.guidance_scale = float(guidance_scale)
        self.scaling_factor = float(vae.config.scaling_factor)

    @property
    def trainable(self) -> nn.Module:
        return self.unet

    def train(self, mode: bool = True) -> "LatentDenoiser":
        super().train(mode)
        self.vae.eval()       # frozen: GLAD fine-tunes the UNet only
        return self

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = VAE posterior *sample* x scaling factor (hyao1/GLAD ``main.py``, ``train_one_epoch``;
        ``utilize/utilize.py:75-89`` at inference)."""
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z / self.scaling_factor).sample

    def _unet(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        return self.unet(x_t, t, encoder_hidden_states=embeds.expand(len(x_t), -1, -1)).sample

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self._unet(x_t, t, self.prompt_embeds)

    def guided(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Classifier-free guidance: eps_u + s (eps_c - eps_u), one UNet call on the doubled
        batch."""
        s = self.guidance_scale
        if s == 1.0:
            return self(x_t, t)
        embeds = torch.cat([self.negative_embeds.expand(len(x_t), -1, -1),
                            self.prompt_embeds.expand(len(x_t), -1, -1)])
        eps_u, eps_c = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 encoder_hidden_states=embeds).sample.chunk(2)
        return eps_u + s * (eps_c - eps_u)

    def describe(self) -> dict:
        return {"kind": "latent", "vae": dict(self.vae.config), "unet": dict(self.unet.config),
                "embeds": list(self.prompt_embeds.shape), "guidance_scale": self.guidance_scale}


def _plain(config: dict) -> dict:
    """A diffusers config as constructor arguments (private ``_`` keys dropped, lists as tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
            if not k.startswith("_")}


def denoiser_from_description(info: dict) -> nn.Module:
    """Rebuild (random init) the denoiser that :meth:`describe` described; load weights after."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    if info["kind"] == "pixel":
        return PixelDenoiser(UNet2DModel(**_plain(info["unet"])))
    embeds = torch.zeros(info["embeds"])
    return LatentDenoiser(AutoencoderKL(**_plain(info["vae"])),
                          UNet2DConditionModel(**_plain(info["unet"])), embeds, embeds.clone(),
                          info["guidance_scale"])


def tiny_stable_diffusion(guidance_scale: float = 9.0, seed: int = 0) -> LatentDenoiser:
    """A randomly initialised stand-in with Stable Diffusion's *shape*: the same diffusers classes
    (``AutoencoderKL`` with 4 latent channels and a /8 downsampling, ``UNet2DConditionModel``
    with cross-attention down/up blocks), tiny widths, random 16-token prompt embeddings.
    For offline tests and the dry run: the latent GLAD code path runs without the 4 GB model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                            block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        cond, uncond = torch.randn(1, 16, 16), torch.randn(1, 16, 16)
    return LatentDenoiser(vae, unet, cond, uncond, guidance_scale)


def _offline_sd_message(source: str, exc: Exception) -> str:
    return (f"Could not load Stable Diffusion from {source!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). GLAD's paper setting "
            "fine-tunes Stable Diffusion v1.4 (vae/, unet/, tokenizer/, text_encoder/ folders). "
            "Download it once with internet access (`huggingface-cli download "
            f"{SD_MODEL}`, it is then found in the Hugging Face cache) or copy it to a folder "
            "and pass GLADConfig(sd_model='/path/to/stable-diffusion-v1-4'). Without it, use the "
            "quick profile (ADLAB_PROFILE=quick: a small pixel-space UNet trained from scratch).")


def load_stable_diffusion(source: str = SD_MODEL, prompt: str = "a photo of sks",
                          guidance_scale: float = 9.0) -> LatentDenoiser:
    """Stable Diffusion v1.4 from a local folder or the hub, as a :class:`LatentDenoiser`.

    ``source="tiny-random"`` gives :func:`tiny_stable_diffusion` (offline stand-in). Otherwise
    the VAE and UNet load through diffusers and the prompt's embedding through transformers'
    CLIP text encoder (needed once, then dropped). Offline or missing: a ``RuntimeError``
    that says how to get the weights."""
    if source == "tiny-random":
        return tiny_stable_diffusion(guidance_scale)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    except Exception as exc:  # offline, no such folder, no such repo
        raise RuntimeError(_offline_sd_message(source, exc)) from None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise RuntimeError("Encoding GLAD's prompt needs the CLIP text encoder of the transformers "
                           "package: `pip install 'transformers>=4.40,<5'`.") from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    except Exception as exc:
        raise RuntimeError(_offline_sd_message(source, exc)) from None

    @torch.no_grad()
    def embed(text: str) -> Tensor:
        ids = tokenizer(text, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    return LatentDenoiser(vae, unet, embed(prompt), embed(""), guidance_scale)


# --------------------------------------------------------------------------- losses

def denoising_loss(model, x0: Tensor, alpha_bar: Tensor, t: Tensor | None = None,
                   eps: Tensor | None = None) -> Tensor:
    """DDPM's simplified loss, Ho et al. 2020 Eq. (14): MSE(eps_theta(x_t, t), eps),
    x_t = q_sample(x0, t, eps), t ~ U{0..T-1}, eps ~ N(0, I) (global RNG unless given)."""
    if t is None:
        t = torch.randint(0, alpha_bar.numel(), (len(x0),), device=x0.device)
    if eps is None:
        eps = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(x0, t, eps, alpha_bar), t), eps)


def atp_mix(x_anom: Tensor, x_norm: Tensor, t: Tensor, num_train_steps: int = 1000) -> Tensor:
    """GLAD Sec. 3.3 (ATP): the training sample blends the synthetic anomaly into the normal
    image by the noise level, x_syn = a x_anom + (1 - a) x_norm with a = t / T (hyao1/GLAD
    ``main.py``, ``train_one_epoch``: ``alpha = timesteps / num_train_timesteps``): at small t
    the sample is nearly normal, at large t nearly the anomaly."""
    a = (t.to(x_anom.dtype) / num_train_steps).view(-1, *([1] * (x_anom.ndim - 1)))
    return a * x_anom + (1 - a) * x_norm


def atp_target(x_syn: Tensor, x_norm: Tensor, eps: Tensor, t: Tensor, alpha_bar: Tensor) -> Tensor:
    """GLAD's ATP target noise (Sec. 3.3; hyao1/GLAD ``main.py``, ``predict_eps``):

        eps* = (sqrt(ab_t) x_syn + sqrt(1 - ab_t) eps - sqrt(ab_t) x_norm) / sqrt(1 - ab_t)
             = (x_t - sqrt(ab_t) x_norm) / sqrt(1 - ab_t),   x_t = q_sample(x_syn, t, eps),

    the noise whose x0 prediction (DDIM Eq. 9) from the *anomalous* x_t is the *normal* image:
    predict_x0(x_t, t, eps*) = x_norm. Computed in float64 as the official code does (at
    t = 0, 1 - ab_t = 1e-4 and the subtraction loses digits in float32). For a normal sample
    (x_syn = x_norm) it is eps itself.

    Note: ``METHODS.md`` of this project wrote the numerator with x_norm and x_syn swapped;
    the official ``predict_eps(alphas, x_0_anomaly=x_syn, x_0_normal=x_norm, ...)`` is as above.
    """
    ab = _alpha_bar_at(alpha_bar, t, x_syn.double())
    x_t = ab.sqrt() * x_syn.double() + (1 - ab).sqrt() * eps.double()
    return ((x_t - ab.sqrt() * x_norm.double()) / (1 - ab).sqrt()).to(x_syn.dtype)


def atp_loss(model, x_norm: Tensor, x_anom: Tensor, alpha_bar: Tensor, t: Tensor | None = None,
             eps: Tensor | None = None) -> Tensor:
    """ATP's loss (GLAD Sec. 3.3, Eq. 10): MSE(eps_theta(q_sample(x_syn, t, eps), t), eps*)
    with x_syn = :func:`atp_mix` and eps* = :func:`atp_target`. Samples that were left normal
    (x_anom = x_norm) reduce to :func:`denoising_loss`."""
    T = alpha_bar.numel()
    if t is None:
        t = torch.randint(0, T, (len(x_norm),), device=x_norm.device)
    if eps is None:
        eps = torch.randn_like(x_norm)
    x_syn = atp_mix(x_anom, x_norm, t, T)
    target = atp_target(x_syn, x_norm, eps, t, alpha_bar)
    return F.mse_loss(model(q_sample(x_syn, t, eps, alpha_bar), t), target)
