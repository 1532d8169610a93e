"""The Triton kernels compile for an H100 / H200 (sm_90) on a machine without a GPU, within the
design's register budget, without spills, with vector loads and stores in the main loop.

The CPU tests run the kernels through the interpreter, which accepts code the real compiler would
reject. These tests compile them ahead of time (Triton front end, LLVM, and the ptxas bundled with
the triton wheel; no driver needed) in a subprocess without TRITON_INTERPRET, through
`ride_fast_kernels.report` on a representative subset of its variants (every dtype, both modes,
both DRW phases, E = 1, 3, 4, 5, 8); `python -m ride_fast_kernels.report --arch sm_90` prints the
full matrix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SUBSET = [(1, "mean", "bf16", 0), (3, "pairwise", "fp16", 1), (4, "mean", "fp32", 1), (4, "pairwise", "bf16", 0),
          (5, "pairwise", "fp16", 1), (8, "pairwise", "fp32", 1), (8, "mean", "bf16", 1)]

#: The design's register budget (maxnreg) and warps per program: float32 tiles of up to 4 experts
#: run four 8-warp programs an SM (64 registers), 2-byte ones three (72), 5 to 8 experts four
#: 4-warp programs (128).
BUDGET = {("fp32", False): (64, 8), ("bf16", False): (72, 8), ("fp16", False): (72, 8),
          ("fp32", True): (128, 4), ("bf16", True): (128, 4), ("fp16", True): (128, 4)}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ride_fast_kernels import report, ride_loss
    rows = []
    for E, mode, dtype, phase in json.loads(sys.argv[1]):
        rows += report.variant_rows(E, mode, dtype, phase, "sm_90", classes=8142, padded=True)
    # B == 1 and E == 1 arrive as constexpr 1 (Triton specialises integer arguments equal to 1)
    sig = dict(report._BWD, z_ptr="*bf16", g_ptr="*bf16", E="constexpr", B="constexpr", **{n: "constexpr" for n in report._CONSTEXPRS})
    cx = dict(zip(report._CONSTEXPRS, [True, True, True, 1, 1, 256, 4]), E=1, B=1)
    report._compile(ride_loss._ride_loss_bwd_kernel, sig, cx, 8, "sm_90", report._PTR_ARGS, ride_loss.register_budget(1, 2))
    print(json.dumps({"rows": rows}))
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
def test_kernels_compile_for_sm90_within_budget():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(SUBSET)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, f"compilation for sm_90 failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    out = json.loads(result.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert len(rows) == 2 * len(SUBSET)
    for row in rows:
        where = f"{row['kernel']} {row['variant']}"
        E, _, dtype, _ = row["variant"].split("-")
        budget, warps = BUDGET[dtype, int(E[1:]) > 4]
        assert row["spills"] == 0, f"{where} spills {row['spills']} bytes"
        assert row["register_budget"] == budget and row["num_warps"] == warps, where
        assert row["registers"] <= budget, f"{where} uses {row['registers']} registers > {budget}"
        assert row["shared_bytes"] <= 8192, f"{where} uses {row['shared_bytes']} bytes of shared memory"
        # a class stride padded to 16: every logit load (and gradient store) of the main loop is one
        # thread's V classes of an expert in one access, 16 bytes of float32 and 8 of 2-byte logits
        # (V = 4 classes a thread and expert up to 8 experts)
        width = {"fp32": 16, "bf16": 8, "fp16": 8}[dtype]
        assert row["logit_loads"] == width, f"{where}: main-loop logit loads {row['logit_loads']} bytes, not {width}"
        assert row["vectorised"] == (width >= 8), where
        if row["kernel"] == "bwd":
            assert row["grad_stores"] == width, f"{where}: main-loop gradient stores {row['grad_stores']} bytes"


@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_report_cli_rejects_bad_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "ride_fast_kernels.report", "--modes", "max"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 2 and "--modes: unknown ['max']" in result.stderr
