"""Traffic and time model of the fused RIDE loss (forward + backward) on a given GPU.

    python benchmarks/loss_traffic.py --gpu h200 [--json]

One row per case (B, E, C, dtype, mode): the DRAM bytes each kernel moves, the bytes the L2
serves, a predicted time and its fraction of the memory floor. Shape legend: E experts, B images,
C classes; Z = E B C itemsize, the logits (and the gradient) in bytes.

The floor of a loss with its gradient is reading the logits once and writing the gradient once:
floor_bytes = 2 Z, floor_us = floor_bytes / achievable DRAM bandwidth (a copy's). The kernels as
written (kernels/ride_loss.py):

    forward   one pass over the logits: reads Z from DRAM (loads marked evict_last); writes
              [B, 3, E] statistics and [B, 3] partial sums; its last program reduces them
    backward  one pass over the logits, rows in reverse order: the last rows the forward read are
              still in L2, min(Z, L2_REUSE * L2) bytes of the re-read hit there (gradient stores
              are evict_first, so they do not push those rows out); writes the gradient, Z
              bytes, once, already multiplied by grad_output

Per-class vectors (margins, weights and temperatures, 4 C bytes each) come from DRAM once; the
kernels read margins and weights at the row's target only, and the temperatures (phase 1) at every
class: those stay in each SM's L1 (every program of an SM reads the same C floats), one fill per SM
and kernel from L2. Each kernel's time is a
fixed cost (the gap between back-to-back kernels plus the first wave's ramp and the last one's
tail) plus the largest of: DRAM bytes / DRAM bandwidth, L2 bytes / L2 bandwidth, exponentials /
MUFU rate, other float instructions / FP32 rate (one per lane per clock, optimistic for
shuffles). The instruction counts per element are the compiler's (OPS_E4, from the kernels'
sm_90 PTX; the cases here all have E = 4); the bandwidths and rates are assumptions, not
measurements: a GPU run of benchmarks/test_bench_ride_loss.py checks them. The main loop's logit
loads and gradient stores are vector accesses whenever B C is a multiple of 16 elements (every case
here), whatever C is: each row's main loop starts at its first 16-element boundary.

Measured on an H200 (BENCHMARKS.md, "Measured on an H200"): the backward took the DRAM time of
reading and writing Z, without the L2 credit above; the forward took 2.3x (fp32) to 3.8x (bf16)
its modelled time at (512, 4, 8142), for a fixed latency a row (about 6-8 us) that this model
has no term for, paid once per wave of rows. The rows here are the design's prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

MB = 1e6


@dataclass(frozen=True)
class GPU:
    name: str
    dram_TBps: float  # peak HBM bandwidth
    l2_MB: float  # L2 size
    sms: int
    clock_GHz: float  # boost clock
    l2_TBps: float = 6.0  # L2 read+write bandwidth (assumed; GH100 at boost clock)
    dram_efficiency: float = 0.9  # what a copy achieves of the peak
    l2_reuse: float = 0.75  # share of the L2 that keeps the forward's last rows for the backward
    kernel_fixed_us: float = 1.0  # per kernel, back to back in a stream or a CUDA graph
    fp32_per_clock: int = 128  # FP32 lanes per SM
    mufu_per_clock: int = 16  # MUFU (ex2, lg2, rcp) per SM per clock

    @property
    def dram_Bps(self) -> float:
        return self.dram_TBps * 1e12 * self.dram_efficiency


GPUS = {
    "h100": GPU("H100 SXM", dram_TBps=3.35, l2_MB=50.0, sms=132, clock_GHz=1.98),
    "h200": GPU("H200", dram_TBps=4.8, l2_MB=50.0, sms=132, clock_GHz=1.98),
}

ITEMSIZE = {"float32": 4, "bfloat16": 2}
CASES = [(512, 4, 8142), (256, 4, 1000)]  # (B, E, C)
MODES = ("mean", "pairwise")


#: (MUFU, other float instructions) per logit in the main loop of each kernel at E = 4, as the
#: sm_90 compiler emits them: the mufu_per_element / alu_per_element columns of
#: `python -m ride_fast_kernels.report --arch sm_90 --experts 4` (a test keeps them in step).
OPS_E4 = {
    ("fwd", "float32", "mean", 0): (1.0, 9.0), ("bwd", "float32", "mean", 0): (1.25, 6.0),
    ("fwd", "float32", "mean", 1): (2.0, 15.06), ("bwd", "float32", "mean", 1): (2.25, 10.31),
    ("fwd", "bfloat16", "mean", 0): (1.0, 10.0), ("bwd", "bfloat16", "mean", 0): (1.25, 7.5),
    ("fwd", "bfloat16", "mean", 1): (2.0, 16.06), ("bwd", "bfloat16", "mean", 1): (2.25, 11.81),
    ("fwd", "float32", "pairwise", 0): (1.0, 8.25), ("bwd", "float32", "pairwise", 0): (1.0, 9.25),
    ("fwd", "float32", "pairwise", 1): (2.0, 14.81), ("bwd", "float32", "pairwise", 1): (2.0, 13.06),
    ("fwd", "bfloat16", "pairwise", 0): (1.0, 9.25), ("bwd", "bfloat16", "pairwise", 0): (1.0, 10.75),
    ("fwd", "bfloat16", "pairwise", 1): (2.0, 15.81), ("bwd", "bfloat16", "pairwise", 1): (2.0, 14.56),
}


def ops_per_element(kernel: str, dtype: str, mode: str, phase: int) -> tuple[float, float]:
    """(MUFU, other float instructions) per logit of one kernel (see OPS_E4)."""
    return OPS_E4[(kernel, dtype, mode, phase)]


def kernel_time_us(gpu: GPU, dram_bytes: float, l2_bytes: float, elements: float, exps: float, other: float) -> dict:
    parts = {
        "dram_us": dram_bytes / gpu.dram_Bps * 1e6,
        "l2_us": l2_bytes / (gpu.l2_TBps * 1e12) * 1e6,
        "mufu_us": elements * exps / (gpu.sms * gpu.mufu_per_clock * gpu.clock_GHz * 1e9) * 1e6,
        "fp32_us": elements * other / (gpu.sms * gpu.fp32_per_clock * gpu.clock_GHz * 1e9) * 1e6,
    }
    bound = max(parts, key=parts.get)
    return {"us": gpu.kernel_fixed_us + parts[bound], "bound": bound[:-3], **parts}


def model(B: int, E: int, C: int, dtype: str, mode: str, gpu: GPU, phase: int = 1) -> dict:
    """One case: bytes per kernel, predicted time and fraction of the floor (see the docstring)."""
    s = ITEMSIZE[dtype]
    Z = E * B * C * s
    elements = E * B * C
    vectors = (3 if phase == 1 else 1) * 4 * C  # margins (+ weights, temperatures) from DRAM once
    l1_fill = (1 if phase == 1 else 0) * 4 * C * gpu.sms  # temperatures into every SM's L1 (margins, weights: gathered at y)
    small_in = B * 8 + B * 4 * 2  # targets, gathered margin and weight per row
    stats = B * 3 * E * 4 + B * 3 * 4 + 8  # statistics, partial sums, loss and weight sum

    reuse = min(Z, gpu.l2_reuse * gpu.l2_MB * MB)
    fwd_dram = Z + vectors + small_in + stats + B * 3 * 4  # + the last program's read of the partial sums
    fwd_l2 = fwd_dram + l1_fill
    bwd_dram = (Z - reuse) + vectors + small_in + stats + Z
    bwd_l2 = Z + Z + vectors + small_in + stats + l1_fill
    fwd = kernel_time_us(gpu, fwd_dram, fwd_l2, elements, *ops_per_element("fwd", dtype, mode, phase))
    bwd = kernel_time_us(gpu, bwd_dram, bwd_l2, elements, *ops_per_element("bwd", dtype, mode, phase))

    floor_bytes = 2 * Z
    floor_us = floor_bytes / gpu.dram_Bps * 1e6
    total = fwd_dram + bwd_dram
    predicted = fwd["us"] + bwd["us"]
    return {
        "gpu": gpu.name,
        "B": B,
        "E": E,
        "C": C,
        "dtype": dtype,
        "mode": mode,
        "phase": phase,
        "bytes": int(total),
        "floor_bytes": int(floor_bytes),
        "traffic_ratio": round(total / floor_bytes, 4),
        "l2_reuse_bytes": int(reuse),
        "fwd_bytes": int(fwd_dram),
        "bwd_bytes": int(bwd_dram),
        "fwd_us": round(fwd["us"], 2),
        "bwd_us": round(bwd["us"], 2),
        "fwd_bound": fwd["bound"],
        "bwd_bound": bwd["bound"],
        "floor_us": round(floor_us, 2),
        "predicted_us": round(predicted, 2),
        "fraction_of_floor": round(floor_us / predicted, 4),
    }


def rows(gpu: GPU, phases=(1,)) -> list[dict]:
    return [model(B, E, C, dtype, mode, gpu, phase) for (B, E, C) in CASES for dtype in ITEMSIZE for mode in MODES for phase in phases]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one row per case")
    parser.add_argument("--phase", choices=["0", "1", "both"], default="1",
                        help="DRW phase: 0 (T = 1, shared exponentials), 1 (weights and temperatures; the default, the dearer one)")
    args = parser.parse_args(argv)
    phases = (0, 1) if args.phase == "both" else (int(args.phase),)
    out = rows(GPUS[args.gpu], phases)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    cols = ["B", "E", "C", "dtype", "mode", "phase", "bytes", "floor_bytes", "traffic_ratio", "fwd_bound", "bwd_bound", "predicted_us", "floor_us", "fraction_of_floor"]
    print(f"{GPUS[args.gpu].name}")
    print("  ".join(f"{c:>13}" for c in cols))
    for r in out:
        print("  ".join(f"{str(r[c]):>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
