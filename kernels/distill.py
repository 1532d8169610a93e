"""Fused self-distillation (KD) term of RIDE: loss and student gradient in one pass pair.

Shape legend: B images (rows), C classes.

    student_logits  [B, C]  s-scaled mean logits of the student (float32, bfloat16 or float16)
    teacher_logits  [B, C]  s-scaled mean logits of the teacher (any of those dtypes; no gradient)
    grad            [B, C]  d loss / d student_logits, in the student's dtype
    row_loss        [B]     float32 per-image share; loss = row_loss.sum()

With p = softmax(teacher / T) and q = softmax(student / T) (float32 math):

    loss            = T^2 / B * sum_i KL(p_i || q_i) = T^2 / B * sum_i sum_c p_ic (log p_ic - log q_ic)
    d loss / d s_i  = T / B * (q_i - p_i)

One program per row; pass 1 computes the online log-sum-exp of both rows (blocked over C), pass 2
writes the gradient and accumulates the KL. The teacher is a constant (the original computes its
softmax under no_grad). Reads 2*B*C elements and writes B*C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ride_fast_kernels._utils import check_logits, pick_block_c, pick_num_warps
from torch import Tensor

__all__ = ["kd_loss_forward", "kd_loss_fused"]


@triton.jit
def _kd_loss_kernel(
    s_ptr, t_ptr, grad_ptr, row_loss_ptr,
    C, stride_s, stride_t, stride_g,
    inv_temp, loss_scale, grad_scale,  # 1/T, T^2/B, T/B
    COMPUTE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t

    # ---- pass 1: online log-sum-exp of student / T and teacher / T
    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        xs = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        xt = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        ms_new = tl.maximum(m_s, tl.max(xs, axis=0))
        d_s = d_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(xs - ms_new), axis=0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(xt, axis=0))
        d_t = d_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(xt - mt_new), axis=0)
        m_t = mt_new
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    # ---- pass 2: KL(p || q) and the gradient T/B (q - p)
    kl = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        xs = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        xt = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp
        log_q = xs - lse_s
        log_p = xt - lse_t
        p = tl.exp(log_p)
        kl += tl.where(mask, p * (log_p - log_q), 0.0)
        if COMPUTE_GRAD:
            g = grad_scale * (tl.exp(log_q) - p)
            tl.store(grad_ptr + row * stride_g + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_loss_ptr + row, loss_scale * tl.sum(kl, axis=0))


def kd_loss_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    compute_grad: bool = True,
    block_c: int | None = None,
    grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch the KD kernel: returns (loss float32 scalar, grad [B, C] or None)."""
    check_logits("student_logits", student_logits, 2, "[B, C]")
    check_logits("teacher_logits", teacher_logits, 2, "[B, C]")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
            f"{tuple(student_logits.shape)} must have the same [B, C] shape"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device}, student_logits on {student_logits.device}")
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    B, C = student_logits.shape
    s = student_logits.detach()
    t = teacher_logits.detach()
    s = s if s.stride(1) == 1 else s.contiguous()
    t = t if t.stride(1) == 1 else t.contiguous()
    if compute_grad:
        if grad_out is None:
            grad_out = torch.empty((B, C), dtype=s.dtype, device=s.device)
        elif grad_out.shape != (B, C) or grad_out.dtype != s.dtype or grad_out.stride(1) != 1:
            raise ValueError(f"grad_out must be [B, C] = {(B, C)} of {s.dtype} with unit class stride")
    row_loss = torch.empty(B, dtype=torch.float32, device=s.device)
    g = grad_out if compute_grad else s
    bc = pick_block_c(1, C, block_c)
    _kd_loss_kernel[(B,)](
        s, t, g, row_loss,
        C, s.stride(0), t.stride(0), g.stride(0),
        1.0 / temperature, temperature * temperature / B, temperature / B,
        COMPUTE_GRAD=compute_grad, BLOCK_C=bc, num_warps=pick_num_warps(bc),
    )
    return row_loss.sum(), grad_out


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, block_c):
        loss, grad = kd_loss_forward(
            student_logits, teacher_logits, temperature, compute_grad=ctx.needs_input_grad[0], block_c=block_c
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def kd_loss_fused(student_logits: Tensor, teacher_logits: Tensor, temperature: float, block_c: int | None = None) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean, fused.

    Differentiable with respect to `student_logits` only. Equals
    `ride_fast.ops.distill.kd_loss_reference`. Returns a float32 scalar.
    """
    return _KDLossFunction.apply(student_logits, teacher_logits, float(temperature), block_c)
