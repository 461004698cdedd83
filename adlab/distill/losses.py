"""EfficientAD's distillation losses (Batzner et al., WACV 2024, Sec. 3.2 and 3.3).

The student ``S`` learns to predict the teacher ``T`` on normal images. Plain MSE
would spend its effort on pixels it already matches; the *hard feature loss*
back-propagates only the hardest elements: those whose squared difference is at
or above the ``p_hard`` quantile (``p_hard = 0.999`` in the paper, Sec. 3.2).
A penalty keeps the student from imitating the teacher outside the normal
images: ``mean(S(P)^2)`` on ImageNet images ``P`` (Sec. 3.2, L_ST).
"""
from __future__ import annotations

import torch


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor,
                      p_hard: float = 0.999) -> torch.Tensor:
    """Hard feature loss L_hard (EfficientAD Sec. 3.2).

    ``D = (T - S)^2`` elementwise; ``d_hard`` is the ``p_hard`` quantile of D taken **per
    image** (over its ``C x H x W`` elements); the loss is the mean of D over the elements
    with ``D >= d_hard`` of their image, pooled over the batch. The reference code trains
    with batch size 1 (nelson1425/EfficientAD ``efficientad.py:113``) and takes the quantile
    of that one image's distances (``efficientad.py:178-180``); per image keeps that meaning
    for any batch size (a quantile over the batch would keep only the worst image's
    elements). ``p_hard = 0`` keeps every element, so it equals plain MSE. Shapes
    ``[B, C, H, W]`` (student channels already cut to the teacher's).
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} "
                         "outputs must have the same shape (slice the student to the teacher's "
                         "channels first).")
    if not 0.0 <= p_hard < 1.0:
        raise ValueError(f"p_hard must be in [0, 1); got {p_hard} (the paper uses 0.999).")
    distance = (teacher.detach() - student) ** 2
    flat = distance.detach().flatten(1)
    if flat.dtype not in (torch.float32, torch.float64):   # torch.quantile needs one of these
        flat = flat.float()
    d_hard = torch.quantile(flat, p_hard, dim=1)             # [B], one quantile per image
    return distance[distance >= d_hard.to(distance.dtype).view(-1, 1, 1, 1)].mean()


def penalty_loss(student_on_pretraining_images: torch.Tensor) -> torch.Tensor:
    """Penalty term of L_ST: ``mean(S(P)^2)`` on pretraining (ImageNet) images (Sec. 3.2)."""
    return (student_on_pretraining_images ** 2).mean()


def student_teacher_loss(teacher: torch.Tensor, student: torch.Tensor,
                         student_on_pretraining_images: torch.Tensor | None = None,
                         p_hard: float = 0.999) -> torch.Tensor:
    """L_ST = L_hard + penalty (the penalty is skipped when no pretraining images are given)."""
    loss = hard_feature_loss(teacher, student, p_hard)
    if student_on_pretraining_images is not None:
        loss = loss + penalty_loss(student_on_pretraining_images)
    return loss
