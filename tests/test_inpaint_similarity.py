"""SSIM against scikit-image, MS-GMS against a direct NumPy / scipy implementation of GMSD Eq. (4)."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import structural_similarity

from adlab.inpaint.similarity import msgms_difference, msgms_loss, ssim, ssim_loss, ssim_map


def _sk_ssim(x, y, data_range=1.0):
    """scikit-image's SSIM with Wang et al.'s Gaussian window (sigma 1.5, population covariance)."""
    return structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=0)


def _pairs():
    rng = np.random.default_rng(0)
    a = rng.random((3, 40, 33))
    yield a, np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)       # random noise
    yield a, rng.random((3, 40, 33))                                     # unrelated images
    astro = skdata.astronaut()[100:196, 150:230].transpose(2, 0, 1) / 255.0
    yield astro, np.clip(astro * 0.8 + 0.1 + 0.05 * rng.standard_normal(astro.shape), 0, 1)
    cam = skdata.camera()[200:264, 200:280][None] / 255.0
    yield cam, ndimage.gaussian_filter(cam, (0, 1.0, 1.0))                 # blurred natural image


@pytest.mark.parametrize("k", range(4))
def test_ssim_matches_skimage(k):
    x, y = list(_pairs())[k]
    ours = ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item()
    assert ours == pytest.approx(_sk_ssim(x, y), abs=1e-4)


def test_ssim_data_range_and_identity():
    x, y = next(_pairs())
    ours = ssim(torch.from_numpy(255 * x)[None], torch.from_numpy(255 * y)[None], data_range=255).item()
    assert ours == pytest.approx(_sk_ssim(255 * x, 255 * y, 255), abs=1e-4)
    t = torch.from_numpy(x)[None]
    assert torch.allclose(ssim_map(t, t), torch.ones_like(t))
    assert ssim_loss(t, t).abs().item() < 1e-12


def test_ssim_shape_error_is_clear():
    with pytest.raises(ValueError, match="same shape|one shape"):
        ssim_map(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ----------------------------------------------------------------------------- GMS

def _np_gms(x, y, c=0.0026):
    """GMSD Eq. (1), (4) on the channel mean, scipy correlate with Prewitt, zero borders."""
    hx = np.array([[1, 0, -1]] * 3) / 3.0
    def mag(img):
        g = img.mean(0)
        return np.hypot(ndimage.correlate(g, hx, mode="constant"), ndimage.correlate(g, hx.T, mode="constant"))
    mx, my = mag(x), mag(y)
    return (2 * mx * my + c) / (mx ** 2 + my ** 2 + c)


def _np_down(img):
    """2 x 2 block mean (drops an odd last row / column, as avg_pool2d)."""
    c, h, w = img.shape
    img = img[:, :h // 2 * 2, :w // 2 * 2]
    return img.reshape(c, h // 2, 2, w // 2, 2).mean((2, 4))


def test_msgms_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.random((3, 64, 48))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    expected, xs, ys = [], x, y
    for s in range(4):
        expected.append(1 - _np_gms(xs, ys))
        xs, ys = _np_down(xs), _np_down(ys)
    loss = msgms_loss(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item()
    assert loss == pytest.approx(np.mean([e.mean() for e in expected]), rel=1e-6)
    # the finest-scale map is the first term of the difference map: check it pixel by pixel
    diff = msgms_difference(torch.from_numpy(x)[None], torch.from_numpy(y)[None], scales=1)[0].numpy()
    np.testing.assert_allclose(diff, expected[0], atol=1e-6)


def test_msgms_is_zero_for_equal_images_and_grows_with_a_defect():
    x = torch.from_numpy(skdata.camera()[100:164, 100:164] / 255.0).expand(1, 3, 64, 64).clone()
    assert msgms_loss(x, x).abs().item() < 1e-6
    y = x.clone()
    y[..., 20:30, 20:30] = 0.0
    d = msgms_difference(x, y)[0]
    assert d[20:30, 20:30].mean() > 5 * d[45:, 45:].mean()


def test_ssim_map_matches_skimage_full_map_borders_included():
    """The whole map, borders too (the loss averages it): scipy's ``reflect`` padding."""
    x, y = list(_pairs())[2]
    _, full = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, channel_axis=0, full=True)
    ours = ssim_map(torch.from_numpy(x)[None], torch.from_numpy(y)[None])[0].numpy()
    np.testing.assert_allclose(ours, full, atol=1e-4)


def test_per_channel_difference_is_the_channel_maximum_of_numpy_maps():
    rng = np.random.default_rng(2)
    x = rng.random((3, 32, 32))
    y = x.copy()
    y[2, 8:16, 8:16] = 1.0                                  # a defect in the blue channel only
    ours = msgms_difference(torch.from_numpy(x)[None], torch.from_numpy(y)[None], scales=1,
                            per_channel=True)[0].numpy()
    expected = np.max([1 - _np_gms(x[c:c + 1], y[c:c + 1]) for c in range(3)], axis=0)
    np.testing.assert_allclose(ours, expected, atol=2e-5)   # sqrt(. + 1e-12) in ours at flat spots
