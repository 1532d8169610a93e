"""Self-distillation from a trained many-expert teacher (docs/method.md §4).

Shape legend: E student experts, B images, C classes.

    expert_logits   [E, B, C]  the student's s-scaled expert logits
    target          [B]        int64 class indices
    teacher_logits  [B, C]     the teacher's s-scaled mean logits (detached here)

    zbar = mean_k expert_logits[k],  p_t = softmax(teacher / T_d),  p_s = softmax(zbar / T_d)
    loss = F * ( base(expert_logits, target) + T_d^2 * sum_i KL(p_t,i || p_s,i) / B )
    F    = E when scale_by_experts (the original adds the same terms once per expert), else 1

Running the teacher (and the original's teacher-BatchNorm-in-train-mode quirk) is the trainer's job.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ride_fast.losses.classification import ExpertLoss, check_logits_and_target, compute_dtype
from ride_fast.ops.ride_loss_design import scaled_before_backward


def distill_kl(student_mean_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) summed over classes, mean over the batch.

    student [B, C] carries the gradient; teacher [B, C] is detached. Computed in float32 (or float64).
    """
    dtype = torch.promote_types(compute_dtype(student_mean_logits), compute_dtype(teacher_logits))
    s = student_mean_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0]
    return temperature**2 * kl


class RIDEDistillLoss(ExpertLoss):
    """Wraps a stage-1 loss (normally `RIDELoss`) with distillation from a teacher's mean logits.

    forward(expert_logits [E, B, C], target [B], teacher_logits [B, C]) -> scalar; see the module
    docstring. `set_epoch` forwards to the base loss.
    """

    def __init__(self, base: ExpertLoss, temperature: float = 1.5, scale_by_experts: bool = True) -> None:
        super().__init__(None)
        if not isinstance(base, ExpertLoss):
            raise TypeError(f"base must be a ride_fast loss (ExpertLoss), got {type(base).__name__}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.base = base
        self.num_classes = base.num_classes
        self.temperature = float(temperature)
        self.scale_by_experts = bool(scale_by_experts)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.base.set_epoch(epoch)

    def graph_key(self):
        return self.base.graph_key()

    def class_weight_sum(self, target: Tensor) -> Tensor | None:
        return self.base.class_weight_sum(target)

    def path(self, device, dtype=None, num_experts=None, num_classes=None) -> str:
        """The base loss's implementation (`ExpertLoss.path`); the distillation term is plain PyTorch
        on the [B, C] mean logits."""
        return self.base.path(device, dtype if dtype is not None else torch.float32, num_experts, num_classes)

    def forward(self, expert_logits: Tensor, target: Tensor, teacher_logits: Tensor,  # type: ignore[override]
                weight_sum: Tensor | None = None) -> Tensor:
        check_logits_and_target(expert_logits, target, self.num_classes, check_range=False)  # the base loss checks it
        if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
            raise TypeError("teacher_logits must be a floating-point Tensor [B, C] (the teacher's mean logits)")
        E, B, C = expert_logits.shape
        if teacher_logits.shape != (B, C):
            raise ValueError(
                f"teacher_logits must be [B, C] = [{B}, {C}] (the teacher's mean logits), "
                f"got {tuple(teacher_logits.shape)}"
            )
        if teacher_logits.device != expert_logits.device:
            raise ValueError(f"teacher_logits are on {teacher_logits.device} but expert_logits on {expert_logits.device}")
        student_mean = expert_logits.to(compute_dtype(expert_logits)).mean(0)  # [B, C], mean in float32
        scaled = self.scale_by_experts and E != 1 and not torch.compiler.is_compiling()  # the fused loss's gradient is written for E
        with scaled_before_backward(E) if scaled else contextlib.nullcontext():
            base = self.base(expert_logits, target, weight_sum)
        loss = base + distill_kl(student_mean, teacher_logits, self.temperature)
        return loss * E if self.scale_by_experts else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, scale_by_experts={self.scale_by_experts}"


__all__ = ["RIDEDistillLoss", "distill_kl"]
