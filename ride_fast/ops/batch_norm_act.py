"""BatchNorm, then an optional residual add, then an optional ReLU: one op for every block of the networks.

Shape legend: B images, C channels, H x W pixels.

    batch_norm_act(bn, x, residual=None, relu=True)      relu(bn(x) + residual)    x, residual [B, C, H, W]

What it computes is always the reference, `F.relu(bn(x) + residual)` with the module's own forward.
On the CPU, in training mode, for float32 or bfloat16 (bf16 autocast) channels-last tensors, it
runs as two C kernels (ride_fast/ops/csrc/batch_norm_act.c): the forward reads x once for the
batch statistics and once more to write the output, and the backward reads its inputs twice.
PyTorch's separate BatchNorm, add and ReLU pass over each activation 13-17 times per training
step, these 8-11: on a CPU that trains in float32, about a tenth of the step
(docs/performance-notes.md, "Fused BatchNorm and ReLU on the CPU"). In bfloat16 the arithmetic is
in float32 and each result is rounded once, where PyTorch rounds BatchNorm's output and then the
sum.

The reference runs instead on CUDA (cuDNN), for float16, in evaluation mode, for NCHW tensors,
inside torch.compile or a trace, for a BatchNorm subclass with its own forward (the distributed
`GlobalBatchNorm2d`, SyncBatchNorm) or with hooks, and wherever the C kernels cannot be built
(`ride_fast.ops.native`). `fused_path_taken(bn, x, residual)` says which one a call takes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ride_fast.ops import native

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # of x, the residual and the output; parameters and statistics are float32


def batch_norm_act_reference(bn: nn.BatchNorm2d, x: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    y = bn(x)
    if residual is not None:
        y = y + residual
    return F.relu(y, inplace=True) if relu else y  # y is a new tensor: BatchNorm's and add's backward do not read it


def channels_last_only(t: Tensor) -> bool:
    """A 4-d tensor laid out channels-last and not also NCHW. A [B, C, 1, 1] tensor is both at once,
    so it takes the reference here: a network in NCHW computes exactly what PyTorch's operators do."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def fused_path_taken(bn: nn.Module, x: Tensor, residual: Tensor | None = None) -> bool:
    """Whether `batch_norm_act(bn, x, residual)` runs the C kernels (else the reference)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or not channels_last_only(x):
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device.type != "cpu"):
        return False
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward or not bn.training:
        return False
    if not bn.affine or bn.weight.dtype != torch.float32 or bn._forward_hooks or bn._forward_pre_hooks:
        return False
    if bn.running_mean is not None and (bn.running_mean.dtype != torch.float32 or bn.running_var.dtype != torch.float32):
        return False
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:  # the reference raises its "more than 1 value per channel" error
        return False
    return native.library() is not None


def batch_norm_act(bn: nn.BatchNorm2d, x: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """relu(bn(x) + residual), `bn` updating its running statistics as its own forward does."""
    if not fused_path_taken(bn, x, residual):
        return batch_norm_act_reference(bn, x, residual, relu)
    factor = 0.0
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    out, save = _batch_norm_act_op(x, bn.weight, bn.bias, residual, bn.eps, relu)
    if bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.running_mean.lerp_(save[0], factor)
            bn.running_var.lerp_(save[4], factor)
    return out


# --------------------------------------------------------------------------- the registered operators
# Two operators (forward, backward), so that dispatch modes, the profiler and the CPU stand-in for
# CUDA graphs see one call each, as they see PyTorch's own BatchNorm.


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, C: int) -> None:
    if status != 0:
        raise MemoryError(f"batch_norm_act: no host memory for the per-thread sums of {C} channels")


@torch.library.custom_op("ride_fast::batch_norm_act", mutates_args=(), device_types="cpu")
def _batch_norm_act_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, eps: float, relu: bool) -> tuple[Tensor, Tensor]:
    """(out [B, C, H, W] channels-last in x's dtype, save [5, C] float32: the batch mean, invstd,
    scale = weight * invstd, shift = bias - mean * scale, and the unbiased variance)."""
    B, C, H, W = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    save = x.new_empty(5, C, dtype=torch.float32)
    _check(native.library().ride_bn_act_forward(
        _ptr(x), _ptr(residual), _ptr(weight), _ptr(bias), float(eps), B * H * W, C, int(relu), int(x.dtype == torch.bfloat16),
        _ptr(out), _ptr(save), torch.get_num_threads()), C)
    return out, save


@_batch_norm_act_op.register_fake
def _(x, weight, bias, residual, eps, relu):
    return torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(5, x.shape[1], dtype=torch.float32)


@torch.library.custom_op("ride_fast::batch_norm_act_backward", mutates_args=(), device_types="cpu")
def _batch_norm_act_backward_op(grad_out: Tensor, x: Tensor, residual: Tensor | None, weight: Tensor, save: Tensor,
                                relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual); grad_residual is empty without a residual.
    grad_x and grad_residual in x's dtype, grad_weight and grad_bias float32."""
    B, C, H, W = x.shape
    g = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    grad_r = torch.empty_like(x, memory_format=torch.channels_last) if residual is not None else x.new_empty(0)
    grad_w, grad_b = x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)
    _check(native.library().ride_bn_act_backward(
        _ptr(g), _ptr(x), _ptr(residual), _ptr(weight), _ptr(save), B * H * W, C, int(relu), int(x.dtype == torch.bfloat16),
        _ptr(grad_x), _ptr(grad_r) if residual is not None else None, _ptr(grad_w), _ptr(grad_b), torch.get_num_threads()), C)
    return grad_x, grad_w, grad_b, grad_r


@_batch_norm_act_backward_op.register_fake
def _(grad_out, x, residual, weight, save, relu):
    C = x.shape[1]
    grad_r = torch.empty_like(x, memory_format=torch.channels_last) if residual is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32), grad_r


def _setup_context(ctx, inputs, output):
    x, weight, _, residual, _, relu = inputs
    ctx.save_for_backward(x, residual, weight, output[1])
    ctx.relu = relu


def _backward(ctx, grad_out, _grad_save):
    x, residual, weight, save = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_r = _batch_norm_act_backward_op(grad_out, x, residual, weight, save, ctx.relu)
    return grad_x, grad_w, grad_b, (grad_r if residual is not None else None), None, None


_batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
