"""The self-distillation (KD) term of RIDE stage 1 as one differentiable function.

Shape legend: B images, C classes.

    student_logits  [B, C]  s-scaled mean logits of the student experts
    teacher_logits  [B, C]  s-scaled mean logits of the teacher (treated as a constant)

    kd = T^2 * KL(softmax(teacher / T) || softmax(student / T)), KL summed over classes, mean over B

(the official code: F.kl_div(log_softmax(student / T), softmax(teacher / T), "batchmean") * T * T,
teacher softmax under no_grad; T = 1.5 in the RIDE distillation recipes). Math in float32
(float64 for float64 inputs).
Training computes this term in `ride_fast.losses.distill` (on the students' mean logits, [B, C]:
1/E of the RIDE loss's traffic); there is no fused kernel for it.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Impl = Literal["auto", "reference"]


def check_kd_inputs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    """Raise a clear error for inputs a user can get wrong."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} "
            "must have the same [B, C] shape"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    if not float(temperature) > 0.0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")


def kd_loss_reference(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Plain PyTorch KD term (the specification); float32 scalar (float64 for float64 inputs).
    Gradient flows to the student only.

    Memory traffic (elements of [B, C]): two scaled log-softmaxes 2 + 2, exp 2, KL 3; the backward
    about doubles it: 1/E of the RIDE loss's [E, B, C] traffic, so it has no fused kernel.
    """
    check_kd_inputs(student_logits, teacher_logits, temperature)
    T = float(temperature)
    # bf16/fp16 -> float32; float32 and float64 unchanged (as ride_loss_reference)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_q = torch.log_softmax(student_logits.to(dtype) / T, dim=1)
    with torch.no_grad():
        p = torch.softmax(teacher_logits.to(dtype) / T, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * (T * T)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, impl: Impl = "auto") -> Tensor:
    """The KD term; "auto" and "reference" are both the reference (no fused kernel)."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto' or 'reference' (the KD term has no fused kernel), got {impl!r}")
    return kd_loss_reference(student_logits, teacher_logits, temperature)
