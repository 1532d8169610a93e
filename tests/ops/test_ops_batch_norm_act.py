"""batch_norm_act: the C kernels against PyTorch's BatchNorm + add + ReLU (float64 truth), in float32
and bfloat16, the running statistics, the ReLU mask, determinism, autocast, and every case that must
take the reference instead."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

from ride_fast.ops import native
from ride_fast.ops.batch_norm_act import batch_norm_act, batch_norm_act_reference, fused_path_taken

CL = torch.channels_last


@pytest.fixture
def fresh_native(monkeypatch):
    """native.library() tried again in this test, and again after it (with the environment restored)."""
    native.reset()
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def make_bn(C: int, momentum: float | None = 0.1, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(C, generator=g))
    return bn.train()


def inputs(B, C, H, residual, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(B, C, H, H, generator=g) + 0.5).to(dtype).contiguous(memory_format=CL).requires_grad_()
    r = torch.randn(B, C, H, H, generator=g).to(dtype).contiguous(memory_format=CL).requires_grad_() if residual else None
    grad = torch.randn(B, C, H, H, generator=g).to(dtype).contiguous(memory_format=CL)
    return x, r, grad


def run(fn, bn, x, r, grad, relu):
    out = fn(bn, x, r, relu)
    wrt = [x, bn.weight, bn.bias] + ([r] if r is not None else [])
    return out, torch.autograd.grad(out, wrt, grad)


def as_float64(bn, x, r, grad):
    bn64 = make_bn(bn.num_features, bn.momentum).double()
    bn64.load_state_dict(bn.state_dict())
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    return bn64, leaf(x), leaf(r), grad.double()


# (output, grad of x, of weight and bias, of the residual): rtol, atol. In bfloat16 the output and
# grad_x are rounded once from float32 (a relative error of at most 2^-9), the residual's gradient
# is the incoming one or 0 (exact), and the weight and bias gradients are float32 sums.
TOLERANCES = {
    torch.float32: {"out": (1e-5, 1e-5), "x": (1e-4, 1e-5), "weight": (1e-4, 1e-5), "bias": (1e-4, 1e-5), "residual": (1e-4, 1e-5)},
    torch.bfloat16: {"out": (2**-8, 1e-5), "x": (2**-8, 1e-4), "weight": (1e-4, 1e-4), "bias": (1e-4, 1e-4), "residual": (0, 0)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False), (True, False)])
@pytest.mark.parametrize("B,C,H", [(8, 16, 6), (4, 72, 5), (3, 13, 7)])
def test_matches_pytorch_in_float64(B, C, H, residual, relu, momentum, threads, dtype):
    """Output, the gradients of x, weight, bias and residual, and the running statistics (two steps,
    so the update's weight and num_batches_tracked count) equal BatchNorm + add + ReLU in float64 on
    the same inputs, up to one rounding to the tensors' dtype."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    tol = TOLERANCES[dtype]
    try:
        bn = make_bn(C, momentum)
        bn64, *_ = as_float64(bn, *inputs(B, C, H, residual)[:1], None, torch.zeros(1))
        for step in range(2):
            x, r, grad = inputs(B, C, H, residual, seed=step, dtype=dtype)
            assert fused_path_taken(bn, x, r)
            out, grads = run(batch_norm_act, bn, x, r, grad, relu)
            _, x64, r64, grad64 = as_float64(bn, x, r, grad)
            out64, grads64 = run(batch_norm_act_reference, bn64, x64, r64, grad64, relu)
            assert out.is_contiguous(memory_format=CL) and grads[0].is_contiguous(memory_format=CL)
            assert out.dtype == grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32
            torch.testing.assert_close(out.double(), out64, rtol=tol["out"][0], atol=tol["out"][1])
            for got, want, name in zip(grads, grads64, ["x", "weight", "bias", "residual"]):
                torch.testing.assert_close(got.double(), want, rtol=tol[name][0], atol=tol[name][1],
                                           msg=lambda m, n=name: f"grad of {n}: {m}")
            torch.testing.assert_close(bn.running_mean, bn64.running_mean.float(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(bn.running_var, bn64.running_var.float(), rtol=1e-6, atol=1e-6)
            assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked) == step + 1
    finally:
        torch.set_num_threads(before)


def test_relu_mask_drops_non_finite_gradients_as_pytorch_does():
    """Where the ReLU is off, the incoming gradient does not count, even inf or NaN; where it is on, a
    NaN reaches every gradient of its channel."""
    bn = make_bn(8)
    x, r, grad = inputs(4, 8, 5, residual=True)
    with torch.no_grad():
        off = (batch_norm_act_reference(make_bn(8), x, r) == 0) & (torch.arange(8).view(1, 8, 1, 1) < 4)
    grad = grad.masked_fill(off, float("inf"))
    grad[:, 7, 0, 0] = float("nan")
    ref_bn = make_bn(8)
    _, got = run(batch_norm_act, bn, x, r, grad, True)
    _, want = run(batch_norm_act_reference, ref_bn, x, r, grad, True)
    assert off.any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.isfinite(got[0][:, :4]).all() and torch.isnan(got[0][:, 7]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_same_bits_every_time(dtype):
    """A result depends only on the inputs and the thread count (fixed row blocks, sums in thread order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for _ in range(2):
            bn = make_bn(24)
            x, r, grad = inputs(16, 24, 8, residual=True, dtype=dtype)
            out, grads = run(batch_norm_act, bn, x, r, grad, True)
            results.append([out, *grads, bn.running_mean.clone(), bn.running_var.clone()])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    finally:
        torch.set_num_threads(before)


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 1.0


def _cases():
    x = torch.randn(4, 6, 3, 3)
    cl = x.contiguous(memory_format=CL)
    hooked = make_bn(6)
    hooked.register_forward_hook(lambda m, i, o: None)
    return {
        "NCHW": (make_bn(6), x, None),
        "float16": (make_bn(6), cl.half(), None),
        "residual in another dtype": (make_bn(6), cl, cl.bfloat16()),
        "bfloat16 parameters": (make_bn(6).bfloat16(), cl.bfloat16(), None),
        "evaluation mode": (make_bn(6).eval(), cl, None),
        "own forward": (_OwnForward(6), cl, None),
        "forward hook": (hooked, cl, None),
        "one pixel, both layouts": (make_bn(6), torch.randn(4, 6, 1, 1), None),
        "residual of another shape": (make_bn(6), cl, torch.randn(4, 6, 1, 1)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_takes_the_reference_where_the_kernels_do_not_apply(case):
    bn, x, r = _cases()[case]
    assert not fused_path_taken(bn, x, r)
    ref_bn = copy.deepcopy(bn)
    got, want = batch_norm_act(bn, x, r), batch_norm_act_reference(ref_bn, x, r)
    assert torch.equal(got, want)
    assert torch.equal(bn.running_var, ref_bn.running_var)


def test_under_bfloat16_autocast_a_block_takes_the_kernels():
    """Under CPU autocast the convolution's output is bfloat16 and the parameters float32: the kernels
    run, and forward and backward match float64 on the same bfloat16 activations."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False).to(memory_format=CL)
    bn, ref_bn = make_bn(8), make_bn(8).double()
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        shortcut = torch.randn_like(h)
        assert h.dtype == torch.bfloat16 and fused_path_taken(bn, h, shortcut)
        out = batch_norm_act(bn, h, shortcut)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [h, bn.weight, bn.bias], grad)
    h64 = h.detach().double().requires_grad_()
    out64 = batch_norm_act_reference(ref_bn, h64, shortcut.double())
    want = torch.autograd.grad(out64, [h64, ref_bn.weight, ref_bn.bias], grad.double())
    torch.testing.assert_close(out.double(), out64, rtol=2**-8, atol=1e-5)
    assert got[0].dtype == torch.bfloat16
    for g, w, (rtol, atol) in zip(got, want, [(2**-8, 1e-4), (1e-4, 1e-4), (1e-4, 1e-4)]):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)
    torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, rtol=1e-6, atol=1e-6)


def test_single_value_per_channel_raises_as_pytorch_does():
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(make_bn(4), x)


def test_without_a_compiler_falls_back_with_one_warning(fresh_native, tmp_path, caplog):
    fresh_native.setenv("RIDE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    fresh_native.setenv("CC", str(tmp_path / "no-such-compiler"))
    bn, ref_bn = make_bn(8), make_bn(8)
    x, r, grad = inputs(4, 8, 3, residual=True)
    with caplog.at_level(logging.WARNING, logger="ride_fast"):
        assert not fused_path_taken(bn, x, r)
        assert not fused_path_taken(bn, x, r)  # tried once
        out = batch_norm_act(bn, x, r)
    assert [rec.getMessage() for rec in caplog.records if "C kernels" in rec.getMessage()] == [
        next(rec.getMessage() for rec in caplog.records if "C kernels" in rec.getMessage())]
    assert "no-such-compiler" in caplog.text and "Error" not in caplog.text.replace("Errno", "")
    assert torch.equal(out, batch_norm_act_reference(ref_bn, x, r))


def test_switched_off_by_the_environment(fresh_native, caplog):
    fresh_native.setenv("RIDE_FAST_NATIVE", "0")
    x, r, _ = inputs(4, 8, 3, residual=False)
    with caplog.at_level(logging.WARNING, logger="ride_fast"):
        assert native.library() is None and not fused_path_taken(make_bn(8), x, r)
    assert "C kernels" not in caplog.text


def test_a_compile_error_is_reported_and_nothing_is_left_in_the_cache(fresh_native, tmp_path, caplog):
    """A source the compiler rejects: the warning carries the compiler's message, and the cache holds
    no half-written library."""
    bad = tmp_path / "bad.c"
    bad.write_text("int f( {\n")
    fresh_native.setattr(native, "SOURCES", (bad,))
    fresh_native.setenv("RIDE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ride_fast"):
        assert native.library() is None
    assert "bad.c" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []


def test_built_once_then_loaded_from_the_cache(fresh_native, tmp_path):
    fresh_native.setenv("RIDE_FAST_CACHE_DIR", str(tmp_path))
    lib = native.library()
    assert lib is not None
    (built,) = tmp_path.glob("ride_fast_native_*.so")
    assert built == native.library_path()
    stamp = built.stat().st_mtime_ns
    native.reset()
    assert native.library() is not None and built.stat().st_mtime_ns == stamp


def test_a_changed_header_names_another_library(fresh_native, tmp_path):
    """The sources include csrc/common.h: editing it must rebuild the cached library, so the header is
    part of the name's hash as the sources are."""
    (header,) = native.HEADERS
    edited = tmp_path / header.name
    edited.write_bytes(header.read_bytes() + b"\n/* edited */\n")
    before = native.library_path()
    fresh_native.setattr(native, "HEADERS", (edited,))
    assert native.library_path() != before


def _build_without_avx512(tmp_path):
    """The library built for this CPU without AVX-512, so with the scalar row loops."""
    import ctypes
    import subprocess

    so = tmp_path / "scalar.so"
    done = subprocess.run([native._compiler(), *native.FLAGS, "-mno-avx512f", *map(str, native.SOURCES), "-o", str(so), "-lm"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lib = ctypes.CDLL(str(so))
    for name in ("ride_bn_act_forward", "ride_bn_act_backward"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = native.SIGNATURES[name], ctypes.c_int
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_avx512_and_the_scalar_row_loops_give_the_same_bits(tmp_path, dtype):
    """The AVX-512 row loops (16 channels at a time, a masked chunk for the rest, sums kept in
    registers over a block of rows) against the scalar loops a build without AVX-512 takes: every
    output, gradient and statistic bit for bit, at widths with and without a remainder chunk, a row
    count that is not a multiple of the block, every variant of ReLU and residual, NaN and inf too."""
    lib = native.library()
    if lib is None or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("needs the C library built with AVX-512")
    scalar = _build_without_avx512(tmp_path)
    g = torch.Generator().manual_seed(3)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    for C, N in ((16, 301), (72, 130), (13, 67), (40, 1)):
        x = (2 * torch.randn(N, C, generator=g) + 0.3).to(dtype)
        res = torch.randn(N, C, generator=g).to(dtype)
        grad = torch.randn(N, C, generator=g).to(dtype)
        x[0, 0], grad[min(1, N - 1), C - 1] = float("nan"), float("inf")
        weight, bias = 0.5 + torch.rand(C, generator=g), torch.randn(C, generator=g)
        for relu in (1, 0):
            for r in (res, None):
                got = []
                for which in (lib, scalar):
                    out, save = torch.empty(N, C, dtype=dtype), torch.empty(5, C)
                    gx, gr, gw, gb = torch.empty(N, C, dtype=dtype), torch.empty(N, C, dtype=dtype), torch.empty(C), torch.empty(C)
                    bf = int(dtype == torch.bfloat16)
                    assert which.ride_bn_act_forward(ptr(x), ptr(r), ptr(weight), ptr(bias), 1e-5, N, C, relu, bf, ptr(out), ptr(save), 2) == 0
                    assert which.ride_bn_act_backward(ptr(grad), ptr(x), ptr(r), ptr(weight), ptr(save), N, C, relu, bf, ptr(gx),
                                                      ptr(gr if r is not None else None), ptr(gw), ptr(gb), 2) == 0
                    got.append([out, save, gx, gw, gb] + ([gr] if r is not None else []))
                for a, b in zip(*got):
                    assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 and a.dtype == dtype else torch.int32),
                                       b.view(torch.int16 if dtype == torch.bfloat16 and b.dtype == dtype else torch.int32)), (C, N, relu, r is None)
