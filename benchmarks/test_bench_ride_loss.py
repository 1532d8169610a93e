"""RIDE loss forward + backward per provider and shape, with pytest-benchmark.

Shape legend: E experts, B images, C classes. Providers:

    eager     ride_loss_reference, autograd backward
    compile   torch.compile(ride_loss_reference)
    loop      the original RIDE code's loop over experts (benchmarks/_baselines.py)
    analytic  ride_loss_analytic: the reference's value, closed-form backward (the CPU default)
    triton    the fused kernel (CUDA only; the interpreter is never timed)

Reported in extra_info: median ms and GB/s against the floor "read the logits once + write their
gradient once" = 2 * E * B * C * itemsize bytes.

The CPU goal (`test_default_cpu_loss_against_the_original_code`): the RIDE loss module training
builds, on its default path, at least 3x the original code's RIDELoss (a transcription of the
authors' model/loss.py, benchmarks/_original_structure.py) at (B, E, C) = (128, 4, 8142), fp32,
forward + backward, the two timed in A B B A pairs in one process (benchmarks/_paired.py).

    pytest benchmarks/test_bench_ride_loss.py --benchmark-only        # time (CPU or GPU)
    pytest benchmarks/test_bench_ride_loss.py --benchmark-only -k "not compile"   # short GPU run
    pytest benchmarks/test_bench_ride_loss.py --benchmark-disable     # CI: each case runs once

`compile` runs only when timing (it compiles for 10-30 s per shape); bf16 is timed on GPU only.
"""
from __future__ import annotations

import os

import pytest
import torch
from _baselines import original_ride_loss_forward
from _original_structure import OriginalRIDELoss
from _paired import time_paired, use_bench_threads

from ride_fast.config import LossConfig
from ride_fast.losses import build_loss, loss_path
from ride_fast.losses.synthetic import ride_loss_inputs
from ride_fast.ops import ride_loss_analytic
from ride_fast.ops.ride_loss import ride_loss_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LAMBDA, TM = -0.2, 0.9  # ImageNet-LT / iNat diversity factor, a temperature mean != 1

SHAPES = [(128, 3, 100), (256, 4, 1000), (512, 4, 8142), (128, 4, 8142)]  # (B, E, C)
# torch.compile of the reference takes 10-30 s per shape and only matters for timing
PROVIDERS = ["eager", pytest.param("compile", marks=pytest.mark.timing), "loop", "analytic", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ride_inputs(B, E, C, dtype, device=DEVICE, seed=0):
    """Cosine-like s-scaled logits and the phase-2 (after DRW) margins, weights and temperatures,
    from long-tailed class counts (the shared builder, ride_fast.losses.synthetic)."""
    inp = ride_loss_inputs(E, B, C, phase=1, dtype=dtype, device=device, seed=seed, logits="cosine", reweight_factor=0.02)
    return inp.logits, inp.target, *inp.vectors


_compiled = {}


def loss_fn(provider):
    if provider == "eager":
        return ride_loss_reference
    if provider == "loop":
        return lambda z, y, m, w, t, lam, tm, diversity: original_ride_loss_forward(z, y, m, w, t, lam, tm)
    if provider == "analytic":
        return ride_loss_analytic
    if provider == "compile":
        if "fn" not in _compiled:
            # one graph per (shape, dtype) case: lift dynamo's default limit of 8 recompilations
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _compiled["fn"] = torch.compile(ride_loss_reference, dynamic=False)
        return _compiled["fn"]
    from ride_fast.ops import ride_loss_fused

    return ride_loss_fused


def skip_reason(provider, dtype, benchmark):
    if provider == "triton" and not CUDA:
        return "the fused kernel is timed on CUDA only (never the interpreter)"
    if dtype != torch.float32 and not CUDA:
        return "half precision is benchmarked on GPU only"
    return None


def rounds_for(n_elements):
    return 50 if CUDA else max(5, min(50, int(4e7 / n_elements)))


def run_benchmark(benchmark, step, n_elements, floor_bytes):
    """Time `step` (which synchronises the device itself) and report ms and GB/s of the floor."""
    if benchmark.disabled:
        benchmark(step)  # one plain run
        return
    step()  # compile / autotune / allocate outside the timed rounds
    benchmark.pedantic(step, rounds=rounds_for(n_elements), iterations=1, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["ms"] = round(median_s * 1e3, 4)
    benchmark.extra_info["GB/s"] = float(f"{floor_bytes / median_s / 1e9:.3g}")
    benchmark.extra_info["floor_bytes"] = floor_bytes
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"


#: how far each provider may be from the float64 reference on the same inputs, per logits dtype:
#: (loss rtol, gradient rtol, gradient atol as a fraction of the largest gradient entry). float32:
#: summation order only; bfloat16: the gradient is rounded once to bfloat16 (one step: 2^-7).
TOLERANCE = {torch.float32: (1e-5, 1e-3, 3e-5), torch.bfloat16: (1e-4, 2 ** -7, 2 ** -8)}
_REFERENCE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def float64_reference(z, y, m, w, t):
    """Loss and gradient of ride_loss_reference in float64 on the same (rounded) inputs, on the CPU."""
    key = (tuple(z.shape), z.dtype)
    if key not in _REFERENCE:
        z64 = z.detach().double().cpu().requires_grad_()
        vecs = [v.double().cpu() if v is not None else None for v in (m, w, t)]
        loss = ride_loss_reference(z64, y.cpu(), *vecs, LAMBDA, TM, "mean")
        loss.backward()
        _REFERENCE[key] = (loss.detach(), z64.grad)
    return _REFERENCE[key]


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("B,E,C", SHAPES, ids=[f"B{b}-E{e}-C{c}" for b, e, c in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_ride_loss(benchmark, provider, B, E, C, dtype_name):
    dtype = DTYPES[dtype_name]
    reason = skip_reason(provider, dtype, benchmark)
    if reason:
        pytest.skip(reason)
    z, y, m, w, t = ride_inputs(B, E, C, dtype)
    z.requires_grad_()
    fn = loss_fn(provider)
    benchmark.group = f"ride_loss fwd+bwd B={B} E={E} C={C} {dtype_name}"

    result = {}

    def step():
        z.grad = None
        loss = fn(z, y, m, w, t, LAMBDA, TM, "mean")
        loss.backward()
        synchronize()
        result["loss"] = loss.detach()

    run_benchmark(benchmark, step, E * B * C, 2 * E * B * C * z.element_size())
    # what was timed computes the RIDE loss: value and gradient against float64 on the same inputs
    ref_loss, ref_grad = float64_reference(z, y, m, w, t)
    loss_rtol, grad_rtol, grad_atol = TOLERANCE[dtype]
    assert z.grad is not None and z.grad.dtype == z.dtype and z.grad.shape == z.shape
    torch.testing.assert_close(result["loss"].double().cpu(), ref_loss, rtol=loss_rtol, atol=0.0)
    torch.testing.assert_close(z.grad.double().cpu(), ref_grad, rtol=grad_rtol, atol=grad_atol * ref_grad.abs().max().item())


def test_loop_baseline_matches_reference():
    """The loop-per-expert baseline computes the same loss and gradient as the reference."""
    z, y, m, w, t = ride_inputs(16, 3, 50, torch.float32, device="cpu", seed=2)
    for vecs in ((m, w, t), (m, None, None), (None, None, None)):
        a = z.clone().requires_grad_()
        b = z.clone().requires_grad_()
        original_ride_loss_forward(a, y, *vecs, LAMBDA, TM).backward()
        ride_loss_reference(b, y, *vecs, LAMBDA, TM, "mean").backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the CPU goal against the original
CPU_GOAL = 3.0  # the default path's speed-up over the original code's RIDELoss, median of the pairs
GOAL_CASE = (128, 4, 8142)  # (B, E, C): iNaturalist 2018's classes at a CPU-sized batch
GOAL_PAIRS = int(os.environ.get("RIDE_FAST_BENCH_LOSS_PAIRS", "12"))
REWEIGHT_FACTOR = 0.02  # the ImageNet-LT / iNaturalist recipes' temperature factor


def goal_case(B, E, C):
    """(logits, target, ride_fast's loss module, the original code's RIDELoss) in the DRW phase, from
    the same long-tailed class counts."""
    inp = ride_loss_inputs(E, B, C, phase=1, logits="cosine", reweight_factor=REWEIGHT_FACTOR)
    counts = inp.counts.tolist()
    ride = build_loss(LossConfig(diversity_factor=LAMBDA, reweight_factor=REWEIGHT_FACTOR, reweight_epoch=0), inp.counts.numpy())
    ride.set_epoch(1)  # after the switch: margins, class weights and temperatures all active
    original = OriginalRIDELoss(counts, diversity_factor=LAMBDA, reweight_factor=REWEIGHT_FACTOR)
    return inp.logits, inp.target, ride, original


def test_default_cpu_loss_against_the_original_code(benchmark):
    """The default loss path on the CPU against the original code's RIDELoss, fp32, forward +
    backward: the same loss and gradient (always), and >= CPU_GOAL times faster (when timing).

    The original receives the mean logits ready-made, as its model computes them; ride_fast's loss
    computes them itself, inside the timing."""
    timing = not benchmark.disabled
    use_bench_threads(timing)
    B, E, C = GOAL_CASE if timing else (16, 4, 1000)
    z, y, ride, original = goal_case(B, E, C)
    assert loss_path(ride, "cpu", E, C) == "analytic"  # the default path on the CPU
    zbar = z.mean(0)
    x_ride, x_original = z.clone().requires_grad_(), z.clone().requires_grad_()

    def ride_step():
        x_ride.grad = None
        loss = ride(x_ride, y)
        loss.backward()
        return loss

    def original_step():
        x_original.grad = None
        loss = original(zbar, y, {"logits": x_original})
        loss.backward()
        return loss

    torch.testing.assert_close(ride_step().detach(), original_step().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ride.grad, x_original.grad, rtol=1e-3, atol=3e-5 * float(x_original.grad.abs().max()))
    if not timing:
        benchmark(ride_step)
        return
    paired = benchmark.pedantic(lambda: time_paired(original_step, ride_step, GOAL_PAIRS), rounds=1, iterations=1)
    summary = paired.summary()
    benchmark.extra_info.update(summary, case={"B": B, "E": E, "C": C}, threads=torch.get_num_threads(), goal=CPU_GOAL,
                                torch=torch.__version__, path="analytic")
    assert summary["speedup_median"] >= CPU_GOAL, (
        f"default loss path {summary['speedup_median']:.2f}x the original code's RIDELoss at (B, E, C) = {GOAL_CASE} "
        f"(pairs {summary['speedups']}), goal {CPU_GOAL}x")
