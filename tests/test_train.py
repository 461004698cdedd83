"""The shared training loop: convergence, exact resume in a fresh process, checkpoints that
do not fit, atomic saves, NaN stop."""
import math
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import adlab.train as T
from adlab.train import (CheckpointMismatchError, NonFiniteLossError, RandomBatches,
                         load_checkpoint, save_checkpoint, train)

REPO = Path(__file__).resolve().parents[1]


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.cat([x, y], 1)
    loss_fn = lambda b: nn.functional.mse_loss(model(b[:, :3]), b[:, 3:])
    return model, opt, data, loss_fn


def test_loss_decreases_to_the_least_squares_solution():
    model, opt, data, loss_fn = _problem()
    hist = train(loss_fn, RandomBatches(data, 16), 300, opt, {"model": model}, progress=False)
    assert hist[-1] < 1e-4 < hist[0]
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=1e-2)


def test_random_batches_cover_each_epoch_once():
    images = torch.arange(10)
    batches = RandomBatches(images, 4, seed=1)
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="empty"):
        RandomBatches(torch.zeros(0, 3), 4)


# ----------------------------------------------------------------------------- exact resume

# A run that touches every random generator a loss may use: dropout (torch), NumPy and
# Python noise, an epoch boundary with a short last batch, Adam and a step scheduler.
JOB = textwrap.dedent('''
    import random, sys
    import numpy as np
    import torch
    from torch import nn
    from adlab.train import RandomBatches, train

    def main(steps, checkpoint, out):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        data = torch.randn(10, 4)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

        def loss_fn(b):
            noise = torch.from_numpy(np.random.normal(size=b[:, :3].shape)).float()
            scale = random.uniform(0.5, 1.5)
            return ((net(b[:, :3] + 0.1 * noise) - b[:, 3:]) ** 2).mean() * scale

        train(loss_fn, RandomBatches(data, 4, seed=5), steps, opt, {"net": net},
              scheduler=sched, seed=1, checkpoint=checkpoint, checkpoint_every=100,
              progress=False)
        if out:
            torch.save(net.state_dict(), out)

    if __name__ == "__main__":
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
''')


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(JOB)
    main = runpy.run_path(str(job))["main"]
    main(12, None, tmp_path / "straight.pt")              # 12 steps in one go
    ckpt = tmp_path / "run.pt"
    main(5, ckpt, None)                                   # 5 steps, saved (mid second epoch)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(job), "12", str(ckpt), str(tmp_path / "resumed.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    straight = torch.load(tmp_path / "straight.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert load_checkpoint(ckpt)["step"] == 12 and len(load_checkpoint(ckpt)["history"]) == 12


def test_a_checkpoint_needs_resumable_batches(tmp_path):
    model, opt, data, loss_fn = _problem()
    with pytest.raises(TypeError, match="RandomBatches"):
        train(loss_fn, iter([data] * 3), 3, opt, {"m": model}, checkpoint=tmp_path / "c.pt",
              progress=False)


# ----------------------------------------------------------------------------- mismatches

def _saved_run(tmp_path):
    """A checkpoint of two modules (a: Linear(3, 2), b: Linear(2, 1)) with Adam and a scheduler."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(2, 1)
    opt = torch.optim.Adam([*a.parameters(), *b.parameters()], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    data = torch.randn(8, 4)
    ckpt = tmp_path / "c.pt"
    train(lambda x: b(a(x[:, :3])).pow(2).mean(), RandomBatches(data, 4), 3, opt,
          {"a": a, "b": b}, scheduler=sched, checkpoint=ckpt, progress=False)
    return ckpt, data


def _fresh(b_out=1, b_in=2):
    torch.manual_seed(1)
    a, b = nn.Linear(3, 2), nn.Linear(b_in, b_out)
    opt = torch.optim.Adam([*a.parameters(), *b.parameters()], lr=0.1)
    return a, b, opt, torch.optim.lr_scheduler.StepLR(opt, 2)


def _unchanged(a, opt, sched, batches, run):
    """Run ``run`` (expected to raise); return True when a, opt, sched and batches kept state."""
    before = ({k: v.clone() for k, v in a.state_dict().items()}, repr(opt.state_dict()),
              sched.state_dict(), batches.position, batches.order.clone())
    with pytest.raises(CheckpointMismatchError) as err:
        run()
    after = ({k: v.clone() for k, v in a.state_dict().items()}, repr(opt.state_dict()),
             sched.state_dict(), batches.position, batches.order.clone())
    same = (all(torch.equal(before[0][k], after[0][k]) for k in before[0])
            and before[1:4] == after[1:4] and torch.equal(before[4], after[4]))
    return same, str(err.value)


def test_a_parameter_of_another_shape_is_named_and_nothing_is_loaded(tmp_path):
    ckpt, data = _saved_run(tmp_path)
    a, b, opt, sched = _fresh(b_out=3)                    # b: Linear(2, 3) instead of (2, 1)
    batches = RandomBatches(data, 4)
    same, message = _unchanged(a, opt, sched, batches, lambda: train(
        lambda x: b(a(x[:, :3])).sum(), batches, 6, opt, {"a": a, "b": b}, scheduler=sched,
        checkpoint=ckpt, progress=False))
    assert same                                           # module a fits, yet was not loaded
    assert "module 'b'" in message and "'weight'" in message
    assert "(1, 2)" in message and "(3, 2)" in message


def test_other_parameter_names_optimiser_scheduler_or_data_are_refused(tmp_path):
    ckpt, data = _saved_run(tmp_path)
    cases = {
        "names": lambda a, b, opt, sched: dict(modules={"a": a, "b": nn.Sequential(b)}),
        "optimiser": lambda a, b, opt, sched: dict(optimizer=torch.optim.Adam(
            [{"params": a.parameters()}, {"params": b.parameters()}])),
        "scheduler": lambda a, b, opt, sched: dict(scheduler=None),
        "data": lambda a, b, opt, sched: dict(batches=RandomBatches(data[:6], 4)),
    }
    expected = {"names": "'0.weight'", "optimiser": "parameter groups of sizes [4]",
                "scheduler": "saved with a learning-rate scheduler",
                "data": "drawn from 8 images"}
    for case, change in cases.items():
        a, b, opt, sched = _fresh()
        batches = RandomBatches(data, 4)
        kwargs = dict(batches=batches, modules={"a": a, "b": b}, optimizer=opt, scheduler=sched)
        kwargs.update(change(a, b, opt, sched))
        same, message = _unchanged(a, opt, sched, batches, lambda: train(
            lambda x: x.sum(), steps=6, checkpoint=ckpt, progress=False, **kwargs))
        assert same and expected[case] in message, (case, message)


# ----------------------------------------------------------------------------- atomic files

def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(2)})
    real_save = torch.save

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"half a checkp")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(2)})
    assert load_checkpoint(path)["step"] == 1 and _temps(tmp_path) == []
    monkeypatch.setattr(torch, "save", real_save)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Delete it"):
        load_checkpoint(path)


KILLED_SAVE = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path
    import torch
    from adlab.train import save_checkpoint

    path = Path(sys.argv[1])
    save_checkpoint(path, {"step": 1})
    def killed_halfway(obj, f):
        Path(f).write_bytes(b"half a checkp")
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = killed_halfway
    save_checkpoint(path, {"step": 2})
''')


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_a_killed_save_leaves_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "c.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env=env,
                         capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1            # the old checkpoint is intact
    assert len(_temps(tmp_path)) == 1                     # the killed writer's temp file
    save_checkpoint(path, {"step": 3})
    assert _temps(tmp_path) == [] and load_checkpoint(path)["step"] == 3


def test_non_finite_loss_stops_with_a_clear_message():
    model, opt, data, _ = _problem()
    loss_fn = lambda b: model(b[:, :3]).sum() * float("nan")
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        train(loss_fn, RandomBatches(data, 8), 5, opt, {"m": model}, progress=False)


def test_the_bar_is_one_text_line_when_outputs_are_recorded(monkeypatch, capsys):
    monkeypatch.setenv("ADLAB_STATIC_OUTPUT", "1")
    model, opt, data, loss_fn = _problem()
    train(loss_fn, RandomBatches(data, 16), 20, opt, {"m": model}, desc="fit")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fit: 100%|") and "20/20" in lines[0]


def test_holdout_is_a_seeded_random_partition_of_the_training_images():
    from adlab.train import holdout

    images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)
    fit, val = holdout(images, 0.1, seed=3)
    assert len(val) == 4 and len(fit) == 36
    ids = sorted(fit.flatten().tolist() + val.flatten().tolist())
    assert ids == list(range(40))                         # a partition, nothing lost
    assert val.flatten().tolist() != [36.0, 37.0, 38.0, 39.0]  # not a sorted cut
    assert torch.equal(holdout(images, 0.1, seed=3)[1], val)  # seeded
    assert not torch.equal(holdout(images, 0.1, seed=4)[1], val)


# ----------------------------------------------------------------------------- precision

def test_bf16_autocast_runs_on_cpu_and_tracks_float32():
    dtypes = {}

    def run(precision):
        model, opt, data, loss_fn = _problem()

        def watched(batch):
            dtypes[precision] = model(batch[:, :3]).dtype
            return loss_fn(batch)
        return train(watched, RandomBatches(data, 16), 30, opt, {"model": model},
                     progress=False, precision=precision)

    full, half = run("32"), run("bf16")
    assert dtypes == {"32": torch.float32, "bf16": torch.bfloat16}   # autocast was on
    assert all(math.isfinite(v) for v in half) and half[-1] < half[0] / 10
    assert half == pytest.approx(full, rel=0.05, abs=1e-3)            # bf16 ~ 3 digits


def test_a_real_detector_trains_in_bf16_through_the_command(tmp_path, capsys):
    from adlab import __main__ as cli
    from adlab.data.synthetic import generate
    from adlab.detector import load_detector

    generate(tmp_path / "data", seed=0, size=64, categories=["weave"], n_train=4,
             n_test_good=1, n_per_defect=1)
    assert cli.main(["train", "cflow", "--root", str(tmp_path / "data"), "--category", "weave",
                     "--out", str(tmp_path / "c.pt"), "--steps", "3", "--precision", "bf16",
                     "--image-size", "64"]) == 0
    assert "precision bf16" in capsys.readouterr().err
    history = load_detector(tmp_path / "c.pt").history
    assert len(history) == 3 and all(math.isfinite(v) for v in history)


def test_float16_needs_cuda_and_unknown_precisions_are_refused():
    model, opt, data, loss_fn = _problem()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            train(loss_fn, RandomBatches(data, 16), 2, opt, {"model": model}, progress=False,
                  precision="16-mixed")
    with pytest.raises(ValueError, match="precision must be one of"):
        train(loss_fn, RandomBatches(data, 16), 2, opt, {"model": model}, progress=False,
              precision="fp8")
    assert model.weight.grad is None                                  # nothing ran
