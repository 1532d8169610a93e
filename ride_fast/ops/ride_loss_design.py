"""Which of the fused RIDE loss's two designs a call runs (kernels/ride_loss.py): the two kernels,
or the forward that writes the gradient itself and a backward that hands it over.

Pure host logic on the call's logits and context; `ride_fast.ops.ride_loss` asks it before the
registered operator runs, and code that scales a loss before its backward says so here
(`scaled_before_backward`). Only speed depends on the answer: both designs give the same loss and
gradient (with DRW weights up to the order in which their sum is taken).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util

import torch
from torch import Tensor

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
try:  # a torch-only module: reading the kernels' rules does not import triton
    from ride_fast_kernels._utils import loss_design
except ImportError:  # the kernels package is not installed: no fused path
    _TRITON_INSTALLED = False


def _eager(t: Tensor) -> bool:
    """A real tensor outside any tracing (dynamo, AOT autograd, make_fx): reading it is allowed."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and get_proxy_mode() is None


_SCALED_BEFORE_BACKWARD = contextvars.ContextVar("ride_fast_scaled_before_backward", default=False)


@contextlib.contextmanager
def scaled_before_backward():
    """Declares that the RIDE losses computed inside are multiplied by a factor other than 1 before
    their backward (a micro-batch's share of its batch, distillation's factor E): there the fused
    loss runs the two kernels, whose backward applies the factor as it writes the gradient, rather
    than write the gradient in its forward for a grad_output of 1 and compute it again. Only the
    speed depends on it. For eager code (under torch.compile the loss runs the two kernels)."""
    token = _SCALED_BEFORE_BACKWARD.set(True)
    try:
        yield
    finally:
        _SCALED_BEFORE_BACKWARD.reset(token)


def fused_loss_design(expert_logits: Tensor) -> str:
    """The design the fused kernels run for these logits when their gradient is wanted
    ("grad_in_forward" or "two_kernel"; `ride_fast_kernels._utils.loss_design`, which
    RIDE_FAST_LOSS_DESIGN can set). The forward writes the gradient only where the backward runs
    eagerly, in a step captured as a CUDA graph too: under torch.compile the autograd formula is
    traced once, and the hand-over of one buffer is an eager decision, so a compiled loss runs
    the two kernels. Nor under float16 autocast: that step's loss goes through GradScaler, whose
    grad_output (the scale) is never 1, even where the cosine heads give float32 logits; nor
    inside `scaled_before_backward`."""
    if not (_TRITON_INSTALLED and _eager(expert_logits)) or _SCALED_BEFORE_BACKWARD.get():
        return "two_kernel"
    device = expert_logits.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return "two_kernel"
    return loss_design(expert_logits.dtype, expert_logits.shape[0])
