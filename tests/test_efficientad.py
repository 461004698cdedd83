"""EfficientAD: PDN layouts and receptive field, teacher target, maps, training, paper readiness."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adlab.distill.autoencoder import autoencoder
from adlab.distill.efficientad import (EfficientAD, EfficientADConfig, adjust, map_quantiles,
                                       normalize_map, to_image_size)
from adlab.distill.pdn import RECEPTIVE_FIELD, output_size, pdn
from adlab.distill.teacher import DistillationTarget, channel_stats, pretrain_teacher


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_shapes_at_paper_size(size):
    net = pdn(size, 384)
    with torch.device("meta"):       # shapes only: no weights allocated or computed
        x = torch.empty(1, 3, 256, 256)
        assert pdn(size, 384).to("meta")(x).shape == (1, 384, 56, 56)
        assert pdn(size, 384, padding=True).to("meta")(x).shape == (1, 384, 64, 64)
        assert pdn(size, 768).to("meta")(x).shape == (1, 768, 56, 56)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    expected = ([(3, 128, 4), (128, 256, 4), (256, 256, 3), (256, 384, 4)] if size == "small" else
                [(3, 256, 4), (256, 512, 4), (512, 512, 1), (512, 512, 3), (512, 384, 4),
                 (384, 384, 1)])
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == expected
    assert all(c.padding == (0, 0) for c in convs)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_receptive_field_is_33_pixels(size):
    # Perturb one pixel of a 96 px image; exactly the outputs whose 33 x 33 field
    # [4 i, 4 i + 32] contains it change (tiny width: the layout, not the channels, matters).
    torch.manual_seed(0)
    net = pdn(size, 4, width=4).double()
    x = torch.rand(1, 3, 96, 96, dtype=torch.float64)
    base = net(x)
    assert base.shape[-1] == output_size(96)
    for r, c in [(40, 51), (0, 0), (95, 17)]:
        y = x.clone()
        y[0, 1, r, c] += 1.0
        changed = (net(y) - base).abs().amax(1)[0] > 0
        n = base.shape[-1]
        rows = torch.tensor([4 * i <= r < 4 * i + RECEPTIVE_FIELD for i in range(n)])
        cols = torch.tensor([4 * j <= c < 4 * j + RECEPTIVE_FIELD for j in range(n)])
        assert torch.equal(changed, rows[:, None] & cols[None, :]), (r, c)


def test_output_size_matches_the_network():
    for s in (33, 64, 128, 200, 256):
        with torch.device("meta"):
            assert pdn("small", 8, 4).to("meta")(torch.empty(1, 3, s, s)).shape[-1] == output_size(s)
    with pytest.raises(ValueError, match="at least 33"):
        output_size(20)


def test_autoencoder_shapes_and_bottleneck():
    with torch.device("meta"):
        ae = autoencoder(384).to("meta")
        assert ae(torch.empty(2, 3, 256, 256)).shape == (2, 384, 56, 56)
        code = ae[:11](torch.empty(2, 3, 256, 256))     # 5 stride-2 convs + ReLUs, then Conv k8
    assert code.shape == (2, 64, 1, 1)
    with pytest.raises(ValueError, match="8 \\* 2\\^k"):
        autoencoder(384, image_size=100)


def _official_embed(feats, out_channels, dim):
    """nelson1425/EfficientAD pretraining.py's embed(): patchify (unfold, reshape, permute),
    per-element bilinear resize of layer3 patches, MeanMapper per layer, Aggregator."""
    patched = []
    for f in feats:
        u = F.unfold(f, 3, padding=1).reshape(*f.shape[:2], 3, 3, -1).permute(0, 4, 1, 2, 3)
        patched.append((u, f.shape[-2:]))
    (ref, (h, w)) = patched[0]
    out = [ref.reshape(-1, *ref.shape[-3:])]
    for u, (hh, ww) in patched[1:]:
        u = u.reshape(u.shape[0], hh, ww, *u.shape[2:]).permute(0, 3, 4, 5, 1, 2)
        base = u.shape
        u = F.interpolate(u.reshape(-1, hh, ww)[:, None], size=(h, w), mode="bilinear",
                          align_corners=False)[:, 0].reshape(*base[:-2], h, w)
        u = u.permute(0, 4, 5, 1, 2, 3).reshape(-1, *u.shape[1:4])
        out.append(u)
    pooled = torch.stack([F.adaptive_avg_pool1d(o.reshape(len(o), 1, -1), dim)[:, 0] for o in out], 1)
    agg = F.adaptive_avg_pool1d(pooled.reshape(len(pooled), 1, -1), out_channels)[:, 0]
    return agg.reshape(-1, h, w, out_channels).permute(0, 3, 1, 2)


def test_distillation_target_matches_the_reference_aggregation():
    target = DistillationTarget("resnet18", ("layer2", "layer3"), out_channels=24,
                                feature_dim=100, pretrained=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = target(x)
    ref = _official_embed(target.extractor(x), 24, 100)
    assert ours.shape == (2, 24, 8, 8)
    torch.testing.assert_close(ours, ref)


def test_channel_stats_are_population_mean_and_std():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 5, 4, 4, generator=g) * 3 + 1 for _ in range(4)]   # equal batches
    mean, std = channel_stats(maps)
    flat = torch.cat(maps).transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(mean.flatten(), flat.mean(1))
    torch.testing.assert_close(std.flatten(), flat.std(1, unbiased=False))


@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation"])
def test_colour_jitter_matches_torchvision(kind):
    import torchvision.transforms.functional as TF

    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    for factor in (0.8, 1.13):
        ref = getattr(TF, f"adjust_{kind}")(x, factor)
        torch.testing.assert_close(adjust(x, kind, factor), ref, atol=1e-6, rtol=0)


def test_map_normalisation_sends_the_quantiles_to_0_and_0_1():
    m = torch.rand(4, 10, 10, generator=torch.Generator().manual_seed(0)) ** 3
    q_a, q_b = map_quantiles(m, 0.9, 0.995)
    assert np.isclose(q_a.item(), np.quantile(m.numpy(), 0.9), atol=1e-6)
    assert np.isclose(q_b.item(), np.quantile(m.numpy(), 0.995), atol=1e-6)
    n = normalize_map(m, q_a, q_b)
    assert np.isclose(np.quantile(n.numpy(), 0.9), 0.0, atol=1e-6)
    assert np.isclose(np.quantile(n.numpy(), 0.995), 0.1, atol=1e-6)


def test_map_cell_lands_on_its_receptive_field():
    # One hot cell i of a 24 x 24 map (128 px input): after the 4-cell padding and resize,
    # the peak lies in the cell's receptive field [4 i, 4 i + 32], near its centre 4 i + 16.
    for i in (0, 10, 23):
        m = torch.zeros(1, 24, 24)
        m[0, i, i] = 1.0
        up = to_image_size(m, (128, 128))[0]
        r, c = divmod(int(up.argmax()), 128)
        assert 4 * i <= r <= 4 * i + 32 and abs(r - (4 * i + 16)) <= 2 and r == c


def _tiny(**kw):
    base = dict(image_size=64, width=4, out_channels=8, ae_decoder_sizes=(3, 8), steps=3,
                batch_size=2, teacher_steps=2, teacher_images=8, teacher_image_size=32,
                penalty_images=4, single_thread=True, pretrained=False)
    return EfficientAD(**{**base, **kw})


def test_training_step_gradients_follow_the_paper(monkeypatch, tmp_path):
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    det = _tiny().fit(torch.rand(10, 3, 64, 64), progress=False)
    assert set(det.parts) == {"hard", "penalty", "ae", "stae"}
    assert len(det.history) == 3 and all(math.isfinite(h) for h in det.history)
    images = torch.rand(2, 3, 64, 64)
    # L_STAE alone reaches the autoencoder (A is not detached) and the student's second half
    det.student.zero_grad(); det.autoencoder.zero_grad()
    det.losses(images, None, torch.Generator().manual_seed(0))["stae"].backward()
    assert det.autoencoder[0].weight.grad.abs().sum() > 0
    last = det.student[-1].weight.grad
    assert last[:8].abs().sum() == 0 and last[8:].abs().sum() > 0
    # the hard loss and the penalty reach only the first half; the teacher gets nothing
    det.student.zero_grad()
    parts = det.losses(images, torch.rand(2, 3, 64, 64), None)
    (parts["hard"] + parts["penalty"]).backward()
    last = det.student[-1].weight.grad
    assert last[:8].abs().sum() > 0 and last[8:].abs().sum() == 0
    assert all(p.grad is None for p in det.teacher.parameters())
    # the teacher was distilled once and cached: a second detector loads the same weights
    again = _tiny(seed=1).fit(torch.rand(10, 3, 64, 64), progress=False)
    for a, b in zip(det.teacher.parameters(), again.teacher.parameters()):
        assert torch.equal(a, b)


def test_quantiles_come_from_the_validation_split(monkeypatch, tmp_path):
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    from adlab.train import holdout

    images = torch.rand(20, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    det = _tiny(teacher="random").fit(images, progress=False)
    _, val = holdout(images, 0.1, 0)
    st, ae = det.raw_maps(val)
    torch.testing.assert_close(det.quantiles["st"][0], torch.quantile(st.flatten(), 0.9))
    torch.testing.assert_close(det.quantiles["ae"][1], torch.quantile(ae.flatten(), 0.995))
    pred = det.predict(val)
    assert pred.maps.shape == (2, 64, 64)
    combined = 0.5 * normalize_map(st, *det.quantiles["st"]) + 0.5 * normalize_map(ae, *det.quantiles["ae"])
    torch.testing.assert_close(pred.scores, to_image_size(combined, (64, 64)).flatten(1).amax(1))
    raw = det.predict(val, normalized=False)
    torch.testing.assert_close(raw.scores, to_image_size(0.5 * st + 0.5 * ae, (64, 64)).flatten(1).amax(1))


def test_user_errors_are_clear():
    with pytest.raises(ValueError, match="small.*medium"):
        EfficientAD(model_size="large")
    with pytest.raises(ValueError, match="q_a < q_b"):
        EfficientAD(q_a=0.99, q_b=0.9)
    with pytest.raises(RuntimeError, match="fit"):
        EfficientAD().predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="teacher must be"):
        _tiny(teacher="imagenet").fit(torch.rand(10, 3, 64, 64), progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        _tiny(val_fraction=0.0).fit(torch.rand(10, 3, 64, 64), progress=False)


def test_paper_profile_builds_and_runs(monkeypatch, tmp_path):
    """Paper settings: 256 px, C = 384 (student 768), width 128, the paper autoencoder, Adam
    1e-4 / 1e-5, 70,000 steps with the lr drop at 95 %, a WideResNet-101 layer2+3 target
    (random init here). One teacher-distillation step (S), one training step of S and M and
    one predict each, on CPU with tiny image sets."""
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    c = EfficientADConfig()
    assert (c.image_size, c.width, c.out_channels, c.steps, c.batch_size, c.lr, c.weight_decay,
            c.lr_drop_at, c.p_hard, c.teacher_backbone, c.teacher_steps) == (
        256, 128, 384, 70_000, 1, 1e-4, 1e-5, 0.95, 0.999, "wide_resnet101_2", 60_000)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tiny = dict(steps=1, penalty_images=1, val_fraction=0.5)       # fit on 1 image, validate on 1
    small = EfficientAD(teacher_steps=1, teacher_images=1, pretrained=False, **tiny).fit(
        images, progress=False)
    assert small.student[-1].out_channels == 768 and small.autoencoder[-1].out_channels == 384
    assert len(small.teacher.history) == 1 and math.isfinite(small.teacher.history[0])
    assert math.isfinite(small.history[0]) and set(small.parts) == {"hard", "penalty", "ae", "stae"}
    pred = small.predict(images[:1])
    assert pred.maps.shape == (1, 256, 256) and torch.isfinite(pred.scores).all()
    from adlab.distill.efficientad import EfficientADMedium
    assert EfficientADMedium.Config(steps=1).model_size == "medium"
    medium = EfficientADMedium(EfficientADMedium.Config(teacher="random", **tiny)).fit(
        images, progress=False)
    assert len([m for m in medium.student if isinstance(m, torch.nn.Conv2d)]) == 6
    assert torch.isfinite(medium.predict(images[:1]).scores).all()


def test_flop_count_matches_the_layer_arithmetic():
    # A convolution costs 2 * C_in * k^2 * C_out * H_out * W_out FLOPs (one multiply-add = 2);
    # pooling and ReLU are not counted by torch's counter. PDN-S at 64 px, width 4, C = 8.
    from adlab.distill.latency import count_flops

    net = pdn("small", 8, 4)
    x = torch.rand(1, 3, 64, 64)
    expected, h = 0, 64
    for m in net:
        if isinstance(m, torch.nn.Conv2d):
            h = h - m.kernel_size[0] + 1
            expected += 2 * m.in_channels * m.kernel_size[0] ** 2 * m.out_channels * h * h
        elif isinstance(m, torch.nn.AvgPool2d):
            h //= 2
    assert count_flops(lambda: net(x)) == expected


def test_image_folder_and_teacher_weights_errors(tmp_path):
    from PIL import Image

    from adlab.distill.efficientad import load_folder

    with pytest.raises(FileNotFoundError, match="No images"):
        load_folder(str(tmp_path), 2, 16)
    rgb = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    cropped, whole = load_folder(str(tmp_path), 2, 16), load_folder(str(tmp_path), 1, 16, crop=False)
    assert cropped.shape == (2, 3, 16, 16) and whole.shape == (1, 3, 16, 16)
    torch.testing.assert_close(cropped[0], torch.from_numpy(rgb[8:24, 8:24] / 255.0).permute(2, 0, 1).float())
    weights = pdn("small", 8, 4).state_dict()
    torch.save(weights, tmp_path / "t.pt")
    loaded = _tiny(teacher_weights=str(tmp_path / "t.pt")).fit(torch.rand(10, 3, 64, 64), progress=False)
    assert all(torch.equal(weights[k], v) for k, v in loaded.teacher.state_dict().items())
    with pytest.raises(ValueError, match="teacher weights"):
        _tiny(teacher_weights=str(tmp_path / "t.pt"), out_channels=16).fit(torch.rand(10, 3, 64, 64),
                                                                           progress=False)


def test_saved_detector_predicts_the_same(monkeypatch, tmp_path):
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path))
    from adlab.detector import load_detector, save_detector

    images = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    det = _tiny().fit(images, progress=False)
    save_detector(det, tmp_path / "det.pt", "efficientad_s")
    loaded = load_detector(tmp_path / "det.pt", "efficientad_s")
    torch.testing.assert_close(loaded.predict(images[:3]).maps, det.predict(images[:3]).maps)
