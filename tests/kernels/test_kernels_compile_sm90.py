"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The CPU tests run the kernels through the interpreter, which accepts code the real compiler would
reject. This test compiles them ahead of time (Triton front end, LLVM, and the ptxas bundled with
the triton wheel; no driver needed) in a subprocess without TRITON_INTERPRET, for every dtype and
diversity mode, and reports the register use.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import itertools, os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ride_fast_kernels import ride_loss
    from ride_fast_kernels._utils import pick_num_warps

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs, num_warps):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(src, target=target, options={"num_warps": num_warps})

    fwd = {
        "z_ptr": None, "target_ptr": "*i64", "margin_ptr": "*fp32", "weight_ptr": "*fp32",
        "temp_ptr": "*fp32", "stats_ptr": "*fp32", "part_ptr": "*fp32",
        "E": "i32", "C": "i32", "stride_ze": "i64", "stride_zb": "i64", "div_scale": "fp32",
    }
    bwd = {
        "z_ptr": None, "target_ptr": "*i64", "margin_ptr": "*fp32", "weight_ptr": "*fp32",
        "temp_ptr": "*fp32", "stats_ptr": "*fp32", "aux_ptr": "*fp32", "go_ptr": "*fp32", "g_ptr": None,
        "E": "i32", "B": "i32", "C": "i32", "stride_ze": "i64", "stride_zb": "i64",
        "stride_ge": "i64", "stride_gb": "i64", "div_scale": "fp32",
    }
    names = ["HAS_MARGIN", "HAS_WEIGHT", "HAS_TEMP", "DIV_MODE", "E_BLOCK", "BLOCK_C"]
    for dtype, div, vecs, (e_block, block_c) in itertools.product(
        ["fp32", "bf16", "fp16"], [0, 1, 2], [True, False], [(4, 512)]
    ):
        cx = dict(zip(names, [vecs, vecs, vecs, div, e_block, block_c]))
        build(ride_loss._ride_loss_fwd_kernel, dict(fwd, z_ptr="*" + dtype, **{n: "constexpr" for n in names}), cx, pick_num_warps(e_block * block_c))
        build(ride_loss._ride_loss_bwd_kernel, dict(bwd, z_ptr="*" + dtype, g_ptr="*" + dtype, **{n: "constexpr" for n in names}), cx, pick_num_warps(e_block * block_c))
    # E == 1 and B == 1 arrive as constexpr 1 (Triton specialises integer arguments equal to 1)
    for div in (0, 1):
        cx = dict(zip(names, [True, True, True, div, 1, 2048]), E=1)
        build(ride_loss._ride_loss_fwd_kernel, dict(fwd, z_ptr="*bf16", E="constexpr", **{n: "constexpr" for n in names}), cx, 8)
        build(ride_loss._ride_loss_bwd_kernel, dict(bwd, z_ptr="*bf16", g_ptr="*bf16", E="constexpr", B="constexpr", **{n: "constexpr" for n in names}), dict(cx, B=1), 8)
    build(ride_loss._ride_loss_finish_kernel,
          {"part_ptr": "*fp32", "loss_ptr": "*fp32", "aux_ptr": "*fp32", "B": "i32", "BLOCK": "constexpr"},
          {"BLOCK": 1024}, 4)
    print("compiled for sm_90")
    """
)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the gpu tests compile and run the kernels")
@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, f"compilation for sm_90 failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "compiled for sm_90" in result.stdout
