"""conv3x3: the C kernel against the module's convolution (float64 truth): output, input and weight
gradients, grouped and not, every width the kernel is built for, tile remainders and image borders;
thread-count independence, the blocks that use it, and every case that must take the module's
forward instead."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from ride_fast.ops import native
from ride_fast.ops.conv3x3 import conv3x3, fast_path_taken, kernel_supports, module_fits

CL = torch.channels_last
WIDTHS = (16, 24, 32, 48)

needs_kernel = pytest.mark.skipif(not kernel_supports(16, 16), reason="the C 3x3 kernel needs AVX-512 and a C compiler")


class Count(torch.utils._python_dispatch.TorchDispatchMode):
    """How many times the kernel's forward, input-gradient and weight-gradient operators ran."""

    def __init__(self):
        super().__init__()
        self.forward = self.input_grad = self.weight_grad = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.forward += func is torch.ops.ride_fast.conv3x3.default
        self.input_grad += func is torch.ops.ride_fast.conv3x3_input_grad.default
        self.weight_grad += func is torch.ops.ride_fast.conv3x3_weight_grad.default
        return func(*args, **(kwargs or {}))


def make_conv(width: int, groups: int = 1, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    args = {"kernel_size": 3, "stride": 1, "padding": 1, "bias": False} | kw
    return nn.Conv2d(groups * width, groups * width, groups=groups, **args).to(memory_format=CL)


def make_input(B, C, H, W, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g).to(dtype).contiguous(memory_format=CL).requires_grad_()


def forward_backward(conv, x, fn):
    out = fn(conv, x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=CL)
    return (out, *torch.autograd.grad(out, [x, conv.weight], grad.to(out.dtype)))


def through_module(conv, x):
    return conv(x)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,G,H,W", [(2, 1, 5, 7), (2, 3, 16, 16), (1, 2, 1, 9), (3, 3, 8, 17), (1, 1, 4, 1)])
@pytest.mark.parametrize("width", WIDTHS)
def test_matches_the_convolution_in_float64(width, B, G, H, W, threads):
    """Output, grad of x and grad of the weight equal the float64 convolution up to float32 sums, at
    widths 16-48, 1-3 groups, rows narrower than a tile, wider than two, and one pixel high or wide
    (all zero padding); the kernel ran forward and backward (the weight gradient: oneDNN's at 16
    channels)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        conv, x = make_conv(width, G), make_input(B, G * width, H, W)
        assert fast_path_taken(conv, x)
        with Count() as count:
            got = forward_backward(conv, x, conv3x3)
        assert (count.forward, count.input_grad, count.weight_grad) == (1, 1, int(width != 16))
        conv64 = copy.deepcopy(conv).double()
        want = forward_backward(conv64, x.detach().double().requires_grad_(), through_module)
        assert got[0].is_contiguous(memory_format=CL) and got[1].is_contiguous(memory_format=CL)
        for a, b, name in zip(got, want, ["output", "grad of x", "grad of the weight"]):
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * (9 * width) ** 0.5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("width", WIDTHS)
def test_as_close_to_float64_as_onednn(width):
    """On a full-size activation the kernel's error against float64 is no larger than oneDNN's: the
    output and the input gradient sum in the same order, the weight gradient in double over its
    blocks of rows."""
    conv, x = make_conv(width, 3), make_input(8, 3 * width, 16, 16)
    got = forward_backward(conv, x, conv3x3)
    onednn = forward_backward(conv, x, through_module)
    want = forward_backward(copy.deepcopy(conv).double(), x.detach().double().requires_grad_(), through_module)
    for a, b, c in zip(got, onednn, want):
        assert (a.double() - c).abs().max() <= 2 * (b.double() - c).abs().max() + 1e-12


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count():
    """The output and the input gradient are the same bits at any thread count; the weight
    gradient (partial sums per thread) the same bits at the same count."""
    conv, x = make_conv(24, 3), make_input(4, 72, 9, 11)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(forward_backward(conv, x, conv3x3))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][:2], other[:2]))
    assert torch.equal(results[0][2], results[2][2])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("needs", ["x", "weight"])
def test_only_the_gradients_asked_for(needs):
    conv, x = make_conv(24), make_input(2, 24, 6, 6)
    x.requires_grad_(needs == "x")
    conv.weight.requires_grad_(needs == "weight")
    with Count() as count:
        out = conv3x3(conv, x)
        (grad,) = torch.autograd.grad(out.square().sum(), [x if needs == "x" else conv.weight])
    assert (count.input_grad, count.weight_grad) == (needs == "x", needs == "weight")
    want = torch.autograd.grad(conv(x).square().sum(), [x if needs == "x" else conv.weight])[0]
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_the_operators_pass_opcheck():
    conv, x = make_conv(24, 2), make_input(2, 48, 5, 6)
    torch.library.opcheck(torch.ops.ride_fast.conv3x3.default, (x, conv.weight, 2))
    grad = torch.randn(2, 48, 5, 6).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.ride_fast.conv3x3_input_grad.default, (grad, conv.weight.detach(), 2))
    torch.library.opcheck(torch.ops.ride_fast.conv3x3_weight_grad.default, (grad, x.detach(), conv.weight.detach(), 2))


@needs_kernel
@pytest.mark.parametrize("G,width", [(1, 16), (3, 24)])
def test_the_flop_counter_counts_what_the_convolution_it_replaces_does(G, width):
    """torch.utils.flop_counter sees the kernel's operators: the forward as many FLOPs as the
    convolution's, each gradient as many again (torch's own formula agrees without groups)."""
    from torch.utils.flop_counter import FlopCounterMode

    conv, x = make_conv(width, G), make_input(2, G * width, 5, 6)
    counts = []
    for fn in (conv3x3, through_module):
        with FlopCounterMode(display=False) as flops:
            fn(conv, x).sum().backward()
        counts.append(flops.get_flop_counts()["Global"])
    forward = counts[1][torch.ops.aten.convolution]
    assert forward == 2 * 9 * width * x.numel()
    assert counts[0][torch.ops.ride_fast.conv3x3] == counts[0][torch.ops.ride_fast.conv3x3_input_grad] == forward
    weight_grad = counts[0].get(torch.ops.ride_fast.conv3x3_weight_grad, 0) + counts[0].get(torch.ops.aten.convolution_backward, 0)
    assert weight_grad == forward
    if G == 1:
        assert counts[1][torch.ops.aten.convolution_backward] == 2 * forward


def test_the_flop_formulas_are_registered_when_the_counter_is_imported_after_ride_fast():
    """Importing ride_fast leaves torch.utils.flop_counter (and triton) unloaded; importing it later
    registers the kernel's operators, so a FlopCounterMode made then counts them."""
    code = (
        "import sys, ride_fast.models, torch;"
        "assert 'torch.utils.flop_counter' not in sys.modules and 'triton' not in sys.modules;"
        "from torch.utils.flop_counter import FlopCounterMode, flop_registry;"
        "assert {torch.ops.ride_fast.conv3x3, torch.ops.ride_fast.conv3x3_input_grad, torch.ops.ride_fast.conv3x3_weight_grad} <= set(flop_registry)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_kernel
def test_a_width_the_kernel_is_not_built_for_is_refused_by_name():
    conv, x = make_conv(20), make_input(1, 20, 4, 4)
    assert not module_fits(conv)
    with pytest.raises(ValueError, match="groups of 20 input and 20 output channels"):
        torch.ops.ride_fast.conv3x3(x, conv.weight, 1)


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _hooked(conv):
    conv.register_forward_hook(lambda m, i, o: o + 1)
    return conv


# name -> (conv, input) that must take the module's forward
FALLBACKS = {
    "stride 2": lambda: (make_conv(16, stride=2), make_input(2, 16, 8, 8)),
    "padding 0": lambda: (make_conv(16, padding=0), make_input(2, 16, 8, 8)),
    "dilation 2": lambda: (make_conv(16, padding=2, dilation=2), make_input(2, 16, 8, 8)),
    "bias": lambda: (make_conv(16, bias=True), make_input(2, 16, 8, 8)),
    "5x5": lambda: (make_conv(16, kernel_size=5, padding=2), make_input(2, 16, 8, 8)),
    "reflect padding": lambda: (make_conv(16, padding_mode="reflect"), make_input(2, 16, 8, 8)),
    "width 20": lambda: (make_conv(20), make_input(2, 20, 8, 8)),
    "16 -> 24": lambda: (nn.Conv2d(16, 24, 3, 1, 1, bias=False).to(memory_format=CL), make_input(2, 16, 8, 8)),
    "NCHW": lambda: (make_conv(16), make_input(2, 16, 8, 8).detach().contiguous().requires_grad_()),
    "float64": lambda: (make_conv(16).double(), make_input(2, 16, 8, 8, dtype=torch.float64)),
    "own forward": lambda: (OwnForward(16, 16, 3, 1, 1, bias=False).to(memory_format=CL), make_input(2, 16, 8, 8)),
    "hooked": lambda: (_hooked(make_conv(16)), make_input(2, 16, 8, 8)),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_takes_the_module_forward_where_the_kernel_does_not_apply(case):
    conv, x = FALLBACKS[case]()
    assert not fast_path_taken(conv, x)
    with Count() as count:
        got = forward_backward(conv, x, conv3x3)
    want = forward_backward(conv, x, through_module)
    assert count.forward == count.input_grad == 0
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.fixture
def bf16_multiplies(monkeypatch):
    """Set whether this CPU counts as multiplying bf16 faster than float32 (AMX, or a fast AVX512-BF16
    dot product), which decides who runs a convolution under bf16 autocast."""
    return lambda faster: monkeypatch.setattr(native, "cpu_multiplies_bf16_faster", lambda: faster)


def test_under_bf16_autocast_on_a_cpu_with_fast_bf16_products_onednn_runs_the_convolution(bf16_multiplies):
    bf16_multiplies(True)
    conv, x = make_conv(24), make_input(2, 24, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), Count() as count:
        assert not fast_path_taken(conv, x)
        out = conv3x3(conv, x)
    assert out.dtype == torch.bfloat16 and count.forward == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16_autocast", "bf16_input_no_autocast"])
def test_other_reduced_precisions_take_the_module(bf16_multiplies, dtype):
    """fp16 autocast, or a bf16 input outside autocast, are not the kernel's: the module decides."""
    bf16_multiplies(False)
    conv, x = make_conv(24), make_input(2, 24, 6, 6)
    if dtype == torch.float16:
        with torch.autocast("cpu", dtype=torch.float16):
            assert not fast_path_taken(conv, x)
    else:
        assert not fast_path_taken(conv, x.detach().to(torch.bfloat16))


def _bf16_truth(conv, x, grad):
    """float64 convolution of the bf16 input with the float32 weight, and its gradients."""
    x64 = x.detach().double().requires_grad_()
    w64 = conv.weight.detach().double().requires_grad_()
    out = torch.nn.functional.conv2d(x64, w64, None, 1, 1, 1, conv.groups)
    return (out, *torch.autograd.grad(out, [x64, w64], grad.double()))


@needs_kernel
@pytest.mark.parametrize("B,G,H,W", [(2, 1, 5, 7), (2, 3, 16, 16), (3, 3, 8, 17), (1, 2, 1, 9)])
@pytest.mark.parametrize("width", WIDTHS)
def test_under_bf16_autocast_on_a_cpu_with_slow_bf16_products_the_kernel_reads_and_writes_bf16(bf16_multiplies, width, B, G, H, W):
    """Where bf16 multiplies no faster than float32, bf16 autocast takes the kernel: bf16 in and out,
    float32 products of the bf16 input and the float32 weight, summed in float32 and rounded once.
    Its output is the float64 result rounded to bf16 (but where a float32 sum rounds to the other
    side, or cancels to near zero); the input gradient is bf16 within bf16 rounding; the weight gradient is
    float32, as close to float64 as the float32 kernel's."""
    bf16_multiplies(False)
    conv = make_conv(width, G)
    x = make_input(B, G * width, H, W, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), Count() as count:
        assert fast_path_taken(conv, x)
        out = conv3x3(conv, x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).contiguous(memory_format=CL)
    with Count() as backward:
        gx, gw = torch.autograd.grad(out, [x, conv.weight], grad)
    assert count.forward == 1 and backward.input_grad == 1 and backward.weight_grad == int(width != 16)
    assert out.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert out.is_contiguous(memory_format=CL) and gx.is_contiguous(memory_format=CL)
    want, want_gx, want_gw = _bf16_truth(conv, x, grad)
    torch.testing.assert_close(out.double(), want, rtol=2 ** -8, atol=1e-5 * want.abs().max().item())
    assert (out == want.to(torch.bfloat16)).float().mean() > 0.99
    torch.testing.assert_close(gx.double(), want_gx, rtol=2 ** -7, atol=2 ** -7 * want_gx.abs().max().item())
    torch.testing.assert_close(gw.double(), want_gw, rtol=1e-5, atol=1e-5 * want_gw.abs().max().item())


@needs_kernel
def test_bf16_rounding_is_pytorchs_nan_and_inf_included(bf16_multiplies):
    """The kernel rounds its float32 sums to bf16 as PyTorch's float -> bfloat16 does: to nearest
    even, past bf16's largest value to inf, NaN as 0x7FC0. The weight is a scaled identity, so each
    sum is one product that bf16 cannot hold (and zeros, but where a NaN neighbour makes them NaN)."""
    bf16_multiplies(False)
    conv, scale = make_conv(16), 1 + 2 ** -9 + 2 ** -12
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = scale * torch.eye(16)
    x = make_input(1, 16, 4, 5).detach().to(torch.bfloat16)
    x[0, 3, 2, 4] = torch.finfo(torch.bfloat16).max  # times scale: past bf16's largest, inf
    x[0, 0, 0, 0] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv3x3(conv, x)
    near_nan = torch.nn.functional.max_pool2d(x.isnan().float().amax(1, keepdim=True), 3, 1, 1).bool().expand_as(x)
    want = (x.float() * scale).to(torch.bfloat16)
    assert torch.equal(out[~near_nan].view(torch.int16), want[~near_nan].view(torch.int16))
    assert (out[near_nan].view(torch.int16) == 0x7FC0).all() and out[0, 3, 2, 4].isinf()
    truncated = ((x.float() * scale).view(torch.int32) >> 16).to(torch.int16)
    assert (want.view(torch.int16) != truncated)[~near_nan].float().mean() > 0.1  # some round up, not down


def test_switched_off_with_the_native_kernels(monkeypatch):
    monkeypatch.setenv("RIDE_FAST_NATIVE", "0")
    native.reset()
    try:
        conv, x = make_conv(16), make_input(2, 16, 8, 8)
        assert not kernel_supports(16, 16) and not fast_path_taken(conv, x)
        assert torch.equal(conv3x3(conv, x), conv(x))
    finally:
        monkeypatch.undo()
        native.reset()


@needs_kernel
@pytest.mark.parametrize("batched", [False, True], ids=["per_expert", "batched"])
def test_a_ride_resnet32_step_runs_every_stride_1_conv_of_its_blocks_through_the_kernel(batched, monkeypatch):
    """RIDE-ResNet-32 E=3, float32 channels-last: every 3x3 stride-1 conv of the blocks runs the
    kernel (layer1 16 channels, the experts' layer2 and layer3 24 and 48), and the loss and every
    gradient equal those of the same network with the module's convolutions."""
    from ride_fast.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=10, num_experts=3, batched=batched).to(memory_format=CL).train()
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    with Count() as count:
        loss = net(x).logits.square().mean()
        loss.backward()
    fits = sum(module_fits(m) for m in net.modules())
    assert fits == 5 * 2 + (1 if batched else 3) * 2 * (5 * 2 - 1)  # layer1; each expert's layer2 and layer3 but their stride-2 convs
    assert count.forward == count.input_grad == fits
    assert count.weight_grad == fits - 5 * 2  # all but layer1's 16-channel convs
    monkeypatch.setattr("ride_fast.ops.conv3x3.fast_path_taken", lambda conv, x: False)
    with Count() as count:
        ref_loss = ref(x).logits.square().mean()
        ref_loss.backward()
    assert count.forward == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@needs_kernel
def test_a_ride_resnet32_step_under_bf16_autocast_runs_the_kernel_where_bf16_products_are_slow(bf16_multiplies, monkeypatch):
    """Batched RIDE-ResNet-32 E=3 under bf16 autocast on a CPU whose bf16 products are no faster than
    float32: every fitting conv runs the kernel in bf16, and the loss and gradients are as close to
    the float32 step's as those of the same step through oneDNN's bf16 convolutions (which also
    round the weights to bf16)."""
    from ride_fast.models import create_model

    bf16_multiplies(False)
    torch.manual_seed(0)
    net = create_model("resnet32", num_classes=10, num_experts=3, batched=True).to(memory_format=CL).train()
    onednn, fp32 = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=CL)

    def step(model, amp=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(x).logits.float().square().mean()
        loss.backward()
        return loss.double()

    with Count() as count:
        loss = step(net)
    fits = sum(module_fits(m) for m in net.modules())
    assert count.forward == count.input_grad == fits and count.weight_grad == fits - 5 * 2
    monkeypatch.setattr("ride_fast.ops.conv3x3.fast_path_taken", lambda conv, x: False)
    with Count() as count:
        loss_onednn, loss_fp32 = step(onednn), step(fp32, amp=False)
    assert count.forward == 0
    assert abs(loss - loss_fp32) <= 2e-3 * abs(loss_fp32) and abs(loss_onednn - loss_fp32) <= 2e-3 * abs(loss_fp32)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.grad.flatten().double(), b.grad.flatten().double(), dim=0).item()  # noqa: E731
    ours, theirs = [], []  # 1 - cosine to the float32 gradient, per parameter
    for a, b, want in zip(net.parameters(), onednn.parameters(), fp32.parameters()):
        assert a.grad.dtype == torch.float32
        ours.append(1 - cos(a, want))
        theirs.append(1 - cos(b, want))
    assert sum(ours) <= 1.25 * sum(theirs) + 0.01, (sum(ours) / len(ours), sum(theirs) / len(theirs))


@pytest.mark.parametrize("amx,avx512_bf16,ratio,faster", [
    (True, True, 0.5, True),  # AMX tiles: oneDNN multiplies bf16 on them, whatever the dot product's rate
    (False, True, 2.0, True),  # a dot product at twice float32's products (AMD's Zen 4)
    (False, True, 1.25, True),
    (False, True, 1.2, False),
    (False, True, 0.5, False),  # half float32's products (an Intel Xeon with AMX off)
    (False, True, None, True),  # not timed (no C library): the instruction set decides
    (False, False, None, False),  # bf16 emulated
])
def test_which_cpus_multiply_bf16_faster(monkeypatch, amx, avx512_bf16, ratio, faster):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(native, "bf16_product_ratio", lambda: ratio)
    assert native.cpu_multiplies_bf16_faster() is (faster and torch.backends.mkldnn.is_available())


def test_the_bf16_product_ratio_is_timed_where_the_build_has_avx512_bf16():
    """ride_bf16_product_ratio: vdpbf16ps against 512-bit FMAs, products a second (2 a lane per
    instruction against 1: about 0.5 to 2 on known cores) where the build has AVX512-BF16, else -1;
    -1 also for an empty timing."""
    lib = native.library()
    if lib is None:
        pytest.skip("no C library here")
    assert lib.ride_bf16_product_ratio(0, 3) == -1.0 and lib.ride_bf16_product_ratio(2000, 0) == -1.0
    ratio = lib.ride_bf16_product_ratio(2000, 3)
    if not torch.cpu._is_avx512_bf16_supported():
        assert ratio == -1.0 and native.bf16_product_ratio.__wrapped__() is None
    else:
        assert 0.05 < ratio < 4.5 and 0.05 < native.bf16_product_ratio.__wrapped__() < 4.5


def test_switched_off_the_products_ratio_is_not_timed_and_the_instruction_set_decides(monkeypatch):
    """With RIDE_FAST_NATIVE=0 there is no library to time with, so a ratio timed before is forgotten
    with the library (`native.reset`) and the ratio is None."""
    native.bf16_product_ratio()  # timed (or None) with the library as it is
    monkeypatch.setenv("RIDE_FAST_NATIVE", "0")
    native.reset()
    try:
        assert native.bf16_product_ratio() is None
    finally:
        monkeypatch.undo()
        native.reset()
