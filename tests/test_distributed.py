"""Data-parallel training on CPU with the gloo backend, launched by torchrun as on a GPU box:
2 processes with batch B per process train exactly as 1 process with batch 2 B, and a real
detector trains end to end through ``torchrun -m adlab train``."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adlab.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# A small model whose loss is a mean over the samples of the batch: the gradient of the mean
# over 2 B samples is the mean of the gradients of the two halves.
WORKER = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from adlab import distributed
    from adlab.train import RandomBatches, train

    torch.manual_seed(0)
    x = torch.randn(48, 3)
    data = torch.cat([x, torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]]))], 1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sizes = []

    def loss_fn(b):
        sizes.append(len(b))
        return nn.functional.mse_loss(model(b[:, :3]), b[:, 3:])

    history = train(loss_fn, RandomBatches(data, 8, seed=0), 6, opt, {"model": model},
                    progress=False, checkpoint=sys.argv[1] + ".ckpt", checkpoint_every=2)
    if distributed.is_main():
        torch.save({"state": model.state_dict(), "history": history,
                    "world": distributed.world_size(),
                    "sizes": sizes}, sys.argv[1])
""")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_of_batch_b_train_as_one_of_batch_2b(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run([sys.executable, str(script), str(tmp_path / "one.pt")], tmp_path)
    _run(TORCHRUN + [str(script), str(tmp_path / "two.pt")], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert (one["sizes"], two["sizes"]) == ([8] * 6, [4] * 6)              # each rank: half
    assert two["history"] == pytest.approx(one["history"], abs=1e-6)   # mean loss over ranks
    assert one["history"][-1] < one["history"][0]                       # it did train
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-6)
    assert torch.load(tmp_path / "two.pt.ckpt")["step"] == 6             # rank 0's checkpoint
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_detector_trains_under_torchrun(tmp_path):
    from adlab.detector import load_detector

    root = tmp_path / "data"
    generate(root, seed=0, size=64, categories=["weave"], n_train=8, n_test_good=2, n_per_defect=1)
    proc = _run(TORCHRUN + ["-m", "adlab", "train", "pyramidflow", "--root", str(root),
                            "--category", "weave", "--out", "pf.pt", "--steps", "3"], tmp_path)
    assert "2 processes" in proc.stderr and proc.stderr.count("saved pf.pt") == 1
    det = load_detector(tmp_path / "pf.pt")
    assert len(det.history) == 3 and all(torch.isfinite(torch.tensor(det.history)))
    assert det.predict(torch.rand(1, 3, 64, 64)).maps.shape == (1, 64, 64)
