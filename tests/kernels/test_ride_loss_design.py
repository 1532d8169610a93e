"""The fused loss's design as the registered operator runs it: where the forward writes the
gradient itself ("grad_in_forward") and the backward hands that buffer over, and where the two
kernels run as before ("two_kernel"). Without CUDA the kernels run under the interpreter (see
conftest.py): small shapes. Shape legend: E experts, B images, C classes.
"""
from __future__ import annotations

import pytest
import torch
from ride_fast_kernels import _utils
from ride_fast_kernels import ride_loss as kernels

from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops.ride_loss import ride_loss_fused
from ride_fast.ops.ride_loss_design import declared_grad_scale, fused_loss_design, scaled_before_backward

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _utils.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/kernels/conftest.py sets it)", allow_module_level=True)
LAMBDA, TM = -0.45, 0.83


def inputs(E=3, B=4, C=40, dtype=torch.float32, seed=0, phase=1):
    """Logits after the DRW switch (margins, weights, temperatures) and the batch's weight sum,
    passed to every call so that both designs divide by the same float32 number; phase 0: margins
    only (no weight sum)."""
    inp = ride_loss_inputs(E, B, C, phase=phase, dtype=dtype, device=DEVICE, seed=seed)
    m, w, t = inp.vectors
    return inp.logits, inp.target, m, w, t, None if w is None else w[inp.target].sum().reshape(1)


@pytest.fixture
def launches(monkeypatch):
    """What each forward and backward launch of the kernels was given: the forward's gradient
    buffer (its data pointer, or None) and grad_scale, the backward's grad_written flag, and
    whether a backward told grad_written kept the forward's gradient (returned without writing:
    the buffer, poisoned with NaN just before the launch, is still NaN, and gets its values back)."""
    seen = {"forward": [], "backward": [], "scale": [], "kept": []}
    forward, backward = kernels._forward, kernels._backward

    def record_forward(*args, grad_out=None, grad_scale=1.0, **kw):
        seen["forward"].append(None if grad_out is None else grad_out.data_ptr())
        seen["scale"].append(grad_scale)
        return forward(*args, grad_out=grad_out, grad_scale=grad_scale, **kw)

    def record_backward(*args, grad_written=False, grad_out=None, **kw):
        seen["backward"].append(grad_written)
        if not grad_written:
            return backward(*args, grad_written=grad_written, grad_out=grad_out, **kw)
        values = grad_out.clone()
        grad_out.fill_(float("nan"))
        grad = backward(*args, grad_written=grad_written, grad_out=grad_out, **kw)
        seen["kept"].append(bool(torch.isnan(grad).all()))
        if seen["kept"][-1]:
            grad.copy_(values)
        return grad

    monkeypatch.setattr(kernels, "_forward", record_forward)
    monkeypatch.setattr(kernels, "_backward", record_backward)
    return seen


def loss_and_grad(z, y, m, w, t, ws, diversity="mean", grad_output=1.0):
    x = z.clone().requires_grad_()
    loss = ride_loss_fused(x, y, m, w, t, LAMBDA, TM, diversity, weight_sum=ws)
    (loss * grad_output).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("phase", [0, 1], ids=["before_drw", "after_drw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_the_forwards_gradient_is_handed_over(diversity, dtype, phase, launches, monkeypatch):
    """grad_in_forward: the forward writes the gradient, the backward kernel keeps it (grad_output
    is 1) and autograd takes that very buffer as the leaf's .grad; loss and gradient are the
    two-kernel design's bit for bit."""
    z, y, m, w, t, ws = inputs(dtype=dtype, seed=1, phase=phase)
    assert fused_loss_design(z) == "grad_in_forward"
    loss, grad = loss_and_grad(z, y, m, w, t, ws, diversity)
    assert launches["forward"] == [grad.data_ptr()] and launches["backward"] == [True] and launches["kept"] == [True]
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "two_kernel")
    loss2, grad2 = loss_and_grad(z, y, m, w, t, ws, diversity)
    assert launches["forward"][1] is None and launches["backward"][1] is False
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


def test_grad_output_not_one_recomputes_in_place(launches, monkeypatch):
    """A scaled loss (grad_output 2.5): the backward kernel recomputes the gradient into the
    forward's buffer, scaled and rounded once: the two-kernel design's bits."""
    z, y, m, w, t, ws = inputs(seed=2)
    _, grad = loss_and_grad(z, y, m, w, t, ws, "pairwise", grad_output=2.5)
    assert launches["forward"] == [grad.data_ptr()] and launches["kept"] == [False]
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "two_kernel")
    _, grad2 = loss_and_grad(z, y, m, w, t, ws, "pairwise", grad_output=2.5)
    assert torch.equal(grad, grad2)


def test_a_retained_graph_hands_the_buffer_over_once(launches):
    """Several backward calls through one retained graph: the first gets the forward's buffer,
    every later one a gradient of its own, and none changes a gradient handed out before."""
    z, y, m, w, t, ws = inputs(seed=3)
    x = z.clone().requires_grad_()
    loss = ride_loss_fused(x, y, m, w, t, LAMBDA, TM, "mean", weight_sum=ws)
    (g2,) = torch.autograd.grad(2.0 * loss, x, retain_graph=True)
    first = g2.clone()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, x)
    assert g2.data_ptr() == launches["forward"][0] and launches["backward"] == [True, False, False]
    assert torch.equal(g2, first), "a later backward changed the gradient handed out first"
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g3, 3 * g1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,E", [(torch.float16, 3), (torch.float32, 5)], ids=["fp16", "E5"])
def test_two_kernels_where_the_forward_would_not_keep_its_gradient(dtype, E, launches):
    """float16 (GradScaler's grad_output is never 1) and more than 4 experts (the gradient-writing
    forward spills there) run the two kernels; so does a call without a gradient."""
    z, y, m, w, t, ws = inputs(E=E, dtype=dtype, seed=4)
    assert fused_loss_design(z) == "two_kernel"
    loss_and_grad(z, y, m, w, t, ws)
    with torch.no_grad():
        ride_loss_fused(z.clone().requires_grad_(), y, m, w, t, LAMBDA, TM, weight_sum=ws)
    assert launches["forward"] == [None, None] and launches["backward"] == [False]


def test_design_rule_and_its_override(monkeypatch):
    """`loss_design` (pure host logic): float32 and bfloat16 logits of up to 4 experts write the
    gradient in the forward; RIDE_FAST_LOSS_DESIGN sets either design, and a wrong value says so."""
    assert [_utils.loss_design(torch.float32, e) for e in (1, 4, 5, 8)] == ["grad_in_forward"] * 2 + ["two_kernel"] * 2
    assert _utils.loss_design(torch.bfloat16, 2) == "grad_in_forward"
    assert _utils.loss_design(torch.float16, 2) == "two_kernel"
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "grad_in_forward")
    assert _utils.loss_design(torch.float16, 8) == "grad_in_forward"
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "auto")
    assert _utils.loss_design(torch.float16, 2) == "two_kernel"
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "one_kernel")
    with pytest.raises(ValueError, match="RIDE_FAST_LOSS_DESIGN='one_kernel': expected auto, two_kernel or grad_in_forward"):
        _utils.loss_design(torch.float32, 2)


def test_a_compiled_loss_runs_the_two_kernels(launches):
    """Under torch.compile the autograd formula is traced once, so the hand-over (an eager
    decision) is not made: the forward writes no gradient, and the result is the same."""
    z, y, m, w, t, ws = inputs(seed=5)
    loss, grad = loss_and_grad(z, y, m, w, t, ws)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ride_loss_fused(x, y, m, w, t, LAMBDA, TM, "mean", weight_sum=ws), backend="aot_eager",
                             fullgraph=True)
    x = z.clone().requires_grad_()
    loss2 = compiled(x)
    loss2.backward()
    assert launches["forward"][1:] == [None] and launches["backward"][1:] == [False]
    assert torch.equal(loss, loss2.detach()) and torch.equal(grad, x.grad)


def test_float16_autocast_runs_the_two_kernels(launches):
    """A float16-autocast step scales its loss with GradScaler (grad_output is the scale, never 1):
    the forward writes no gradient there, even for float32 logits; under bfloat16 autocast it does."""
    z, y, m, w, t, ws = inputs(seed=6)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert fused_loss_design(z) == "two_kernel"
        loss_and_grad(z, y, m, w, t, ws)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert fused_loss_design(z) == "grad_in_forward"
    assert launches["forward"] == [None] and launches["backward"] == [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_loss_scaled_before_backward_gets_its_gradient_written_for_the_factor(dtype, launches, monkeypatch):
    """Inside `scaled_before_backward(factor)` (a micro-batch's share, distillation's factor E,
    nested: outer first) the forward writes the gradient for the grad_output autograd will form,
    float32 products in the order of the multiplications, and the backward keeps it: the two-kernel
    design's gradient bit for bit, in one pass. A factor left undeclared (None) runs the two
    kernels; outside any declaration the scale is 1 again."""
    z, y, m, w, t, ws = inputs(dtype=dtype, seed=7)
    share, experts = 1 / 7, 3  # a micro-batch of 1 image in 7, distillation's E: float32(share) x 3 != float32(3 / 7)
    x = z.clone().requires_grad_()
    with scaled_before_backward(share):
        with scaled_before_backward(experts):
            assert fused_loss_design(z) == "grad_in_forward"
            assert declared_grad_scale() == float(torch.tensor(share, dtype=torch.float32) * experts)
            loss = ride_loss_fused(x, y, m, w, t, LAMBDA, TM, "pairwise", weight_sum=ws)
    ((loss * experts) * share).backward()
    assert launches["forward"] == [x.grad.data_ptr()] and launches["kept"] == [True]
    assert launches["scale"] == [float(torch.tensor(share, dtype=torch.float32) * experts)]
    assert declared_grad_scale() == 1.0
    monkeypatch.setenv("RIDE_FAST_LOSS_DESIGN", "two_kernel")
    x2 = z.clone().requires_grad_()
    ((ride_loss_fused(x2, y, m, w, t, LAMBDA, TM, "pairwise", weight_sum=ws) * experts) * share).backward()
    assert torch.equal(x.grad, x2.grad)
    monkeypatch.delenv("RIDE_FAST_LOSS_DESIGN")
    with scaled_before_backward(0.5), scaled_before_backward(None):
        assert declared_grad_scale() is None and fused_loss_design(z) == "two_kernel"
        _, grad = loss_and_grad(z, y, m, w, t, ws, grad_output=0.5)
    assert launches["forward"][2:] == [None] and launches["backward"][2:] == [False]
    with pytest.raises(ValueError, match="factor must be a finite number or None"):
        with scaled_before_backward(float("nan")):
            pass


def test_register_budget_of_each_design():
    """72 registers up to 4 experts (three 8-warp programs an SM), 128 beyond (4-warp programs);
    the gradient-writing forward 64 with LDAM's margins (four programs an SM, 512 rows in one
    wave) and 80 for plain CE (three an SM); every kernel of float32 "pairwise" with temperatures
    at 3 or 4 experts, in the narrow tile, 64: the budgets at which every variant compiles without
    spills (tests/kernels/test_kernels_compile_sm90.py)."""
    budget = kernels.register_budget
    assert budget(4, 4) == budget(4, 2, write_grad=False, margins=True) == budget(4, 2, pairwise_temps=True) == 72
    assert budget(4, 4, pairwise_temps=True) == 64  # the narrow tile's two kernels too
    assert budget(4, 4, write_grad=True, margins=True) == budget(1, 2, True, True, False) == 64
    assert budget(4, 4, write_grad=True, margins=True, pairwise_temps=True) == 64  # the narrow tile
    assert budget(4, 4, write_grad=True, margins=False, pairwise_temps=True) == 64  # with CE too
    assert budget(2, 4, write_grad=True, margins=True, pairwise_temps=True) == 64  # 2 experts fit at V = 4
    assert budget(4, 2, write_grad=True, margins=True, pairwise_temps=True) == 64  # so do 2-byte logits
    assert budget(4, 4, write_grad=True, margins=False) == 80  # plain CE
    assert budget(8, 4, write_grad=True, margins=True) == 128


def test_the_narrow_tile_of_float32_pairwise_with_temperatures():
    """V = 2 classes a thread for float32 "pairwise" with temperatures at 3 or 4 experts, in
    every kernel of it (the same tile in both designs: the same bits); everything else keeps V = 4."""
    from ride_fast_kernels._utils import pick_tile
    narrow = kernels.narrow_tile
    assert narrow(4, 4, True) and not narrow(2, 4, True) and not narrow(4, 2, True) and not narrow(4, 4, False)
    assert not narrow(8, 4, True)
    assert pick_tile(4, 8142, 4, narrow=True) == (256, 2, 8) and pick_tile(4, 8142, 4) == (256, 4, 8)
    assert pick_tile(4, 100, 4, narrow=True) == (64, 2, 2) and pick_tile(4, 8142, 4, 64, narrow=True) == (32, 2, 1)
