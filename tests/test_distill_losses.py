"""EfficientAD hard feature loss: checked against plain MSE and by where the gradient goes."""
import pytest
import torch

from adlab.distill.losses import hard_feature_loss, penalty_loss, student_teacher_loss


def test_p_hard_zero_is_plain_mse():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    assert torch.allclose(hard_feature_loss(t, s, p_hard=0.0), torch.nn.functional.mse_loss(s, t))


def test_gradient_reaches_exactly_the_top_tenth_of_a_percent():
    # 10,000 elements with distinct squared errors 1..10000: the 0.999 quantile keeps the top 10
    # (np.quantile interpolation puts d_hard between 9990 and 9991, so exactly 10 are >= it).
    n = 10_000
    d = torch.randperm(n, generator=torch.Generator().manual_seed(1)).double() + 1.0
    teacher = torch.zeros(1, 1, 100, 100, dtype=torch.float64)
    student = d.sqrt().reshape(1, 1, 100, 100).clone().requires_grad_(True)
    loss = hard_feature_loss(teacher, student, p_hard=0.999)
    loss.backward()
    top = d.reshape(1, 1, 100, 100) > n - 10
    assert int((student.grad != 0).sum()) == 10
    assert bool((student.grad != 0).eq(top).all())
    expected = torch.arange(n - 9, n + 1, dtype=torch.float64).mean()  # mean of 9991..10000
    assert torch.isclose(loss.detach(), expected)


def test_teacher_gets_no_gradient_and_penalty_adds():
    t = torch.randn(1, 4, 3, 3, requires_grad=True)
    s = torch.randn(1, 4, 3, 3, requires_grad=True)
    p = torch.randn(1, 4, 3, 3)
    total = student_teacher_loss(t, s, p, p_hard=0.5)
    total.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert torch.isclose(total, hard_feature_loss(t, s, 0.5) + (p ** 2).mean())
    assert torch.isclose(penalty_loss(p), (p ** 2).mean())


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="same shape"):
        hard_feature_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="p_hard"):
        hard_feature_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), p_hard=1.0)
