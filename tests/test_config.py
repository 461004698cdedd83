import pytest
import torch

from adlab import config


def test_profiles_and_by_profile(monkeypatch):
    monkeypatch.delenv("ADLAB_PROFILE", raising=False)
    assert config.profile().name == "quick" and config.by_profile(1, 2) == 1
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    assert config.profile().pretrained and config.by_profile(1, 2) == 2
    monkeypatch.setenv("ADLAB_PROFILE", "fast")
    with pytest.raises(ValueError, match="quick, paper"):
        config.profile()


def test_seed_everything_is_reproducible():
    config.seed_everything(3)
    a = torch.rand(3)
    g = config.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3)))


def test_data_root_explains_what_to_do(monkeypatch):
    monkeypatch.delenv("ADLAB_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="download.py"):
        config.data_root()


def test_paper_profile_on_cpu_warns(monkeypatch, capsys):
    monkeypatch.setenv("ADLAB_PROFILE", "paper")
    monkeypatch.setenv("ADLAB_DEVICE", "cpu")
    with pytest.warns(UserWarning, match="without a GPU"):
        config.print_setup()
    assert "profile: paper" in capsys.readouterr().out
