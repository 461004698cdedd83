"""Save / load of every benchmark detector: a loaded detector scores like the one in memory,
and a file of the wrong kind or method is refused with a clear message."""
import pytest
import torch

from adlab.bench import METHODS
from adlab.config import seed_everything
from adlab.detector import DetectorFileError, load_detector, save_detector
from adlab.train import save_checkpoint

# name -> tiny overrides (quick profile; the architecture is the profile's, training is short)
TINY = {
    "naive": {},
    "padim": {},
    "patchcore": {},
    "cflow": {"epochs": 0.1},
    "pyramidflow": {"steps": 3},
    "fastflow": {"epochs": 2, "eval_every": 1},
    "csflow": {"epochs": 1},
    "differnet": {"steps": 3, "train_pool": 2, "n_transforms": 2},
    "intra": {"steps": 3, "image_size": 32},
    "autoencoder": {"steps": 3, "image_size": 32},
    "ddim_recon": {"image_size": 16, "unet_channels": (8, 16), "train_steps": 2, "batch_size": 2,
                   "feature_size": 32, "T": 200, "num_steps": 3},
    "glad": {"image_size": 16, "unet_channels": (8, 16), "train_steps": 2, "batch_size": 2,
             "feature_size": 32, "T": 200, "num_steps": 3, "min_step": 80, "delta": 0.05},
    "tdad": {"image_size": 16, "unet_channels": (8, 16), "stage2_channels": (8, 16),
             "fusion_channels": 4, "seg_channels": (8, 8, 8), "train_steps": 2, "seg_steps": 2,
             "pool_size": 2, "batch_size": 2, "train_crop": 8, "steps1": 2, "steps2": 2,
             "texture_source": "none"},
}


class Train:
    """Training images with a category (PyramidFlow resolves its settings from it)."""
    category = "weave"

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)


def _images(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g)
    return (base + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_every_bench_method_is_covered():
    assert set(METHODS) - {"efficientad_s", "efficientad_m"} == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_loaded_detector_predicts_what_the_saved_one_did(name, tmp_path):
    from adlab.bench import detector_class

    seed_everything(0)
    det = detector_class(name)(**TINY[name]).fit(Train(_images(10, 0)), progress=False)
    test = _images(3, 1)
    expected = det.predict(test)
    save_detector(det, tmp_path / "det.pt", method=name, category="weave")
    loaded = load_detector(tmp_path / "det.pt")
    assert type(loaded) is type(det) and loaded.config == det.config
    assert loaded.info == {"method": name, "category": "weave"}
    got = loaded.predict(test)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.maps, expected.maps, rtol=1e-6, atol=1e-6)


def test_wrong_files_are_refused_with_a_clear_message(tmp_path):
    det = detector_class_fit("naive")
    save_detector(det, tmp_path / "naive.pt", method="naive")
    with pytest.raises(DetectorFileError, match="holds a naive detector, not padim"):
        load_detector(tmp_path / "naive.pt", method="padim")
    save_checkpoint(tmp_path / "loop.pt", {"step": 3, "optimizer": {}})
    with pytest.raises(DetectorFileError, match="training checkpoint"):
        load_detector(tmp_path / "loop.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorFileError, match="not a readable detector file"):
        load_detector(tmp_path / "junk.pt")
    with pytest.raises(DetectorFileError, match="No detector file"):
        load_detector(tmp_path / "missing.pt")


def detector_class_fit(name):
    from adlab.bench import detector_class

    return detector_class(name)().fit(Train(_images(4, 0)), progress=False)
