"""The registered operator `torch.ops.ride_fast.ride_loss` and the dispatch's public answer.

Shape legend: E experts, B images, C classes.
"""
from __future__ import annotations

import pytest
import torch
from _loss_parts import loss_and_grad_in_parts

from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops import ride_loss, ride_loss_path, ride_loss_reference


def test_path_per_device_and_dtype():
    assert ride_loss_path("cpu", torch.float32) == "analytic"
    assert ride_loss_path(torch.device("cpu"), torch.bfloat16, 4, 8142) == "analytic"
    assert ride_loss_path("cpu", torch.float32, individual=False) == "reference"
    try:
        import triton  # noqa: F401
    except ImportError:
        assert ride_loss_path("cuda", torch.float32) == "analytic"
    else:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert ride_loss_path("cuda", dtype, 4, 8142) == "triton"
        assert ride_loss_path("cuda", torch.float64) == "analytic"  # not a kernel dtype
        assert ride_loss_path("cuda", torch.float32, 8, 100) == "triton"
        assert ride_loss_path("cuda", torch.float32, 9, 100) == "analytic"  # more experts than the tile holds
        assert ride_loss_path("cuda", torch.float32, 4, 1 << 17) == "analytic"
    assert ride_loss_path("meta", torch.float32) == "analytic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("phase", [0, 1])
def test_opcheck_cpu(phase, diversity, dtype):
    """Schema, fake implementation and autograd registration agree with the real kernel."""
    inp = ride_loss_inputs(3, 4, 11, phase=phase, dtype=dtype, seed=phase)
    z = inp.logits.requires_grad_()
    args = (z, inp.target, *inp.vectors, -0.45, inp.temperature_mean, diversity, False, True)
    torch.library.opcheck(torch.ops.ride_fast.ride_loss.default, (*args, None))
    torch.library.opcheck(torch.ops.ride_fast.ride_loss.default, (*args, torch.tensor(2.5, dtype=torch.float64)))


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("phase", [0, 1], ids=["before_drw", "drw"])
def test_parts_of_a_batch_add_up_to_the_whole_batch(phase, diversity, impl):
    """Parts that divide by their share of the batch's weight sum add up to the whole batch's
    loss and gradient; parts that divide by their own sums do not, once the classes are weighted."""
    inp = ride_loss_inputs(3, 7, 11, phase=phase, dtype=torch.float64, seed=6)
    z, y, vecs = inp.logits, inp.target, inp.vectors
    call = lambda x, t, m, w, T, weight_sum: ride_loss(x, t, m, w, T, -0.45, inp.temperature_mean, diversity,  # noqa: E731
                                                       impl=impl, weight_sum=weight_sum)
    x = z.clone().requires_grad_()
    whole = call(x, y, *vecs, None)
    whole.backward()
    loss, grad = loss_and_grad_in_parts(call, z, y, *vecs, cuts=[0, 2, 7])
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-14)
    own = sum(call(z[:, lo:hi], y[lo:hi], *vecs, None) * (hi - lo) / 7 for lo, hi in ((0, 2), (2, 7)))
    assert (abs(float(own - whole)) > 1e-3) == (phase == 1)  # the control


def test_op_node_and_values():
    inp = ride_loss_inputs(3, 5, 13, phase=1, dtype=torch.float64, seed=3)
    x = inp.logits.clone().requires_grad_()
    loss = ride_loss(x, inp.target, *inp.vectors, -0.45, inp.temperature_mean, "pairwise")
    assert "ride_fast_ride_loss" in loss.grad_fn.name()
    loss.backward(torch.tensor(3.0, dtype=torch.float64))
    r = inp.logits.clone().requires_grad_()
    ref = ride_loss_reference(r, inp.target, *inp.vectors, -0.45, inp.temperature_mean, "pairwise")
    ref.backward(torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-10, atol=1e-14)


def test_float16_cpu_gradient_rounded_after_scaling():
    """The analytic path keeps a float16 gradient in float32 until grad_output is applied."""
    inp = ride_loss_inputs(2, 64, 20, phase=1, dtype=torch.float16, seed=4)
    x = inp.logits.clone().requires_grad_()
    ride_loss(x, inp.target, *inp.vectors, -0.45, inp.temperature_mean).backward(torch.tensor(2.0**16))
    r = inp.logits.double().requires_grad_()
    ride_loss_reference(r, inp.target, *(v.double() for v in inp.vectors), -0.45, inp.temperature_mean).backward()
    expected = (r.grad * 2.0**16).to(torch.float16)
    assert torch.isfinite(x.grad).all()
    # rounded once from float32: within one float16 ulp of the float64 value rounded to float16
    ulp = torch.clamp(expected.float().abs(), min=2.0**-14) * 2.0**-10
    assert ((x.grad.float() - expected.float()).abs() <= ulp + 1e-3).all()


def test_validates_once(monkeypatch):
    """`ride_loss` runs its input check once per call (the op itself checks nothing again)."""
    import importlib

    module = importlib.import_module("ride_fast.ops.ride_loss")
    calls = []
    real = module.check_ride_loss_inputs
    monkeypatch.setattr(module, "check_ride_loss_inputs", lambda *a: calls.append(1) or real(*a))
    inp = ride_loss_inputs(3, 4, 11, seed=5)
    x = inp.logits.requires_grad_()
    ride_loss(x, inp.target, *inp.vectors, -0.45, 1.0).backward()
    assert calls == [1]


def test_second_derivative_is_refused_clearly():
    """create_graph=True through the op would treat its gradient as a constant: refused, not wrong."""
    inp = ride_loss_inputs(3, 4, 11, phase=1, dtype=torch.float64, seed=7)
    x = inp.logits.clone().requires_grad_()
    loss = ride_loss(x, inp.target, *inp.vectors, -0.45, inp.temperature_mean)
    with pytest.raises(RuntimeError, match="no second derivative.*impl='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)
    r = inp.logits.clone().requires_grad_()  # the reference has one
    (g,) = torch.autograd.grad(ride_loss(r, inp.target, *inp.vectors, -0.45, inp.temperature_mean, impl="reference"), r,
                               create_graph=True)
    assert g.requires_grad


@pytest.mark.parametrize("need_grad", [True, False])
def test_target_out_of_range_where_the_host_cannot_look_poisons_the_loss(monkeypatch, need_grad):
    """On a device the op cannot read the target's range without waiting: a class index out of
    range gives a NaN loss (which training skips), as the kernels do, not an indexing fault."""
    import importlib

    module = importlib.import_module("ride_fast.ops.ride_loss")
    monkeypatch.setattr(module, "_host_reads_are_free", lambda t: False)
    inp = ride_loss_inputs(3, 4, 11, phase=1, dtype=torch.float64, seed=8)
    bad = inp.target.clone()
    bad[2] = 11
    x = inp.logits.clone().requires_grad_(need_grad)
    assert torch.isnan(ride_loss(x, bad, *inp.vectors, -0.45, inp.temperature_mean))
    assert torch.isfinite(ride_loss(x, inp.target, *inp.vectors, -0.45, inp.temperature_mean))
