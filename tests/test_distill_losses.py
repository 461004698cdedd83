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


def test_student_teacher_loss_by_hand():
    # Squared errors 1, 4, 9, 16 (teacher 0, student 1..4); p_hard = 0.5: the median by linear
    # interpolation is 6.5, so L_hard = mean(9, 16) = 12.5. Penalty on S(P) = 1, -2, 3, -4:
    # mean(1, 4, 9, 16) = 7.5. L_ST = 20. Gradients: dL/dS = 2 S / 2 on the two hard elements
    # (3 and 4), 0 elsewhere; dL/dS(P) = 2 S(P) / 4; the teacher gets none.
    t = torch.zeros(1, 1, 2, 2, requires_grad=True)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).requires_grad_(True)
    p = torch.tensor([1.0, -2.0, 3.0, -4.0]).view(1, 1, 2, 2).requires_grad_(True)
    total = student_teacher_loss(t, s, p, p_hard=0.5)
    assert total.item() == pytest.approx(20.0)
    assert student_teacher_loss(t, s, p_hard=0.5).item() == pytest.approx(12.5)   # no penalty images
    total.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    torch.testing.assert_close(s.grad.flatten(), torch.tensor([0.0, 0.0, 3.0, 4.0]))
    torch.testing.assert_close(p.grad.flatten(), torch.tensor([0.5, -1.0, 1.5, -2.0]))


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="same shape"):
        hard_feature_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="p_hard"):
        hard_feature_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), p_hard=1.0)


def test_quantile_is_taken_per_image():
    # Two images on very different scales: a quantile pooled over the batch would keep only
    # elements of the loud image. Per image (the reference code's batch of 1), each image
    # keeps its own top elements: the batched loss equals the loss over each image's kept
    # elements found with torch.quantile image by image.
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 10, 10, generator=g)
    s[1] *= 100.0
    s.requires_grad_(True)
    t = torch.zeros_like(s)
    loss = hard_feature_loss(t, s, p_hard=0.9)
    loss.backward()
    kept = []
    for b in range(2):
        d = s[b].detach() ** 2
        kept.append(d[d >= torch.quantile(d.flatten(), 0.9)])
    assert torch.isclose(loss.detach(), torch.cat(kept).mean())
    assert int((s.grad[0] != 0).sum()) == len(kept[0]) > 0   # the quiet image gets gradient
    assert int((s.grad[1] != 0).sum()) == len(kept[1])
    # each image alone gives the same kept set as in the batch (batch size does not matter)
    for b in range(2):
        alone = s[b:b + 1].detach().clone().requires_grad_(True)
        hard_feature_loss(t[b:b + 1], alone, p_hard=0.9).backward()
        assert torch.equal(alone.grad != 0, s.grad[b:b + 1] != 0)
