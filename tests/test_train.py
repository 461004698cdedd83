"""The shared training loop: convergence, atomic checkpoints, resume, NaN stop."""
import pytest
import torch
from torch import nn

from adlab.train import NonFiniteLossError, load_checkpoint, random_batches, save_checkpoint, train


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
    hist = train(loss_fn, random_batches(data, 16, torch.Generator().manual_seed(0)), 300, opt,
                 {"model": model}, progress=False)
    assert hist[-1] < 1e-4 < hist[0]
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=1e-2)


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    model_a, opt_a, data, loss_a = _problem()
    train(loss_a, random_batches(data, 16, torch.Generator().manual_seed(0)), 40, opt_a,
          {"m": model_a}, progress=False)

    ckpt = tmp_path / "run.pt"
    model_b, opt_b, _, loss_b = _problem()
    gen = torch.Generator().manual_seed(0)
    batches = random_batches(data, 16, gen)
    train(loss_b, batches, 20, opt_b, {"m": model_b}, checkpoint=ckpt, checkpoint_every=20,
          progress=False)
    model_c, opt_c, _, loss_c = _problem(seed=123)  # different init: must be overwritten
    hist = train(loss_c, batches, 40, opt_c, {"m": model_c}, checkpoint=ckpt, progress=False)
    assert len(hist) == 40
    assert torch.allclose(model_c.weight, model_a.weight, atol=1e-6)
    assert load_checkpoint(ckpt)["step"] == 40


def test_non_finite_loss_stops_with_a_clear_message():
    model, opt, data, _ = _problem()
    loss_fn = lambda b: model(b[:, :3]).sum() * float("nan")
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        train(loss_fn, random_batches(data, 8), 5, opt, {"m": model}, progress=False)


def test_checkpoint_is_atomic_and_corrupt_files_are_explained(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(2)})
    assert not (tmp_path / "c.pt.tmp").exists()
    assert load_checkpoint(path)["step"] == 1
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Delete it"):
        load_checkpoint(path)


def test_empty_training_set_is_explained():
    with pytest.raises(ValueError, match="empty"):
        next(random_batches(torch.zeros(0, 3), 4))
