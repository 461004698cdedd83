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


def test_unwritable_cache_says_which_variable_to_set(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("ADLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(PermissionError, match="Set ADLAB_CACHE to a folder you can write"):
        config.cache_dir()
    monkeypatch.setenv("ADLAB_CACHE", str(tmp_path / "ok"))
    assert config.cache_dir() == tmp_path / "ok" and list((tmp_path / "ok").iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()                                       # its process id is no longer running
    target = tmp_path / "run.pt"
    dead = tmp_path / f".run.pt{config.TEMP_TAG}{finished.pid}-0000"
    dead_dir = tmp_path / f".run.pt{config.TEMP_TAG}{finished.pid}-1111"
    live = config.temp_path(target)                       # this process: still writing
    other = tmp_path / f".other.pt{config.TEMP_TAG}{finished.pid}-2222"  # another file's
    for path in (dead, live, other):
        path.write_text("partial")
    (dead_dir / "sub").mkdir(parents=True)
    config.remove_stale_temps(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    assert live.parent == tmp_path and live.name.startswith(".run.pt.tmp-")
