"""Fixed-step diffusion reconstruction (adlab.diffusion.reconstruct) and the denoisers.

Independent references: diffusers' DDIMScheduler for the sampling steps (its
``num_train_timesteps`` set to T as hyao1/GLAD does), scikit-image's SSIM, hand-made feature
maps for the min-cosine distance, and a point-mass noise predictor whose exact reconstruction
is known in closed form.
"""
import math

import pytest
import torch
from torch.testing import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402

from adlab.diffusion.ddim import GaussianMixtureEps  # noqa: E402
from adlab.diffusion.denoiser import (LatentDenoiser, load_stable_diffusion,  # noqa: E402
                                      tiny_stable_diffusion)
from adlab.diffusion.reconstruct import (DiffusionReconstruction, add_pixel_term,  # noqa: E402
                                         ddim_reconstruct, inference_timesteps, min_cosine_map,
                                         ssim_map)
from adlab.diffusion.schedules import Schedule  # noqa: E402

AB = Schedule.linear().alpha_bar


class ConvEps(torch.nn.Module):
    """A fixed random eps model that depends on x and t (not an optimum of anything)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()

    @torch.no_grad()
    def forward(self, x, t):
        scale = (t.double() / 1000).view(-1, 1, 1, 1)
        return 0.5 * x + scale * torch.tanh(self.conv(x))


def _diffusers_reconstruct(model, z, eps, T, N, offset, set_alpha_to_one):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, steps_offset=offset)
    sched.register_to_config(num_train_timesteps=T)   # what hyao1/GLAD does; alphas stay 1000-step
    sched.alphas_cumprod = AB.clone()
    one = torch.tensor(1.0, dtype=torch.float64)
    sched.final_alpha_cumprod = one if set_alpha_to_one else AB[0]
    sched.set_timesteps(N)
    x = sched.add_noise(z, eps, sched.timesteps[:1])
    for t in sched.timesteps:
        x = sched.step(model(x, t.view(1).expand(len(x))), int(t), x).prev_sample
    return x, sched.timesteps


@pytest.mark.parametrize("T,N,offset,one", [(750, 25, 1, False), (400, 10, 0, True),
                                            (300, 7, 0, True)])
def test_fixed_step_reconstruction_matches_diffusers_ddim(T, N, offset, one):
    torch.manual_seed(0)
    z = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(z)
    model = ConvEps()
    expected, ts_ref = _diffusers_reconstruct(model, z, eps, T, N, offset, one)
    ts = inference_timesteps(T, N, offset)
    assert ts.tolist() == ts_ref.tolist()
    got = ddim_reconstruct(model, z, eps, ts, AB, set_alpha_to_one=one)
    assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_glad_example_timesteps():
    # METHODS.md: T = 750, 25 steps, SD's steps_offset = 1 -> the first UNet call at t = 721.
    ts = inference_timesteps(750, 25, 1)
    assert ts[0] == 721 and ts[-1] == 1 and len(ts) == 25


def test_a_model_of_one_normal_image_repairs_a_defect():
    # The exact eps of data that is a single image mu: from any start the DDIM ODE lands on mu
    # (x0_hat = mu at every step), so a defective input is reconstructed as mu exactly.
    torch.manual_seed(1)
    mu = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1
    model = GaussianMixtureEps(mu, stds=0.0, alpha_bar=AB)
    defect = mu.clone()
    defect[..., 2:5, 2:5] = 1.0
    eps = torch.randn_like(mu)
    rec = ddim_reconstruct(model, defect, eps, inference_timesteps(500, 10), AB)
    assert_close(rec, mu, rtol=1e-6, atol=1e-6)
    assert (rec - defect).abs().amax() > 0.1


def test_min_cosine_map_hand_example():
    # input patches: e0 at (0,0), e1 at (0,1); reconstruction: e1 at (0,0), e0 at (0,1).
    e0, e1, e2 = torch.eye(3)
    f_in = torch.stack([e0, e1], 1).view(1, 3, 1, 2)
    f_rec = torch.stack([e1, e0], 1).view(1, 3, 1, 2)
    assert_close(min_cosine_map(f_in, f_rec, "min"), torch.zeros(1, 1, 2))      # found elsewhere
    assert_close(min_cosine_map(f_in, f_rec, "aligned"), torch.ones(1, 1, 2))  # orthogonal
    f_in2 = torch.stack([e0, e2], 1).view(1, 3, 1, 2)                            # e2 exists nowhere
    assert_close(min_cosine_map(f_in2, f_rec, "min"), torch.tensor([[[0.0, 1.0]]]))
    f_half = torch.stack([e0 + e2, e1], 1).view(1, 3, 1, 2)                      # 45 degrees to e0
    assert_close(min_cosine_map(f_half, f_rec)[0, 0, 0], torch.tensor(1 - 1 / math.sqrt(2)))


def test_ssim_map_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 24, 24, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(1, 3, 24, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    _, full = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0,
                                            gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=1.0, full=True)
    expected = 1 - torch.from_numpy(full).mean(0)
    assert_close(ssim_map(x, y)[0], expected, rtol=1e-6, atol=1e-6)
    assert ssim_map(x, x).abs().max() < 1e-12


def test_pixel_term_scales_l1_to_the_feature_map():
    fmap = torch.tensor([[[0.0, 2.0]]])
    l1 = torch.tensor([[[0.5, 0.25]]])
    # v * max(map) / max(L1) * L1 = 1 * 2 / 0.5 * L1 = [2, 1]
    assert_close(add_pixel_term(fmap, l1, 1.0), torch.tensor([[[2.0, 3.0]]]))
    assert add_pixel_term(fmap, l1, 0.0) is fmap


TINY = dict(image_size=16, unet_channels=(8, 16), train_steps=2, batch_size=2, feature_size=32,
            layers=("layer1", "layer2"), T=200, num_steps=4, top_k=4, sigma=1.0)


def _images(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.mark.parametrize("score_map", ["features", "pixel", "ssim"])
def test_detector_predicts_maps_at_input_size(score_map):
    det = DiffusionReconstruction(**TINY, score_map=score_map).fit(_images(6), progress=False)
    assert len(det.history) == 2 and all(math.isfinite(v) for v in det.history)
    pred = det.predict(_images(3, 1))
    assert pred.maps.shape == (3, 32, 32) and torch.isfinite(pred.scores).all()
    # the fixed eps is shared by every image: a prediction does not depend on its batch
    alone = det.predict(_images(3, 1)[1:2])
    assert_close(alone.scores, pred.scores[1:2], rtol=1e-5, atol=1e-5)


def test_guidance_scale_interpolates_conditional_and_unconditional():
    den = tiny_stable_diffusion(guidance_scale=1.0).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        cond = den(x, t)
        uncond = den.unet(x, t, encoder_hidden_states=den.negative_embeds.expand(2, -1, -1)).sample
        den.guidance_scale = 0.0
        assert_close(den.guided(x, t), uncond, rtol=1e-5, atol=1e-5)   # one batched call
        den.guidance_scale = 1.0
        assert_close(den.guided(x, t), cond)
        den.guidance_scale = 9.0
        assert not torch.allclose(den.guided(x, t), cond)


def test_stable_diffusion_missing_fails_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError, match="Could not load Stable Diffusion.*sd_model="):
        load_stable_diffusion(str(tmp_path / "no-such-folder"))
    assert isinstance(load_stable_diffusion("tiny-random"), LatentDenoiser)
