"""Fused Triton RIDE loss against the PyTorch reference.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (see conftest.py): small
shapes only. Shape legend: E experts, B images, C classes. Every call writes into output buffers
poisoned with NaN, so an element the kernel forgets to write fails the comparison.
The `gpu` tests at the bottom repeat the comparison at full size in every dtype.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from _loss_parts import loss_and_grad_in_parts
from ride_fast_kernels import _utils
from ride_fast.ops import ride_loss_fused
from ride_fast_kernels.ride_loss import ride_loss_backward, ride_loss_forward

from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops.ride_loss import ride_loss, ride_loss_reference
from ride_fast.ops.ride_loss_design import fused_loss_design, scaled_before_backward

# the interpreter converts 1-element arrays to ints (range over a runtime C); harmless
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _utils.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/kernels/conftest.py sets it)", allow_module_level=True)
LAMBDA, TM = -0.45, 0.83  # diversity factor (CIFAR) and a temperature mean != 1


def make_inputs(E, B, C, *, phase2=True, dtype=torch.float32, seed=0, device=DEVICE):
    """s-scaled logits like a cosine head's (every other row confident in its target) and the
    three per-class vectors of RIDE after the DRW switch (phase2) or margins only before it."""
    inp = ride_loss_inputs(E, B, C, phase=int(phase2), dtype=dtype, device=device, seed=seed)
    return inp.logits, inp.target, *inp.vectors


def reference(z, y, m, w, t, diversity, lam=LAMBDA, tm=TM):
    """(loss, grad) of ride_loss_reference by autograd, float32 math on the given values."""
    z = z.detach().float().requires_grad_()
    loss = ride_loss_reference(z, y, m, w, t, lam, tm, diversity)
    loss.backward()
    return loss.detach(), z.grad


def fused(z, y, m, w, t, diversity, lam=LAMBDA, tm=TM, block_c=None, grad_output=1.0, written=False):
    """(loss, grad) of the forward and backward launchers, every output buffer poisoned with NaN;
    `written`: the forward writes the gradient and the backward keeps it (the other design)."""
    E, B, C = z.shape
    stats = torch.full((B, 3, E), float("nan"), device=z.device)
    part = torch.full((B, 3), float("nan"), device=z.device)
    grad_out = torch.full((E, B, C), float("nan"), dtype=z.dtype, device=z.device)
    loss, stats2, aux = ride_loss_forward(z, y, m, w, t, lam, tm, diversity, block_c=block_c, stats_out=stats, part_out=part,
                                          grad_out=grad_out if written else None)
    assert stats2 is stats
    assert torch.isfinite(part).all(), "a row's partial sums were not written"
    assert torch.isfinite(stats).all(), "a row's statistics were not written"
    go = torch.tensor(grad_output, dtype=torch.float32, device=z.device)
    grad = ride_loss_backward(go, z, y, m, w, t, stats, aux, lam, tm, diversity, block_c=block_c, grad_out=grad_out,
                              grad_written=written)
    assert grad is grad_out
    assert not torch.isnan(grad).any(), "a gradient element was not written"
    return loss, grad


def half_factor(dtype):
    """How far (x the rounding error of the cast, `rounding_error`) a half-precision gradient
    may be: 2, the flash-attention rule."""
    return 2


def rounding_error(ref_grad, dtype):
    """PyTorch's own error in `dtype` (max over elements). Under the interpreter the bfloat16 cast
    truncates, so the error it is held to is that of truncation (the same rule, 2x, in the
    cast the interpreter performs; `half_factor` then stays 2 for it)."""
    if dtype == torch.bfloat16 and _utils.interpreting():
        truncated = (ref_grad.float().contiguous().view(torch.int32) & -65536).view(torch.float32)
        return (truncated - ref_grad).abs().max().item()
    return (ref_grad.to(dtype).float() - ref_grad).abs().max().item()


def assert_grad_close(grad, ref_grad, rtol=1e-4):
    """Elementwise rtol, plus an atol relative to the largest entry (cancellation near zero)."""
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=rtol, atol=rtol * 0.1 * scale + 1e-8)


def assert_matches(loss, grad, ref_loss, ref_grad, rtol=1e-5, grad_rtol=1e-4):
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=rtol * 10)
    assert_grad_close(grad, ref_grad, grad_rtol)


# --------------------------------------------------------------------------- RIDE loss, float32


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("phase2", [False, True], ids=["before_drw", "after_drw"])
@pytest.mark.parametrize(
    "E,B,C",
    [(1, 4, 7), (2, 1, 7), (3, 5, 100), (4, 3, 2), (5, 2, 33), (6, 2, 100), (7, 2, 300), (8, 1, 600), (3, 2, 1000),
     (4, 1, 1000)],
)
def test_matches_reference(E, B, C, diversity, phase2):
    z, y, m, w, t = make_inputs(E, B, C, phase2=phase2, seed=E * 1000 + B * 10 + C)
    assert_matches(*fused(z, y, m, w, t, diversity), *reference(z, y, m, w, t, diversity))


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("E,B,C,block_c", [(3, 3, 100, 32), (4, 2, 100, 16), (2, 2, 1000, 128), (5, 1, 37, 16), (8, 1, 70, 16)])
def test_blocked_online_softmax(E, B, C, block_c, diversity):
    """Rows longer than one block: the online max / sum-exp across class blocks (last one partial)."""
    z, y, m, w, t = make_inputs(E, B, C, seed=C + block_c)
    ref = reference(z, y, m, w, t, diversity)
    assert_matches(*fused(z, y, m, w, t, diversity, block_c=block_c), *ref)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("which", ["margins", "class_weights", "temperature"])
def test_each_vector_optional(which, diversity):
    """None margins = plain CE; None weights = plain mean; None temperature = all ones."""
    z, y, m, w, t = make_inputs(3, 4, 50, seed=7)
    vecs = {"margins": m, "class_weights": w, "temperature": t}
    vecs[which] = None
    args = (vecs["margins"], vecs["class_weights"], vecs["temperature"], diversity)
    assert_matches(*fused(z, y, *args), *reference(z, y, *args))


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_no_diversity_term(diversity):
    z, y, m, w, t = make_inputs(4, 3, 60, seed=3)
    assert_matches(*fused(z, y, m, w, t, diversity, lam=0.0), *reference(z, y, m, w, t, diversity, lam=0.0))


def test_non_contiguous_logits():
    """[B, E, C] permuted to [E, B, C], a batch slice, and a class-strided view."""
    E, B, C = 3, 4, 40
    z, y, m, w, t = make_inputs(E, B, C, seed=11)
    permuted = z.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not permuted.is_contiguous()
    assert_matches(*fused(permuted, y, m, w, t, "mean"), *reference(z, y, m, w, t, "mean"))

    big, y2, m2, w2, t2 = make_inputs(E, 2 * B, 2 * C, seed=12)
    for view, yv, mv, wv, tv in ((big[:, ::2, :C], y2[::2] % C, m2[:C], w2[:C], t2[:C]), (big[:, :B, ::2], y2[:B] % C, m2[::2], w2[::2], t2[::2])):
        assert not view.is_contiguous()
        assert_matches(*fused(view, yv, mv, wv, tv, "pairwise"), *reference(view, yv, mv, wv, tv, "pairwise"))


FAR_EXPERTS = """
import sys, torch
from ride_fast_kernels.ride_loss import ride_loss_backward, ride_loss_forward
from ride_fast.ops.ride_loss import ride_loss_reference
device, diversity = sys.argv[1], sys.argv[2]
E, B, C, stride_e = 3, 2, 64, 1 << 30  # the last expert starts 2^31 elements in

def far_apart():  # only the pages the rows touch are ever written
    return torch.empty(stride_e * (E - 1) + B * C, dtype=torch.float16, device=device).as_strided((E, B, C), (stride_e, C, 1))

small = (torch.randn(E, B, C, generator=torch.Generator().manual_seed(0)) * 3).half()
z, grad = far_apart(), far_apart()
z.copy_(small)
grad.fill_(float("nan"))
y = torch.tensor([5, 60], device=device)
loss, stats, aux = ride_loss_forward(z, y, None, None, None, -0.45, 1.0, diversity)
ride_loss_backward(torch.ones((), device=device), z, y, None, None, None, stats, aux, -0.45, 1.0, diversity, grad_out=grad)
ref_z = small.double().requires_grad_()
ref = ride_loss_reference(ref_z, y.cpu(), None, None, None, -0.45, 1.0, diversity)
ref.backward()
assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
err = (grad.cpu().double() - ref_z.grad).abs().max().item()
assert err <= 1e-3 * ref_z.grad.abs().max().item(), err
print("ok")
"""


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_expert_offsets_past_2_31_elements(diversity):
    """Experts 2^30 elements apart: the last one's offset does not fit 32 bits (a 32-bit product
    would read and write far outside the tensors). Only the rows' pages are touched; run in a
    child process, so that an out-of-bounds access fails this test alone."""
    if DEVICE == "cuda" and torch.cuda.mem_get_info()[0] < 9 * 2**30:
        pytest.skip("two 4.3 GB fp16 tensors do not fit in this GPU's free memory")
    result = subprocess.run([sys.executable, "-c", FAR_EXPERTS, DEVICE, diversity], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("phase2", [False, True], ids=["before_drw", "after_drw"])
def test_row_split_head_main_and_tail(diversity, phase2):
    """A row's classes run as a head [0, h) up to its first 16-element boundary, full blocks from
    there and a masked tail (the forward reads the tail and the head first, as one masked block,
    two where they pass a block). With C = 50 and 16-class blocks the rows start at elements 0, 50,
    100, 150 (h = 0, 14, 12, 10) and the targets fall in the head, the main loop and the tail;
    with C = 5 and C = 20 some rows have a head and no full block (h > C, h + 16 > C); with C = 32
    every row is whole blocks (no tail, no head)."""
    for E, C, targets in ((3, 50, [3, 5, 20, 48]), (4, 5, [0, 4, 2]), (2, 20, [1, 19, 7, 12]), (2, 32, [0, 31, 16])):
        z, y, m, w, t = make_inputs(E, len(targets), C, phase2=phase2, seed=C)
        y = torch.tensor(targets, device=z.device)
        assert_matches(*fused(z, y, m, w, t, diversity, block_c=16), *reference(z, y, m, w, t, diversity))


def test_int32_target():
    z, y, m, w, t = make_inputs(2, 3, 20, seed=5)
    assert_matches(*fused(z, y.int(), m, w, t, "mean"), *reference(z, y, m, w, t, "mean"))


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, diversity):
    """Math in float32: the loss equals the float32 reference on the same (rounded) values; the
    gradient comes back in the input dtype, within 2x of PyTorch's own rounding of it."""
    z32, y, m, w, t = make_inputs(3, 4, 100, seed=21)
    z = z32.to(dtype)
    loss, grad = fused(z, y, m, w, t, diversity, block_c=32)
    assert grad.dtype == dtype
    ref_loss, ref_grad = reference(z, y, m, w, t, diversity)  # float32 math on the half values
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch_err = rounding_error(ref_grad, dtype)  # PyTorch in that dtype
    err = (grad.float() - ref_grad).abs().max().item()
    assert err <= half_factor(dtype) * torch_err + 1e-7, f"{dtype}: gradient error {err:.3g} vs PyTorch's {torch_err:.3g}"


def assert_fp16_scaled_gradient(grad, z, y, m, w, t, diversity, scale):
    """grad (float16) against the float64 reference gradient multiplied by `scale`, element by
    element: within one float16 ulp of that value (round-to-nearest after scaling gives half an
    ulp; the float32 math adds a few float32 ulps of the largest entry where terms cancel). A
    gradient rounded before scaling loses the small entries (flushed or subnormal) and fails; a
    grad_output cast to float16 overflows and fails. At the target, softmax - 1 of a confident
    row cancels in any float32 implementation (PyTorch's included): there the bound is at least
    float32's, 2^-18 of the largest entry."""
    x = z.detach().double().requires_grad_()
    ride_loss_reference(x, y, *(None if v is None else v.double() for v in (m, w, t)), LAMBDA, TM, diversity).backward()
    ref = x.grad * scale
    big = ref.abs().max()
    assert big.item() < 65504, "pick a case whose scaled gradient fits float16"
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all(), f"non-finite gradient at grad_output {scale:g}"
    ulp = torch.clamp(ref.abs(), min=2.0**-14).to(torch.float16).double() * 2.0**-10  # float16 spacing around ref
    at_target = torch.zeros_like(ref, dtype=torch.bool)
    at_target[:, torch.arange(ref.shape[1]), y] = True
    tol = ulp + 1e-6 * ref.abs() + 4e-7 * big
    tol = torch.where(at_target, torch.clamp(tol, min=2.0**-18 * big), tol)
    bad = (grad.double() - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries off by more than one float16 ulp at grad_output {scale:g}"


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("scale", [2.0**16, 2.0**20], ids=["65536", "2^20"])
def test_fp16_gradient_scaled_before_rounding(scale, diversity):
    """GradScaler's grad_output (2^16 at the start, up to 2^24) with float16 logits: no overflow,
    and the stored gradient is the scaled one rounded once."""
    z32, y, m, w, t = make_inputs(3, 256, 40, seed=61)
    z = z32.to(torch.float16)
    _, grad = fused(z, y, m, w, t, diversity, block_c=32, grad_output=scale)
    assert_fp16_scaled_gradient(grad, z, y, m, w, t, diversity, scale)
    # and through autograd and the registered op
    x = z.clone().requires_grad_()
    ride_loss(x, y, m, w, t, LAMBDA, TM, diversity, impl="triton").backward(torch.tensor(scale, device=DEVICE))
    assert_fp16_scaled_gradient(x.grad, z, y, m, w, t, diversity, scale)


def test_fp16_no_overflow_up_to_2_24():
    """At 2^24 the scaled gradient of a large batch still fits float16: it must come back finite."""
    z32, y, m, w, t = make_inputs(2, 512, 16, phase2=False, seed=62)
    x = z32.to(torch.float16).requires_grad_()
    ride_loss(x, y, m, w, t, LAMBDA, TM, "mean", impl="triton").backward(torch.tensor(2.0**24, device=DEVICE))
    assert_fp16_scaled_gradient(x.grad, x, y, m, w, t, "mean", 2.0**24)


# --------------------------------------------------------------------------- autograd and dispatch


def test_autograd_function_and_grad_output_scaling():
    z, y, m, w, t = make_inputs(3, 4, 30, seed=31)
    ref_loss, ref_grad = reference(z, y, m, w, t, "pairwise")
    x = z.clone().requires_grad_()
    loss = ride_loss_fused(x, y, m, w, t, LAMBDA, TM, "pairwise")
    assert "ride_fast_ride_loss" in loss.grad_fn.name()  # one registered op, not a Python Function
    (2.5 * loss).backward(retain_graph=True)
    assert_grad_close(x.grad, 2.5 * ref_grad)
    loss.backward()  # the stored gradient is not modified by the first backward
    assert_grad_close(x.grad, 3.5 * ref_grad)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("phase2", [False, True], ids=["before_drw", "after_drw"])
def test_parts_with_the_batch_weight_sum_add_up_to_the_whole_batch(phase2, diversity):
    """`weight_sum` replaces the kernel's own divisor, in the loss and in the backward (which
    reads it from `aux`): the parts of a batch split as over ranks add up to the whole batch."""
    z, y, m, w, t = make_inputs(3, 5, 40, phase2=phase2, seed=33)
    ref_loss, ref_grad = reference(z, y, m, w, t, diversity)
    call = lambda x, yy, mm, ww, tt, weight_sum: ride_loss_fused(x, yy, mm, ww, tt, LAMBDA, TM, diversity, weight_sum=weight_sum)  # noqa: E731
    loss, grad = loss_and_grad_in_parts(call, z, y, m, w, t, cuts=[0, 1, 5])
    assert_matches(loss.float(), grad, ref_loss, ref_grad)
    _, _, aux = ride_loss_forward(z[:, 1:], y[1:], m, w, t, LAMBDA, TM, diversity, weight_sum=torch.tensor([7.5], device=z.device))
    assert aux.item() == 7.5


def test_forward_without_grad():
    z, y, m, w, t = make_inputs(3, 4, 30, seed=32)
    for diversity in ("mean", "pairwise"):
        with torch.no_grad():
            loss = ride_loss_fused(z.clone().requires_grad_(), y, m, w, t, LAMBDA, TM, diversity)
        loss2, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity)  # the forward alone writes no gradient
        assert stats.shape == (4, 3, 3) and aux.shape == (1,)
        ref_loss, _ = reference(z, y, m, w, t, diversity)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss2, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_dispatch_triton(diversity):
    z, y, m, w, t = make_inputs(2, 3, 25, seed=41)
    ref_loss, ref_grad = reference(z, y, m, w, t, diversity)
    x = z.clone().requires_grad_()
    loss = ride_loss(x, y, m, w, t, LAMBDA, TM, diversity, impl="triton")
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    assert_grad_close(x.grad, ref_grad)
    with pytest.raises(ValueError, match="collaborative"):
        ride_loss(x, y, m, w, t, LAMBDA, TM, diversity, individual=False, impl="triton")


def test_dispatch_auto_takes_triton_on_cuda_only(monkeypatch):
    import ride_fast_kernels.ride_loss as kernel_module

    calls = []
    real = kernel_module._forward  # the op's Triton branch launches through this
    monkeypatch.setattr(kernel_module, "_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    z, y, m, w, t = make_inputs(2, 3, 25, seed=42)
    ride_loss(z, y, m, w, t, LAMBDA, TM, impl="auto")
    assert len(calls) == (1 if z.is_cuda else 0)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(monkeypatch):
    z, y, _, _, t = make_inputs(3, 4, 20, seed=51)
    with pytest.raises(ValueError, match=r"\[E, B, C\].*\(4, 20\)"):
        ride_loss_forward(z[0], y)
    with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[4\].*\(5,\)"):
        ride_loss_forward(z, torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="integer class indices.*float32"):
        ride_loss_forward(z, y.float())
    with pytest.raises(ValueError, match=r"margins must have shape \[C\] = \[20\], got \(21,\)"):
        ride_loss_forward(z, y, margins=torch.zeros(21, device=DEVICE))
    with pytest.raises(ValueError, match=r"temperature must have shape \[C\] = \[20\]"):
        ride_loss_forward(z, y, temperature=t[:10])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16.*float64"):
        ride_loss_forward(z.double(), y)
    with pytest.raises(ValueError, match="diversity must be 'mean' or 'pairwise'"):
        ride_loss_forward(z, y, diversity="max")
    with pytest.raises(ValueError, match="block_c must be a power of two"):
        ride_loss_forward(z, y, block_c=24)
    too_many = _utils.MAX_CLASSES + 1
    with pytest.raises(ValueError, match=f"C = {too_many} classes.*C <= {_utils.MAX_CLASSES}"):
        ride_loss_forward(torch.zeros(1, 1, too_many, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=f"E = {_utils.MAX_EXPERTS + 1} experts"):
        ride_loss_forward(torch.zeros(_utils.MAX_EXPERTS + 1, 1, 4, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE))
    _, stats, aux = ride_loss_forward(z, y)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="grad_out must be"):
        ride_loss_backward(one, z, y, None, None, None, stats, aux, grad_out=torch.empty(3, 4, 21, device=DEVICE))
    with pytest.raises(ValueError, match=r"stats must be \[B, 3, E\]"):
        ride_loss_backward(one, z, y, None, None, None, stats[:2], aux)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="need CUDA tensors .*TRITON_INTERPRET=1"):
            ride_loss_forward(z, y)


def test_target_out_of_range(monkeypatch):
    z, y, m, w, t = make_inputs(2, 3, 10, seed=52)
    bad = y.clone()
    bad[1] = 10
    monkeypatch.setenv("RIDE_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match=r"target\[1\] = 10 is out of range for C = 10"):
        ride_loss_forward(z, bad, m, w, t, LAMBDA, TM)
    bad[1] = -1
    with pytest.raises(ValueError, match=r"target\[1\] = -1 is out of range"):
        ride_loss_forward(z, bad)
    # without the debug check: no out-of-bounds access, the loss is NaN
    monkeypatch.setenv("RIDE_FAST_DEBUG", "0")
    loss, _, _ = ride_loss_forward(z, bad, m, w, t, LAMBDA, TM)
    assert math.isnan(loss.item())


# --------------------------------------------------------------------------- GPU, full size

GPU_SHAPES = [(128, 3, 100), (256, 4, 1000), (512, 4, 8142), (64, 6, 8142), (512, 8, 1000)]


@pytest.mark.parametrize("tuning", [{"stages": 2}, {"max_registers": 64}, {"stages": 3, "max_registers": 96}],
                         ids=["stages2", "regs64", "stages3-regs96"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_tuning_overrides_give_the_defaults_bits(tuning, diversity):
    """stages and max_registers change how the kernels are scheduled, never what they compute:
    loss, statistics and gradient equal the defaults' bit for bit (a main loop of several blocks:
    block_c = 16 over C = 83 classes; on a GPU the same holds with cp.async in the loop, which the
    GPU check verifies for every variant it times)."""
    z, y, m, w, t = make_inputs(3, 5, 83)
    go = torch.tensor(1.0, device=z.device)
    outputs = []
    for kw in ({}, tuning):
        loss, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, **kw)
        grad = ride_loss_backward(go, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16, **kw)
        outputs.append((loss, stats, grad))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, message", [({"stages": 0}, "stages must be an integer from 1 to 4, got 0"),
                                          ({"stages": 2.0}, "stages must be an integer from 1 to 4, got 2.0"),
                                          ({"max_registers": 60}, "max_registers must be a multiple of 8 from 24 to 255"),
                                          ({"max_registers": 512}, "max_registers must be a multiple of 8 from 24 to 255")])
def test_tuning_overrides_are_checked(bad, message):
    z, y, m, w, t = make_inputs(2, 3, 20)
    with pytest.raises(ValueError, match=message):
        ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "mean", **bad)
    loss, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "mean")
    with pytest.raises(ValueError, match=message):
        ride_loss_backward(torch.tensor(1.0, device=z.device), z, y, m, w, t, stats, aux, LAMBDA, TM, "mean", **bad)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("E,phase2", [(1, True), (3, False), (3, True), (6, True)], ids=["E1", "E3-before_drw", "E3-after_drw", "E6"])
def test_forward_written_gradient_is_the_backwards(E, phase2, diversity):
    """`grad_out` on the forward: a second pass over each row writes the gradient for
    grad_output = 1, the backward's bits (the same float32 operations on the same statistics;
    with DRW weights both divide by the same weight sum). The backward then leaves it as it is
    where grad_output is 1 and recomputes it otherwise. Every buffer starts poisoned with NaN;
    the rows have a head, full blocks and a tail (block_c = 16, C = 83)."""
    z, y, m, w, t = make_inputs(E, 5, 83, phase2=phase2, seed=E)
    ws = None if w is None else w[y].sum().reshape(1)
    loss, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, weight_sum=ws)
    written = torch.full_like(z, float("nan"))
    loss_w, stats_w, aux_w = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, weight_sum=ws, grad_out=written)
    assert torch.equal(loss_w, loss) and torch.equal(stats_w, stats) and torch.equal(aux_w, aux)
    for go in (1.0, 3.0, 2.0**16):
        go = torch.tensor(go, device=z.device)
        expected = ride_loss_backward(go, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16)
        buf = written.clone()
        grad = ride_loss_backward(go, z, y, m, w, t, stats_w, aux_w, LAMBDA, TM, diversity, block_c=16, grad_out=buf, grad_written=True)
        assert grad is buf and torch.equal(grad, expected), f"grad_output {go.item():g}"
    # without the weight sum passed in, every program sums it before its gradient pass: the same
    # loss and gradient up to the order of that sum, and the backward's divisor is that sum
    g_own = torch.full_like(z, float("nan"))
    loss_own, stats_own, aux_own = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, grad_out=g_own)
    assert_matches(loss_own, g_own, *reference(z, y, m, w, t, diversity))
    recomputed = ride_loss_backward(torch.tensor(1.0, device=z.device), z, y, m, w, t, stats_own, aux_own, LAMBDA, TM, diversity,
                                    block_c=16)
    assert torch.equal(recomputed, g_own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_forward_written_gradient_for_a_declared_scale(diversity, dtype):
    """`grad_scale` on the forward: the gradient written for grad_output = 1/3 (a micro-batch's
    share) is the backward's at 1/3 bit for bit, scaled before its one rounding. The backward told
    the same number keeps the buffer without touching it (poisoned here after the forward, it
    stays poisoned), and recomputes it for any other grad_output."""
    z, y, m, w, t = make_inputs(3, 5, 83, dtype=dtype, seed=11)
    ws = w[y].sum().reshape(1)
    scale = float(torch.tensor(1 / 3, dtype=torch.float32))
    _, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, weight_sum=ws)
    third, one = torch.tensor(scale, device=z.device), torch.tensor(1.0, device=z.device)
    expected = ride_loss_backward(third, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16)
    written = torch.full_like(z, float("nan"))
    ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=16, weight_sum=ws, grad_out=written, grad_scale=scale)
    assert torch.equal(written, expected)
    poisoned = torch.full_like(z, float("nan"))
    kept = ride_loss_backward(third, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16, grad_out=poisoned,
                              grad_written=True, grad_scale=scale)
    assert kept is poisoned and torch.isnan(kept).all(), "the backward wrote a gradient the forward had written"
    redone = ride_loss_backward(one, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16, grad_out=written.clone(),
                                grad_written=True, grad_scale=scale)
    assert torch.equal(redone, ride_loss_backward(one, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=16))
    with pytest.raises(ValueError, match="grad_scale must be a finite number"):
        ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, grad_out=written, grad_scale=float("inf"))


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_forward_written_gradient_fp16_scaled(diversity):
    """float16 with GradScaler's grad_output: the gradient the forward wrote (unscaled) is not
    kept; the backward recomputes it scaled, rounded once."""
    z32, y, m, w, t = make_inputs(3, 256, 40, seed=61)
    z = z32.to(torch.float16)
    buf = torch.full_like(z, float("nan"))
    _, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=32, grad_out=buf)
    go = torch.tensor(2.0**16, device=z.device)
    grad = ride_loss_backward(go, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=32, grad_out=buf, grad_written=True)
    assert_fp16_scaled_gradient(grad, z, y, m, w, t, diversity, 2.0**16)


def test_forward_written_gradient_into_a_strided_buffer():
    """A buffer with unit class stride but other strides of its own (rows of a larger tensor, not
    16-element aligned): the forward writes there what the backward writes into a new tensor."""
    z, y, m, w, t = make_inputs(3, 4, 83, seed=7)
    ws = w[y].sum().reshape(1)
    _, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "pairwise", block_c=16, weight_sum=ws)
    expected = ride_loss_backward(torch.tensor(1.0, device=z.device), z, y, m, w, t, stats, aux, LAMBDA, TM, "pairwise", block_c=16)
    big = torch.full((3, 7, 83), float("nan"), device=z.device)
    buf = big[:, 1:5]
    ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "pairwise", block_c=16, weight_sum=ws, grad_out=buf)
    assert torch.equal(buf, expected)
    assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, 5:]).all()  # nothing written outside


def _row_block_order(run, z, row, C):
    """The first class of each tile the interpreter loads from expert 0's row `row` of z, in
    order, while `run()` runs (the targets' gathers, one value an expert, are not tiles)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    item, base = z.element_size(), z.data_ptr() + row * z.stride(1) * z.element_size()
    firsts = []
    real = builder.create_masked_load

    def record(ptrs, mask, *args):
        if ptrs.data.ndim == 2:
            a = ptrs.data.astype("int64")[np.broadcast_to(mask.data, ptrs.data.shape)]
            a = a[(a >= base) & (a < base + C * item)]
            if a.size:
                firsts.append(int(a.min() - base) // item)
        return real(ptrs, mask, *args)

    builder.create_masked_load = record
    try:
        run()
    finally:
        del builder.create_masked_load  # the class's method again
    return firsts


@pytest.mark.skipif(DEVICE == "cuda", reason="records the interpreter's loads")
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_gradient_pass_reads_the_row_from_its_end(diversity):
    """The forward that writes the gradient meets a row's blocks in its second pass in the reverse
    of its first pass's order, so that what a least-recently-used L2 still holds of the rows in
    flight, the blocks read last, is read first; the backward kernel reads head, main loop, tail.
    Row 1 at C = 100 with 32-class blocks starts at element 100: head [0, 12), full blocks at 12
    and 44, tail [76, 100). The first pass reads the tail and the head first, as the lanes of
    masked blocks (here two: the head's lanes start at the next multiple of 16 after the tail's
    24), then the main loop; the second pass the main loop from its end, the tail, the head."""
    z, y, m, w, t = make_inputs(3, 2, 100, seed=5)
    ws = w[y].sum().reshape(1)
    _, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=32, weight_sum=ws)
    buf = torch.empty_like(z)

    def fwd(grad_out=None):
        ride_loss_forward(z, y, m, w, t, LAMBDA, TM, diversity, block_c=32, weight_sum=ws, grad_out=grad_out)

    def bwd():
        one = torch.tensor(1.0, device=z.device)
        ride_loss_backward(one, z, y, m, w, t, stats, aux, LAMBDA, TM, diversity, block_c=32)

    assert _row_block_order(fwd, z, 1, 100) == [76, 0, 12, 44]
    assert _row_block_order(bwd, z, 1, 100) == [0, 12, 44, 76]
    assert _row_block_order(lambda: fwd(buf), z, 1, 100) == [76, 0, 12, 44, 44, 12, 76, 0]


def test_forward_written_gradient_arguments_are_checked():
    z, y, m, w, t = make_inputs(2, 3, 20)
    with pytest.raises(ValueError, match=r"grad_out must be \[E, B, C\] = \(2, 3, 20\) of torch.float32 on .* with unit class stride"):
        ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "mean", grad_out=torch.empty(2, 20, 3).transpose(1, 2))
    loss, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "mean")
    with pytest.raises(ValueError, match="grad_written=True needs grad_out"):
        ride_loss_backward(torch.tensor(1.0, device=z.device), z, y, m, w, t, stats, aux, LAMBDA, TM, "mean", grad_written=True)


@pytest.mark.gpu
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,E,C", GPU_SHAPES, ids=[f"B{b}-E{e}-C{c}" for b, e, c in GPU_SHAPES])
def test_gpu_full_size(B, E, C, dtype, diversity):
    """Each case in the design the fused loss runs for it (`fused_loss_design`: the forward writes
    the gradient for float32 logits of up to 4 experts), so that the op below reuses the kernels
    compiled here: against the reference, then through the op bit for bit."""
    z32, y, m, w, t = make_inputs(E, B, C, seed=B + E + C, device="cuda")
    z = z32.to(dtype)
    loss, grad = fused(z, y, m, w, t, diversity, written=fused_loss_design(z) == "grad_in_forward")
    ref_loss, ref_grad = reference(z, y, m, w, t, diversity)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    if dtype == torch.float32:
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * scale)
    else:
        torch_err = (ref_grad.to(dtype).float() - ref_grad).abs().max().item()
        err = (grad.float() - ref_grad).abs().max().item()
        assert err <= 2 * torch_err + 1e-7, f"gradient error {err:.3g} vs PyTorch's {torch_err:.3g}"
    # through autograd and the dispatcher ("auto" takes Triton on CUDA)
    x = z.clone().requires_grad_()
    ride_loss(x, y, m, w, t, LAMBDA, TM, diversity, impl="auto").backward()
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    if fused_loss_design(z) == "grad_in_forward":
        # a loss multiplied by a declared factor (a micro-batch's share): the forward writes the
        # gradient for it; a power of two scales every float32 and bfloat16 rounding exactly
        x = z.clone().requires_grad_()
        with scaled_before_backward(0.25):
            loss = ride_loss(x, y, m, w, t, LAMBDA, TM, diversity, impl="auto")
        (loss * 0.25).backward()
        torch.testing.assert_close(x.grad, grad * 0.25, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    """Forward and backward, launchers and the op, never synchronise with the host."""
    z, y, m, w, t = make_inputs(4, 512, 8142, seed=1, device="cuda")
    x = z.clone().requires_grad_()
    ride_loss(x, y, m, w, t, LAMBDA, TM, impl="triton").backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.empty_like(z)  # the design the op runs here (float32): the kernels compiled by its call above
        loss, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, grad_out=g)
        ride_loss_backward(torch.ones((), device="cuda"), z, y, m, w, t, stats, aux, LAMBDA, TM, grad_out=g, grad_written=True)
        op_loss = ride_loss(x, y, m, w, t, LAMBDA, TM, impl="triton")
        op_loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(op_loss)


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["two_kernel", "grad_in_forward"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_opcheck_triton_path(diversity, grad_in_forward):
    """The op's Triton branch, in both designs: schema, fake implementation and autograd
    registration agree."""
    z, y, m, w, t = make_inputs(3, 4, 20, seed=71)
    args = (z.requires_grad_(), y, m, w, t, LAMBDA, TM, diversity, True, True)
    torch.library.opcheck(torch.ops.ride_fast.ride_loss.default, (*args, None, grad_in_forward))
    torch.library.opcheck(torch.ops.ride_fast.ride_loss.default, (*args, torch.tensor(3.5, device=z.device), grad_in_forward))


def test_forward_reduces_in_its_last_program_and_resets_the_ticket():
    """The loss is the fixed-order sum of the rows' partial sums, written by the forward's last
    program; the ticket counter is zero again after every launch (the next call relies on it)."""
    from ride_fast_kernels.ride_loss import _ticket_counter

    z, y, m, w, t = make_inputs(3, 37, 20, seed=81)
    part = torch.full((37, 3), float("nan"), device=DEVICE)
    losses = [ride_loss_forward(z, y, m, w, t, LAMBDA, TM, "pairwise", part_out=part)[0] for _ in range(3)]
    assert int(_ticket_counter(z.device).item()) == 0
    expected = part[:, 0].sum() / part[:, 2].sum() + part[:, 1].sum()
    torch.testing.assert_close(losses[0], expected, rtol=1e-6, atol=1e-6)
    assert losses[0].item() == losses[1].item() == losses[2].item()  # deterministic
    _, _, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM)
    torch.testing.assert_close(aux, w[y].sum().reshape(1))


def test_ticket_counter_is_not_made_inside_a_capture(monkeypatch):
    """A counter zeroed inside a CUDA-graph capture is only recorded: eager calls before the first
    replay would read garbage. The first call on a device must be eager, and says so."""
    from ride_fast_kernels import ride_loss as launcher

    device = torch.device("cuda", 7)  # never allocated: the check comes first
    monkeypatch.setattr(launcher, "_COUNTERS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before its first eager call on cuda:7"):
        launcher._ticket_counter(device)
    assert launcher._COUNTERS == {}


def test_launches_run_on_the_logits_device(monkeypatch):
    """Triton launches on the current CUDA device: both launchers switch to the logits' device
    first (a process on cuda:1 that never called torch.cuda.set_device)."""
    from ride_fast_kernels import ride_loss as launcher

    entered = []
    guard = launcher._on_device

    def recording(device):
        entered.append(device)
        return guard(device)

    monkeypatch.setattr(launcher, "_on_device", recording)
    z, y, m, w, t = make_inputs(2, 3, 20, seed=83)
    fused(z, y, m, w, t, "mean")
    assert entered == [z.device, z.device]
