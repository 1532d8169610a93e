"""`ride_loss_analytic` (the CPU default of `ride_loss(impl="auto")`) against autograd of
`ride_loss_reference`: same loss, same gradient, in float64 to rounding and in float32.

Shape legend: E experts, B images, C classes.
"""
from __future__ import annotations

import importlib

import pytest
import torch

ride_loss_module = importlib.import_module("ride_fast.ops.ride_loss")  # the module (ride_fast.ops.ride_loss is also a function)
from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops import ride_loss_analytic
from ride_fast.ops.ride_loss import ride_loss, ride_loss_reference


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(E, B, C, dtype, seed, vectors=("margins", "class_weights", "temperature")):
    """Logits with confident rows and the after-switch vectors built from long-tailed class counts
    (a wide temperature range: reweight_factor 0.5); only the named vectors are kept."""
    inp = ride_loss_inputs(
        E, B, C, phase=1, dtype=dtype, seed=seed, reweight_factor=0.5,
        vector_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
    )
    vecs = dict(zip(("margins", "class_weights", "temperature"), inp.vectors))
    return inp.logits, inp.target, {k: (v if k in vectors else None) for k, v in vecs.items()}


def loss_and_grad(fn, z, y, vecs, diversity, lam=-0.45, tm=0.83):
    x = z.clone().requires_grad_()
    loss = fn(x, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], lam, tm, diversity)
    loss.backward()
    return loss.detach(), x.grad


CASES = [(1, 3, 7), (2, 1, 2), (3, 5, 100), (4, 2, 33), (5, 3, 10), (6, 2, 100)]
VECTOR_SETS = [(), ("margins",), ("margins", "class_weights", "temperature"), ("class_weights", "temperature")]


@pytest.mark.parametrize("vectors", VECTOR_SETS, ids=["plain", "ldam", "ldam_drw_temp", "drw_temp"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("E,B,C", CASES)
def test_float64_equals_autograd_of_reference(E, B, C, diversity, vectors):
    z, y, vecs = make_inputs(E, B, C, torch.float64, seed=E * 100 + B * 10 + C, vectors=vectors)
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, diversity)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("E,B,C", [(3, 8, 1000), (4, 4, 8142)])
def test_float32_close_to_reference(E, B, C, diversity):
    z, y, vecs = make_inputs(E, B, C, torch.float32, seed=C)
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, diversity)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    assert loss.dtype == grad.dtype == torch.float32
    # measured (4 seeds each): loss within 4e-6 relative; gradient within 1e-5 of its largest entry,
    # and within 2.2e-4 relative where it is above 1e-3 of its largest entry
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=5e-4, atol=3e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype, seed, diversity):
    """Half inputs: float32 math, the gradient in the input dtype, as the reference. Both round a
    float32 gradient once, so they differ by at most one rounding step: measured, most elements are
    bit-identical and the rest within 0.83 eps |reference| (16 cases)."""
    z, y, vecs = make_inputs(3, 4, 50, dtype, seed=5 + seed)
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, diversity)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=torch.finfo(dtype).eps, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
@pytest.mark.parametrize("vectors", [(), ("margins", "class_weights", "temperature")], ids=["plain", "ldam_drw_temp"])
def test_logits_with_any_strides(vectors, diversity, dtype):
    """Logits that are a view in another order ([B, E, C] transposed, every class second): the same
    loss and gradient as from their contiguous copy (ATen's softmax writes its out= buffer in
    contiguous order whatever that buffer's strides, so a buffer shaped like the input would be
    filled out of order)."""
    z, y, vecs = make_inputs(3, 5, 40, dtype, seed=12, vectors=vectors)
    views = {"transposed": z.transpose(0, 1).contiguous().transpose(0, 1),
             "class_stride_2": torch.stack([z, z], -1).select(-1, 0)}
    ref_loss, ref_grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    for name, view in views.items():
        assert not view.is_contiguous() and torch.equal(view, z), name
        x = view.detach().requires_grad_()
        loss = ride_loss_analytic(x, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83, diversity)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_gradcheck(diversity):
    z, y, vecs = make_inputs(3, 2, 5, torch.float64, seed=9)
    fn = lambda x: ride_loss_analytic(x, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83, diversity)
    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(),))


def test_grad_output_scaling_and_retain_graph():
    z, y, vecs = make_inputs(3, 4, 20, torch.float64, seed=10)
    _, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, "mean")
    x = z.clone().requires_grad_()
    loss = ride_loss_analytic(x, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83)
    loss.backward(retain_graph=True)  # grad_output 1: the stored gradient is handed over
    loss.backward(retain_graph=True)
    (2.5 * loss).backward()
    torch.testing.assert_close(x.grad, 4.5 * ref_grad, rtol=1e-10, atol=1e-14)


def test_no_grad_and_zero_diversity():
    z, y, vecs = make_inputs(3, 4, 20, torch.float64, seed=11)
    with torch.no_grad():
        loss = ride_loss_analytic(z, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83)
    ref = ride_loss_reference(z, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, "mean", lam=0.0)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, "mean", lam=0.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_auto_dispatch_on_cpu(monkeypatch):
    """impl='auto' on CPU: the analytic path; the reference for individual=False or when a
    per-class vector needs a gradient."""
    calls = []
    real = ride_loss_module._ride_loss_op  # the registered op; its 9th argument is use_triton
    monkeypatch.setattr(ride_loss_module, "_ride_loss_op", lambda *a: (a[8] or calls.append(1)) or real(*a))
    z, y, vecs = make_inputs(2, 3, 10, torch.float32, seed=12)
    args = (z, y, vecs["margins"], vecs["class_weights"], vecs["temperature"], -0.45, 0.83)
    torch.testing.assert_close(ride_loss(*args, impl="auto"), ride_loss_reference(*args))
    assert calls == [1]
    ride_loss(*args, impl="reference")
    ride_loss(*args, individual=False, impl="auto")
    t = vecs["temperature"].clone().requires_grad_()
    ride_loss(z, y, vecs["margins"], vecs["class_weights"], t, -0.45, 0.83, impl="auto").backward()
    assert t.grad is not None
    assert calls == [1]
    with pytest.raises(ValueError, match="target must have shape"):
        ride_loss(z, y[:2], impl="auto")


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu_rule", "device_rule"])
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_log_sum_exp_where_the_softmax_underflows(monkeypatch, host_reads, diversity):
    """Logits whose target column lies far below the row's maximum (a wrong, confident expert):
    softmax(x) at the target underflows in float32, so the log-sum-exp cannot be read from it there.
    Both rules for the log-sum-exp (the CPU's, which recomputes those rows, and the one for devices,
    from each row's maximum) give the float64 reference's loss and gradient."""
    analytic = importlib.import_module("ride_fast.ops.ride_loss_analytic")
    monkeypatch.setattr(analytic, "_host_reads_are_free", lambda x: host_reads)
    z, y, vecs = make_inputs(3, 6, 40, torch.float32, seed=13)
    z = z.clone()
    z[:, 1::2, :] = 0.0
    z[:, 1::2][:, :, 0] = 60.0  # rows 1, 3, 5: class 0 at 60, the rest at 0
    y = y.clone()
    y[1::2] = torch.where(y[1::2] == 0, 1, y[1::2])  # their target is not class 0: p_y ~ e^-60 (with T < 1: below 1e-31)
    z[:, 1, y[1]] = -40.0  # and one target at -100 from the maximum: softmax underflows to 0 even with T = 1
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z.double(), y, {k: None if v is None else v.double() for k, v in vecs.items()}, diversity)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=3e-5 * ref_grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("diversity", ["mean", "pairwise"])
def test_cuda_logits_take_the_sync_free_rule(diversity):
    """On a GPU the analytic path (taken when the fused kernel does not cover the call) reads no value
    on the host: its log-sum-exps come from row maxima. Same loss and gradient as the reference."""
    z, y, vecs = make_inputs(3, 8, 1000, torch.float32, seed=14)
    z, y = z.cuda(), y.cuda()
    vecs = {k: None if v is None else v.cuda() for k, v in vecs.items()}
    ref_loss, ref_grad = loss_and_grad(ride_loss_reference, z, y, vecs, diversity)
    loss, grad = loss_and_grad(ride_loss_analytic, z, y, vecs, diversity)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=5e-4, atol=3e-5 * ref_grad.abs().max().item())
