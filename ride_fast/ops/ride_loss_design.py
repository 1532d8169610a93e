"""Which of the fused RIDE loss's two designs a call runs (kernels/ride_loss.py): the two kernels,
or the forward that writes the gradient itself and a backward that hands it over.

Pure host logic on the call's logits and context; `ride_fast.ops.ride_loss` asks it before the
registered operator runs, and code that multiplies a loss by a factor before its backward says so
here (`scaled_before_backward`), so that the forward writes the gradient for that factor. Only
speed depends on the answer: both designs give the same loss and gradient (with DRW weights up to
the order in which their sum is taken).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import math
import struct

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


#: The grad_output the RIDE losses computed here will get: 1.0 (taken as they are), the product of
#: the declared factors, or None (a factor not declared: unknown)
_GRAD_SCALE: contextvars.ContextVar[float | None] = contextvars.ContextVar("ride_fast_grad_scale", default=1.0)


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (plain Python: no tensor made inside a captured step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _times(grad: float, factor: float) -> float:
    """grad_output after one more multiplication, as autograd computes it: a float32 gradient times
    a Python number rounded to float32, the product rounded to float32 (exact in double first:
    two 24-bit significands)."""
    return _float32(_float32(grad) * _float32(float(factor)))


@contextlib.contextmanager
def scaled_before_backward(factor: float | None = None):
    """Declares that the RIDE losses computed inside are multiplied by `factor` (a Python number)
    before their backward, as `(loss * factor).backward()` does: a micro-batch's share of its batch,
    distillation's factor E. The fused loss's forward then writes the gradient for that grad_output
    (float32, as autograd forms it; nested declarations multiply, the outer one first), and the
    backward hands it over where grad_output is that number. `factor=None`: a factor not known
    here; the loss then runs the two kernels, whose backward applies whatever grad_output comes.
    Only the speed depends on it: an undeclared or wrong factor costs the gradient's recomputation,
    never its value. For eager code (under torch.compile the loss runs the two kernels)."""
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor)):
        raise ValueError(f"scaled_before_backward: factor must be a finite number or None, got {factor!r}")
    outer = _GRAD_SCALE.get()
    token = _GRAD_SCALE.set(None if factor is None or outer is None else _times(outer, factor))
    try:
        yield
    finally:
        _GRAD_SCALE.reset(token)


def declared_grad_scale() -> float | None:
    """The grad_output declared for the RIDE losses computed here (`scaled_before_backward`):
    1.0 outside any declaration, None where a factor is unknown."""
    return _GRAD_SCALE.get()


def fused_loss_design(expert_logits: Tensor) -> str:
    """The design the fused kernels run for these logits when their gradient is wanted
    ("grad_in_forward" or "two_kernel"; `ride_fast_kernels._utils.loss_design`, which
    RIDE_FAST_LOSS_DESIGN can set). The forward writes the gradient only where the backward runs
    eagerly, in a step captured as a CUDA graph too: under torch.compile the autograd formula is
    traced once, and the hand-over of one buffer is an eager decision, so a compiled loss runs
    the two kernels. Nor under float16 autocast: that step's loss goes through GradScaler, whose
    grad_output (GradScaler's scale, a number on the device) is unknown to the forward, even where
    the cosine heads give float32 logits; nor inside `scaled_before_backward(None)`. Inside
    `scaled_before_backward(factor)` the forward writes it for that factor (`declared_grad_scale`)."""
    if not (_TRITON_INSTALLED and _eager(expert_logits)) or declared_grad_scale() is None:
        return "two_kernel"
    device = expert_logits.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return "two_kernel"
    return loss_design(expert_logits.dtype, expert_logits.shape[0])
