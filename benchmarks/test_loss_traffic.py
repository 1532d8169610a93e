"""The traffic model of the fused RIDE loss (benchmarks/loss_traffic.py): its arithmetic on a
hand-computed case, and what it predicts for the kernels as written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import loss_traffic as lt
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# a GPU with round numbers: 1 TB/s DRAM at full efficiency, nothing else limits, no fixed cost
TOY = lt.GPU("toy", dram_TBps=1.0, l2_MB=10.0, sms=1, clock_GHz=1e9, l2_TBps=1e9, dram_efficiency=1.0,
             l2_reuse=0.5, kernel_fixed_us=0.0, fp32_per_clock=1, mufu_per_clock=1)


def test_hand_computed_case():
    # B = 100, E = 2, C = 1000, float32, phase 1: Z = 2 * 100 * 1000 * 4 = 800,000 bytes.
    # forward:  Z + vectors 3 * 4 * 1000 + targets and gathers 100 * (8 + 8)
    #           + statistics 100 * 3 * 2 * 4 + partial sums 100 * 12 + 8, + the partial sums read back
    #           = 800000 + 12000 + 1600 + 3608 + 1200 = 818,408
    # backward: the re-read hits L2 (Z <= 0.5 * 10 MB): 12000 + 1600 + 3608 + the gradient 800000
    #           = 817,208
    row = lt.model(100, 2, 1000, "float32", "mean", TOY, phase=1)
    assert row["fwd_bytes"] == 818_408 and row["bwd_bytes"] == 817_208
    assert row["bytes"] == 1_635_616 and row["floor_bytes"] == 1_600_000
    assert row["predicted_us"] == pytest.approx(1.64, abs=0.01)  # bytes / 1 TB/s
    assert row["fraction_of_floor"] == pytest.approx(1.6 / 1.635616, abs=1e-3)
    # an L2 of 1 MB keeps 0.5 MB of the 0.8 MB: the backward reads the other 300,000 bytes again
    small_l2 = lt.model(100, 2, 1000, "float32", "mean", replace(TOY, l2_MB=1.0), phase=1)
    assert small_l2["bytes"] == 1_635_616 + 300_000
    # a fixed cost per kernel adds to the time, not to the bytes
    fixed = lt.model(100, 2, 1000, "float32", "mean", replace(TOY, kernel_fixed_us=1.0), phase=1)
    assert fixed["bytes"] == row["bytes"] and fixed["predicted_us"] == pytest.approx(row["predicted_us"] + 2.0, abs=0.01)


@pytest.mark.parametrize("gpu", sorted(lt.GPUS))
def test_traffic_within_1_3_of_the_floor(gpu):
    for row in lt.rows(lt.GPUS[gpu], phases=(0, 1)):
        assert row["traffic_ratio"] <= 1.3, row


@pytest.mark.parametrize("gpu", sorted(lt.GPUS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["mean", "pairwise"])
@pytest.mark.parametrize("phase", [0, 1])
def test_kernel_as_written_predicted_at_least_70_percent_of_the_floor(gpu, dtype, mode, phase):
    """At (512, 4, 8142). At (256, 4, 1000) the floor is 1-2 us, the order of one kernel's fixed
    cost: no two-kernel design gets near it there (the model prints those rows too)."""
    row = lt.model(512, 4, 8142, dtype, mode, lt.GPUS[gpu], phase)
    assert row["fraction_of_floor"] >= 0.70, row


def test_cli_json():
    out = subprocess.run([sys.executable, os.path.join(HERE, "loss_traffic.py"), "--gpu", "h200", "--json"],
                         capture_output=True, text=True, check=True, timeout=60)
    rows = json.loads(out.stdout)
    assert len(rows) == 2 * 2 * 2  # cases x dtypes x modes
    for row in rows:
        assert {"B", "E", "C", "dtype", "mode", "bytes", "floor_bytes", "predicted_us", "fraction_of_floor"} <= set(row)
        assert row["dtype"] in ("float32", "bfloat16") and row["mode"] in ("mean", "pairwise")
    assert {(r["B"], r["E"], r["C"]) for r in rows} == {(512, 4, 8142), (256, 4, 1000)}


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_instruction_counts_are_the_compilers():
    """OPS_E4 holds what the sm_90 compiler emits (two variants checked, ~1 s of compiling)."""
    script = textwrap.dedent(
        """
        import json
        from ride_fast_kernels import report
        rows = report.variant_rows(4, "pairwise", "bf16", 1) + report.variant_rows(4, "mean", "fp32", 0)
        print(json.dumps(rows))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dtypes = {"bf16": "bfloat16", "fp32": "float32"}
    for row in json.loads(out.stdout.strip().splitlines()[-1]):
        E, mode, dtype, phase = row["variant"].split("-")
        key = (row["kernel"], dtypes[dtype], mode, int(phase[-1]))
        assert lt.OPS_E4[key] == pytest.approx((row["mufu_per_element"], row["alu_per_element"]), abs=0.05), key
