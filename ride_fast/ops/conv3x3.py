"""The 3x3, stride-1 convolutions of the networks' blocks: the module's own forward, or a C kernel on the CPU.

Shape legend: B images, G groups, i / o input / output channels of one group, H x W pixels.

    conv3x3(conv, x)      conv(x)      x [B, G*i, H, W] -> [B, G*o, H, W]

What it computes is always `conv(x)`. On a CPU with AVX-512, for float32 channels-last tensors
outside autocast and with i and o among the kernel's shapes (16, 24, 32 or 48 channels a group:
the widths of the CIFAR networks' stages and of their experts), the forward and the input
gradient run the C kernel of ride_fast/ops/csrc/conv3x3.c, which holds a tile of pixels by all of a
group's output channels in registers; oneDNN pads such narrow groups and runs them at a fraction of
the cores' speed (docs/performance-notes.md, "3x3 convolutions of the narrow expert layers on the
CPU"). The weight gradient runs a third C function too, summed in double (so closer to float64 than
oneDNN's), except at 16 channels, where oneDNN's (`aten.convolution_backward`) is the faster one.

Under bf16 autocast the kernel runs too where this CPU's bf16 products are no faster than float32
(`native.cpu_multiplies_bf16_faster()` is False: no AMX, and an AVX512-BF16 dot product at about
half float32's products, as on an Intel Xeon with AMX switched off): it reads and writes bf16,
multiplies by the float32 weight and sums in float32, where oneDNN's bf16 convolutions there run at
0.6x its float32 ones (docs/performance-notes.md, "bf16 on a CPU whose bf16 products are slow").
Where bf16 multiplies faster (AMX tiles, AMD's Zen 4), oneDNN's bf16 convolutions run.

Everything else takes the module's forward: other strides, paddings, dilations or kernel sizes, a
bias, NCHW, other dtypes, fp16 autocast, CUDA, torch.compile and traces, a Conv2d subclass with its
own forward or with hooks, and builds without the C kernels (`ride_fast.ops.native`).
`fast_path_taken(conv, x)` says which one a call takes. FLOP counters see the same work either way:
`torch.utils.flop_counter` counts the kernel's operators as the convolutions they replace (their
formulas are registered when that module is imported), and fvcore's trace takes the module's path.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys

import torch
import torch.nn as nn
from torch import Tensor

from ride_fast.ops import native
from ride_fast.ops.batch_norm_act import channels_last_only


def kernel_supports(i: int, o: int) -> bool:
    """Whether the C kernel is built, here, for groups of i input and o output channels."""
    lib = native.library()
    return lib is not None and bool(lib.ride_conv3x3_supported(i, o))


def module_fits(conv: nn.Module) -> bool:
    """Whether the C kernel can stand in for `conv`'s forward: a plain float32 CPU Conv2d, 3x3, stride
    1, padding 1, no bias, with groups of a width the kernel is built for here."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        return False
    if conv.padding_mode != "zeros" or conv.bias is not None or conv.weight.dtype != torch.float32 or conv.weight.device.type != "cpu":
        return False
    return kernel_supports(conv.in_channels // conv.groups, conv.out_channels // conv.groups)


def fast_path_taken(conv: nn.Module, x: Tensor) -> bool:
    """Whether `conv3x3(conv, x)` runs the C kernel (else the module's forward)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.device.type != "cpu" or not channels_last_only(x):
        return False
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if native.cpu_multiplies_bf16_faster():  # oneDNN's bf16 convolutions (AMX, or a fast dot product) win there
            return False
    elif x.dtype != torch.float32:
        return False
    return module_fits(conv)


def conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x), through the C kernel where `fast_path_taken`. Under bf16 autocast the kernel reads and
    writes bf16, as the module would, but multiplies by the float32 weight and sums in float32."""
    if not fast_path_taken(conv, x):
        return conv(x)
    if torch.is_autocast_enabled("cpu"):
        x = x.to(torch.bfloat16)  # what autocast hands the module's convolution
    return _conv3x3_op(x, conv.weight, conv.groups)


# --------------------------------------------------------------------------- the registered operators


def pack_weight(weight: Tensor, groups: int, *, transpose: bool = False) -> Tensor:
    """weight [G*o, i, 3, 3] as the kernel reads it: [G, 3, 3, i, o] contiguous. transpose: the
    weight of the input gradient instead, [G, 3, 3, o, i] with both taps flipped."""
    w = weight.detach().view(groups, weight.shape[0] // groups, weight.shape[1], 3, 3)
    if transpose:
        return w.flip(3, 4).permute(0, 3, 4, 1, 2).contiguous()
    return w.permute(0, 3, 4, 2, 1).contiguous()


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # of x, the output and the output gradient; the weight is float32


def _kernel_dtype(t: Tensor) -> Tensor:
    return t if t.dtype in KERNEL_DTYPES else t.to(torch.float32)


def _run(x: Tensor, packed: Tensor, i: int, o: int) -> Tensor:
    """The kernel on x [B, G*i, H, W] channels-last (float32 or bf16) with a packed float32 weight:
    [B, G*o, H, W] channels-last, in x's dtype."""
    B, _, H, W = x.shape
    G = packed.shape[0]
    out = torch.empty(B, G * o, H, W, dtype=x.dtype, memory_format=torch.channels_last)
    status = native.library().ride_conv3x3_forward(x.data_ptr(), packed.data_ptr(), out.data_ptr(), B, H, W, G, i, o,
                                                   int(x.dtype == torch.bfloat16), torch.get_num_threads())
    _check(status, i, o)
    return out


def _check(status: int, i: int, o: int) -> None:
    if status == -1:
        raise MemoryError(f"conv3x3: no host memory for the buffers of {i}-channel groups")
    if status != 0:
        raise ValueError(f"conv3x3: groups of {i} input and {o} output channels are not among the kernel's shapes")


@torch.library.custom_op("ride_fast::conv3x3", mutates_args=(), device_types="cpu")
def _conv3x3_op(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """x [B, G*i, H, W] channels-last, float32 or bf16, weight [G*o, i, 3, 3] float32: [B, G*o, H, W]
    channels-last in x's dtype."""
    x = _kernel_dtype(x).contiguous(memory_format=torch.channels_last)
    return _run(x, pack_weight(weight, groups), weight.shape[1], weight.shape[0] // groups)


@_conv3x3_op.register_fake
def _(x, weight, groups):
    return torch.empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], dtype=_kernel_dtype(x).dtype, device=x.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("ride_fast::conv3x3_input_grad", mutates_args=(), device_types="cpu")
def _conv3x3_input_grad_op(grad_out: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The gradient of x: the convolution of grad_out with the flipped, transposed weight, in
    grad_out's dtype (float32 or bf16)."""
    g = _kernel_dtype(grad_out).contiguous(memory_format=torch.channels_last)
    return _run(g, pack_weight(weight, groups, transpose=True), weight.shape[0] // groups, weight.shape[1])


@_conv3x3_input_grad_op.register_fake
def _(grad_out, weight, groups):
    return torch.empty(grad_out.shape[0], weight.shape[1] * groups, grad_out.shape[2], grad_out.shape[3], dtype=_kernel_dtype(grad_out).dtype,
                       device=grad_out.device, memory_format=torch.channels_last)


@torch.library.custom_op("ride_fast::conv3x3_weight_grad", mutates_args=(), device_types="cpu")
def _conv3x3_weight_grad_op(grad_out: Tensor, x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The gradient of the weight [G*o, i, 3, 3] (float32), laid out as the weight is; x and grad_out
    float32 or bf16 (read in x's dtype)."""
    x = _kernel_dtype(x).contiguous(memory_format=torch.channels_last)
    g = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
    B, _, H, W = x.shape
    o, i = weight.shape[0] // groups, weight.shape[1]
    packed = torch.empty(groups, 3, 3, i, o)
    status = native.library().ride_conv3x3_weight_grad(x.data_ptr(), g.data_ptr(), packed.data_ptr(), B, H, W, groups, i, o,
                                                       int(x.dtype == torch.bfloat16), torch.get_num_threads())
    _check(status, i, o)
    return torch.empty_like(weight).copy_(packed.permute(0, 4, 3, 1, 2).reshape(weight.shape))


@_conv3x3_weight_grad_op.register_fake
def _(grad_out, x, weight, groups):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.groups = groups


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = _conv3x3_input_grad_op(grad_out, weight, ctx.groups) if need_x else None
    grad_w = None
    if need_w and native.library().ride_conv3x3_weight_grad_supported(weight.shape[1], weight.shape[0] // ctx.groups):
        grad_w = _conv3x3_weight_grad_op(grad_out, x, weight, ctx.groups)
    elif need_w:  # oneDNN's, in float32 (on a CPU that takes the kernel in bf16, its bf16 one is the slower)
        g = grad_out.to(weight.dtype).contiguous(memory_format=torch.channels_last)
        grad_w = torch.ops.aten.convolution_backward(g, x.to(weight.dtype), weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                     ctx.groups, [False, True, False])[1]
    return grad_x, grad_w, None


_conv3x3_op.register_autograd(_backward, setup_context=_setup_context)


# FLOPs for torch.utils.flop_counter, as for the convolutions they replace: 2 x 9 x the channels a
# result sums over, per element of the forward's output (input channels of a group), of the input
# gradient (output channels of a group), and of the output gradient for the weight gradient.


def _forward_flops(x_shape, weight_shape, groups, *args, out_shape=None, **kwargs) -> int:
    return 2 * 9 * weight_shape[1] * math.prod(out_shape)


def _input_grad_flops(grad_out_shape, weight_shape, groups, *args, out_shape=None, **kwargs) -> int:
    return 2 * 9 * (weight_shape[0] // groups) * math.prod(out_shape)


def _weight_grad_flops(grad_out_shape, x_shape, weight_shape, groups, *args, out_shape=None, **kwargs) -> int:
    return 2 * 9 * weight_shape[1] * math.prod(grad_out_shape)


def _register_flop_formulas(flop_counter) -> None:
    ops = torch.ops.ride_fast
    for op, formula in ((ops.conv3x3, _forward_flops), (ops.conv3x3_input_grad, _input_grad_flops),
                        (ops.conv3x3_weight_grad, _weight_grad_flops)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


class _RegisterFlopsOnImport(importlib.abc.MetaPathFinder):
    """Registers the formulas as soon as torch.utils.flop_counter is imported. Importing it here
    would load triton, which importing ride_fast must not (tests/test_layout.py); whoever counts
    FLOPs imports it first, and the registry is read when a FlopCounterMode is made."""

    NAME = "torch.utils.flop_counter"

    def find_spec(self, name, path, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _register_flop_formulas(module)

            spec.loader.exec_module = exec_module
        return spec


if _RegisterFlopsOnImport.NAME in sys.modules:
    _register_flop_formulas(sys.modules[_RegisterFlopsOnImport.NAME])
else:
    sys.meta_path.insert(0, _RegisterFlopsOnImport())
