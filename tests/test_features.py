"""Feature extractor (layer mapping, normalisation, determinism, offline rule) and map helpers."""
import warnings

import numpy as np
import pytest
import scipy.ndimage
import timm
import torch

from adlab.features import (FeatureExtractor, PretrainedWeightsWarning, gaussian_blur, images_of,
                            layer_indices, smooth_map, topk_mean)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), pretrained=False, seed=0)


def test_shapes_channels_and_strides(extractor):
    feats = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    assert extractor.channels == [64, 128, 256]
    assert extractor.reductions == [4, 8, 16]


def test_layers_and_normalisation_match_a_hand_run_resnet(extractor):
    # Independent reference: the plain (non-features_only) timm ResNet-18 with the same
    # weights, run stage by stage on an input normalised here by hand.
    ref = timm.create_model("resnet18", pretrained=False)
    missing, _ = ref.load_state_dict(extractor.model.state_dict(), strict=False)
    assert missing and all(k.startswith(("fc.", "layer4.")) for k in missing)  # only unused parts
    ref.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        h = ref.maxpool(ref.act1(ref.bn1(ref.conv1((x - MEAN) / STD))))
        l1 = ref.layer1(h)
        l2 = ref.layer2(l1)
        l3 = ref.layer3(l2)
    for got, want in zip(extractor(x), (l1, l2, l3)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_names_map_to_timm_indices():
    assert layer_indices("resnet18", ("layer2", "layer3")) == (2, 3)
    assert layer_indices("wide_resnet50_2", ("layer1", "layer4")) == (1, 4)
    with pytest.raises(ValueError, match="layer1"):
        layer_indices("resnet18", ("block7",))
    with pytest.raises(ValueError, match="no model"):
        layer_indices("not_a_net", ("layer1",))


def test_random_init_is_deterministic_and_leaves_the_global_rng_alone(extractor):
    state = torch.get_rng_state()
    again = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), pretrained=False, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    other = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), pretrained=False, seed=1)
    x = torch.rand(1, 3, 32, 32)
    for a, b, c in zip(extractor(x), again(x), other(x)):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_frozen_eval_mode_and_no_grad(extractor):
    extractor.train()
    assert not extractor.training and not extractor.model.training
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor(torch.rand(1, 3, 32, 32, requires_grad=True))[0].requires_grad
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        extractor(torch.rand(3, 32, 32))


def _fail_pretrained(monkeypatch):
    real = timm.create_model
    calls = []

    def fake(name, *args, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if pretrained:
            raise OSError("offline: cannot reach the hub (test)")
        return real(name, *args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)
    return calls


def test_offline_pretrained_warns_once_and_falls_back_to_seeded_random_init(monkeypatch, extractor):
    calls = _fail_pretrained(monkeypatch)
    with pytest.warns(PretrainedWeightsWarning) as record:
        fe = FeatureExtractor("resnet18", ("layer1", "layer2", "layer3"), pretrained=True, seed=0)
    assert len(record) == 1
    message = str(record[0].message)
    assert "random" in message.lower() and "cache" in message and "internet" in message
    assert ("resnet18.tv_in1k", True) in calls          # the papers' torchvision weights were asked for
    assert fe.pretrained and not fe.weights_loaded
    x = torch.rand(1, 3, 32, 32)
    for a, b in zip(fe(x), extractor(x)):                 # same as the seeded random init
        assert torch.equal(a, b)


def test_pretrained_none_follows_the_profile(monkeypatch):
    _fail_pretrained(monkeypatch)
    monkeypatch.setenv("ADLAB_PROFILE", "quick")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsWarning)
        assert not FeatureExtractor("resnet18", ("layer1",)).pretrained
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    with pytest.warns(PretrainedWeightsWarning):
        assert FeatureExtractor("resnet18", ("layer1",)).pretrained


@pytest.mark.parametrize("sigma,size", [(4.0, (40, 52)), (1.5, (9, 7)), (4.0, (12, 10))])
def test_gaussian_blur_matches_scipy(sigma, size):
    maps = torch.rand(2, *size, dtype=torch.float64)
    got = gaussian_blur(maps, sigma)
    for m, g in zip(maps.numpy(), got.numpy()):
        np.testing.assert_allclose(g, scipy.ndimage.gaussian_filter(m, sigma), rtol=1e-10, atol=1e-12)


def test_smooth_map_is_bilinear_upsampling_then_scipy_blur():
    # Reference: skimage's bilinear resize (pixel-centre aligned, edges clamped) followed by
    # scipy.ndimage.gaussian_filter(sigma=4), the official PatchCore RescaleSegmentor's steps.
    import skimage.transform

    scores = torch.rand(2, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = smooth_map(scores, (64, 48), sigma=4.0)
    assert out.shape == (2, 64, 48)
    for s, o in zip(scores.numpy(), out.numpy()):
        up = skimage.transform.resize(s, (64, 48), order=1, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(o, scipy.ndimage.gaussian_filter(up, 4.0), rtol=1e-5, atol=1e-6)


def test_topk_mean_matches_a_sort():
    maps = torch.rand(4, 10, 10)
    want = np.sort(maps.reshape(4, -1).numpy(), axis=1)[:, -5:].mean(1)
    np.testing.assert_allclose(topk_mean(maps, 5).numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(topk_mean(maps, 1).numpy(), maps.reshape(4, -1).numpy().max(1))


def test_images_of_rejects_wrong_input():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(images_of(x), x)
    assert torch.equal(images_of(type("Dataset", (), {"images": x})()), x)
    with pytest.raises(ValueError, match="ADDataset"):
        images_of(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        images_of(torch.rand(0, 3, 8, 8))


def _residual_blocks(model):
    return [m for m in model.modules() if hasattr(m, "zero_init_last")]


@pytest.mark.parametrize("backbone", ["resnet18", "wide_resnet50_2"])
def test_random_init_keeps_every_residual_block_active(backbone):
    # timm's default zero_init_last=True zeroes each block's last BN weight, so an untrained
    # block returns its shortcut: layer1 would equal the stem (max-pooled act1) exactly.
    fe = FeatureExtractor(backbone, ("act1", "layer1"), pretrained=False, seed=0)
    blocks = _residual_blocks(fe.model)
    assert len(blocks) >= 2
    for block in blocks:
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        assert torch.all(last_bn.weight != 0)
    stem, layer1 = fe(torch.rand(2, 3, 32, 32))
    stem = torch.nn.functional.max_pool2d(stem, 3, stride=2, padding=1)
    if stem.shape[1] == layer1.shape[1]:                 # resnet18: same width, compare values
        assert (layer1 - stem).abs().mean() > 0.1 * stem.abs().mean()


def test_zero_init_last_degenerates_layer1_to_the_stem():
    # The failure mode the test above guards against, shown on timm's default init.
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(0, 1))
    ref.eval()
    with torch.no_grad():
        stem, layer1 = ref(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(layer1, torch.nn.functional.max_pool2d(stem, 3, stride=2, padding=1))


def test_random_init_of_an_architecture_without_zero_init_last():
    fe = FeatureExtractor("efficientnet_b0", (1, 2), pretrained=False, seed=0)
    assert [f.shape[1] for f in fe(torch.rand(1, 3, 32, 32))] == fe.channels
