"""Differentiable functions; the one place that picks the reference or the Triton implementation."""
from ride_fast.ops.distill import kd_loss, kd_loss_reference
from ride_fast.ops.ride_loss import (
    call_path,
    ran_ride_loss_op,
    check_ride_loss_inputs,
    ride_diversity_reference,
    ride_loss,
    ride_loss_analytic,
    ride_loss_fused,
    ride_loss_path,
    ride_loss_reference,
)
from ride_fast.ops.ride_loss_design import declared_grad_scale, fused_loss_design, scaled_before_backward

__all__ = [
    "call_path",
    "declared_grad_scale",
    "fused_loss_design",
    "ran_ride_loss_op",
    "check_ride_loss_inputs",
    "kd_loss",
    "kd_loss_reference",
    "ride_diversity_reference",
    "ride_loss",
    "ride_loss_analytic",
    "ride_loss_fused",
    "ride_loss_path",
    "ride_loss_reference",
    "scaled_before_backward",
]
