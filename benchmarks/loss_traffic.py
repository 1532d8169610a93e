"""Traffic and time model of the fused RIDE loss (forward + backward) on a given GPU, calibrated
on an H200's kernel times.

    python benchmarks/loss_traffic.py --gpu h200 [--json] [--phase 0|1|both]
                                      [--design product|two_kernel|grad_in_forward] [--stages 1|2]
                                      [--max-registers 64] [--programs-per-sm N]
    python benchmarks/loss_traffic.py --gpu h200 --compare [--json]   (every design, side by side)
    python benchmarks/loss_traffic.py --fit MEASURED   (a JSON of kernel times, with the compiler's counts of
                                                    the kernels timed where they have changed since:
                                                    benchmarks/results/loss_traffic/; or a GPU check's rows.jsonl)

One row per case (B, E, C, dtype, mode): the DRAM bytes each kernel moves, a predicted time for
each kernel and the fused loss's fraction of the memory floor. Shape legend: E experts, B images
(rows), C classes; Z = E B C itemsize, the logits (and the gradient) in bytes.

The floor of a loss with its gradient is reading the logits once and writing the gradient once:
floor_bytes = 2 Z, floor_us = floor_bytes / copy bandwidth (measured on an H200: 4.23 TB/s, 0.88
of the peak; the H100 SXM is given the same share of its 3.35 TB/s).

Designs (kernels/ride_loss.py); the CLI's default, "product", is the one the fused loss runs
(PRODUCT_DESIGN). "grad_in_forward", what it runs for float32 and bfloat16 logits of 4 experts (an
eager or captured step; at 64 registers, float32 "pairwise" with temperatures in the narrow tile
of 2 classes a thread, BLOCK_C 512, in both designs: NARROW): each forward
program reads its row (pass 1), then reads it again (pass 2) and writes its gradient; the backward
kernel reads grad_output and returns (grad_output = 1, the usual case: its fixed cost and one
round trip).
Pass 2 finds the row in L2 when the rows every program in flight reads meanwhile fit in the L2's
effective share (l2_effective x 50 MB; assumed 0.6: a row read and re-read by one SM is cached in
that SM's L2 partition, and the gradient's stores pass through the L2 too); beyond it the missing
share (1 - capacity / bytes in flight) comes from DRAM. "two_kernel", the kernels as first
written, which the fused loss runs for float16 logits, for 5 to 8 experts and under
torch.compile: the forward reads Z and keeps per-row statistics, its last program sums the rows;
the backward reads Z again and writes the gradient, Z bytes. The backward's re-read gets nothing
from the L2 (its measured time is DRAM's for 2 Z): DRAM traffic 3 Z, 1.5 times the floor. Each
design takes the launch options of the kernels: `stages` (2: the next tile's loads issued before
the current tile's arithmetic) and `max_registers` (64: four programs an SM instead of three),
and `programs_per_sm` caps the programs an SM runs (a launch reserving shared memory would), to
fit pass 2 in the L2.

Time. A program streams one row in tiles of E_BLOCK x 1024 logits (16 KB float32, 8 KB bfloat16;
ceil(C / 1024) a row, a masked one included; E_BLOCK x 512 in the NARROW tile). An SM holds
registers_per_sm / (registers x 256 threads) programs (3 at 72 registers, 4 at 64), so B rows run
in waves of SMs x that many programs, one after the other. A wave of n programs, k on the busiest SM, takes a tile every

    max( max(c, (L + c) / stages)   Little's law: `stages` tiles in flight a program, each
                                    waiting the latency L (DRAM's, or the L2's where pass 2 hits)
                                    plus the program's own arithmetic c (its tile's SASS
                                    instructions at the SM's issue rate: no overlap with its
                                    loads at stages = 1),
         n x DRAM bytes of a tile / copy bandwidth,   the wave's share of DRAM,
         n x L2 bytes of a tile / L2 bandwidth,       and of the L2,
         k x c,                                       the SM's instruction issue,
         k x MUFU operations of a tile / MUFU rate )  and its MUFU,

and a kernel takes fixed + sum over waves (chain + tiles x that time). `chain` is a program's
fixed latency (the target's gathers, the masked tail and head, the cross-thread reductions, the
statistics' stores and the forward's atomic ticket), paid once a wave; `fixed` is the kernel's own
(launch, ramp, the forward's last program's sum over rows). A grad_in_forward program pays both
kernels' chains and runs both passes' instructions. Per-class vectors and per-row statistics are counted
in the bytes, their time is in the chains. SASS counts, MUFU counts and registers are the sm_90
compiler's for E = 4 (KERNELS_E4, GRAD_IN_FORWARD_E4, OPS_E4; the slow tests recount some of
them): E up to 4 only.

Calibration (H200, the GPU fields; `--fit` redoes it): L, both chains and both fixed costs,
fitted to the 12 profiler kernel times of the kernels as written (phase 1; (512, 4, 8142) both
dtypes and modes, (256, 4, 1000) both dtypes, mean; benchmarks/results/loss_traffic/) by least
largest relative error: L = 0.75 us, forward chain 7.8 us and fixed 0.35 us, backward chain 0 and
fixed 2.25 us. Every kernel time is within 8.8 % (the bf16 pairwise backward and the fp32
(256, 4, 1000) backward the worst; test_loss_traffic.py holds them to 15 %). Read that way, the
backward streams at DRAM's rate (the mean one runs 512 rows in one wave at 62-64 registers, the
pairwise one in two at 71-72, the second latency-bound); the forward's first wave streams at
DRAM's rate in float32 and at about the SM's issue rate in bfloat16, its second (116 rows, one program
an SM) at Little's rate, and each wave pays the 7.8 us chain: 16 of its 37 us at (512, 4, 8142).
The chains are fitted, not counted: three dependent DRAM round trips, seven block reductions and
the ticket come to some 5 us for the forward and 1-2 us for the backward, whose second wave is
cheaper than the model has it (its chain fits at 0). The forward timed then crossed its warps at
27 barriers at the end of every row and 9 more in its last program (sm_90, phase 1, E = 4); it
now needs 9 and 3 (two reductions for all of a row's running values, the head read with the
tail, one reduction for the sum over the rows: the report's `barriers` column), and the model
keeps the fitted chain until a GPU times it again. The H100 SXM gets the same latency, chains
and fixed costs with its own bandwidth.

How far to trust a variant (--compare; the names are the GPU check's, "2sm" a model-only cap):
refitting with L from 0.6 to 1.0 us (the chains refitted, errors 10-16 %) moves a setting's
fraction of the floor by 0.02 at most (0.035 for gradfwd-stages2-2sm), so what is uncertain is
what the fit cannot see.
stages=2 and max_registers=64 keep to terms the fit constrained (waves, Little's rate, the issue
rate), on the assumption that the chains stay the same with four programs an SM: within 20 % is
likely (the phase-1 bf16 pairwise forward spills 32 bytes with both). grad_in_forward rests
on assumptions no measurement has checked: the L2's effective share, the hit share past it (linear
here: the second pass reads each row from its end, so a least-recently-used L2 still holds the
last-read part of every row in flight; a re-read from the row's start would evict each block just
before its turn, a cliff that would take float32 at four programs an SM from 0.61 of the floor to
0.54, level with regs64, and an L2 that is not LRU lies between), the L2's latency and
bandwidth (5 TB/s instead of 6 takes 0.01-0.04 off); its predictions are good to 30 % at best.
Its fused kernel compiles without spills at the defaults and spills up to 272 bytes with stages=2
or at 64 registers, outside its main loops (the report's loop_spills), which the model charges
only as the spills' instructions in the SASS count.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace

MB = 1e6


@dataclass(frozen=True)
class GPU:
    name: str
    dram_TBps: float  # peak HBM bandwidth
    l2_MB: float  # L2 size
    sms: int
    clock_GHz: float  # boost clock
    dram_efficiency: float = 0.88  # what a copy achieves of the peak (H200: 4.23 of 4.8 TB/s, measured)
    l2_TBps: float = 6.0  # L2 read + write bandwidth (assumed; GH100 at boost clock)
    issue_per_clock: int = 4  # warp instructions an SM issues a clock (four schedulers)
    mufu_per_clock: int = 16  # MUFU (ex2, lg2, rcp) per SM per clock
    registers_per_sm: int = 65536
    # calibration: fitted on an H200 (see the module docstring), except where marked assumed
    dram_latency_us: float = 0.75  # L: a tile's DRAM round trip at the loads of these kernels
    l2_latency_us: float = 0.3  # a tile's round trip when the L2 holds it (assumed)
    l2_effective: float = 0.6  # share of the L2 that keeps a row between grad_in_forward's passes (assumed)
    fwd_chain_us: float = 7.8  # a forward program's fixed latency, paid once a wave
    fwd_fixed_us: float = 0.35  # the forward kernel's own: launch, ramp, the last program's sum
    bwd_chain_us: float = 0.0  # a backward program's fixed latency, paid once a wave
    bwd_fixed_us: float = 2.25  # the backward kernel's own: launch, ramp, the gradient's drain

    @property
    def dram_Bps(self) -> float:
        return self.dram_TBps * 1e12 * self.dram_efficiency

    @property
    def clock_per_us(self) -> float:
        return self.clock_GHz * 1e3


GPUS = {
    "h100": GPU("H100 SXM", dram_TBps=3.35, l2_MB=50.0, sms=132, clock_GHz=1.98),
    "h200": GPU("H200", dram_TBps=4.8, l2_MB=50.0, sms=132, clock_GHz=1.98),
}

ITEMSIZE = {"float32": 4, "bfloat16": 2}
CASES = [(512, 4, 8142), (256, 4, 1000)]  # (B, E, C)
MODES = ("mean", "pairwise")
DESIGNS = ("two_kernel", "grad_in_forward")
#: the design the fused loss runs for the modelled cases (float32 and bfloat16 logits of 4 experts,
#: the gradient wanted: `ride_fast_kernels._utils.loss_design`), at its launcher's register budget:
#: design="product", the CLI's default
PRODUCT_DESIGN = "grad_in_forward"

#: the kernels' geometry up to 4 experts (kernels/_utils.pick_tile): 8-warp programs, a tile of
#: E_BLOCK x BLOCK_C logits, 4 classes a thread (16 logits a thread at E = 4); the narrow tile of
#: float32 "pairwise" with temperatures (the DRW phase here; `ride_loss.narrow_tile`) has 2 classes
#: a thread, BLOCK_C 512 (8 logits a thread)
WARPS = 8
BLOCK_C = 1024
NARROW = {("float32", "pairwise", 1)}

#: (MUFU, other float instructions) per logit in the main loop of each kernel at E = 4, as the
#: sm_90 compiler emits them: the mufu_per_element / alu_per_element columns of
#: `python -m ride_fast_kernels.report --arch sm_90 --experts 4` (a test keeps them in step).
OPS_E4 = {
    ("fwd", "float32", "mean", 0): (1.0, 9.0), ("bwd", "float32", "mean", 0): (1.25, 6.0),
    ("fwd", "float32", "mean", 1): (2.0, 15.06), ("bwd", "float32", "mean", 1): (2.25, 10.31),
    ("fwd", "bfloat16", "mean", 0): (1.0, 10.0), ("bwd", "bfloat16", "mean", 0): (1.25, 7.5),
    ("fwd", "bfloat16", "mean", 1): (2.0, 16.06), ("bwd", "bfloat16", "mean", 1): (2.25, 11.81),
    ("fwd", "float32", "pairwise", 0): (1.0, 8.25), ("bwd", "float32", "pairwise", 0): (1.0, 9.25),
    ("fwd", "float32", "pairwise", 1): (2.0, 17.12), ("bwd", "float32", "pairwise", 1): (2.0, 13.38),
    ("fwd", "bfloat16", "pairwise", 0): (1.0, 9.25), ("bwd", "bfloat16", "pairwise", 0): (1.0, 10.75),
    ("fwd", "bfloat16", "pairwise", 1): (2.0, 15.81), ("bwd", "bfloat16", "pairwise", 1): (2.0, 14.56),
}

#: The sm_90 compiler's kernels at E = 4, for each launch setting in TUNINGS: (registers a thread,
#: spill bytes, SASS instructions of the main loop a thread: one tile, 16 logits, 8 in the NARROW
#: tile). Registers from `ptxas -v`, SASS from nvdisasm of the cubin (the loop with the logits'
#: vector accesses); test_loss_traffic.py recounts some of them.
TUNINGS = ((1, None), (2, None), (1, 64), (2, 64))  # (stages, max_registers)
KERNELS_E4 = {
    ("fwd", "float32", "mean", 0): ((64, 0, 225), (62, 0, 234), (56, 0, 228), (60, 0, 235)),
    ("fwd", "float32", "mean", 1): ((72, 0, 350), (72, 0, 363), (64, 0, 351), (64, 0, 363)),
    ("fwd", "float32", "pairwise", 0): ((64, 0, 204), (66, 0, 208), (61, 0, 204), (64, 0, 208)),
    ("fwd", "float32", "pairwise", 1): ((64, 0, 211), (61, 0, 225), (64, 0, 211), (61, 0, 225)),
    ("fwd", "bfloat16", "mean", 0): ((63, 0, 246), (64, 0, 259), (56, 0, 249), (59, 0, 260)),
    ("fwd", "bfloat16", "mean", 1): ((71, 0, 377), (72, 0, 394), (64, 0, 378), (64, 0, 394)),
    ("fwd", "bfloat16", "pairwise", 0): ((69, 0, 225), (71, 0, 232), (63, 0, 225), (64, 0, 232)),
    ("fwd", "bfloat16", "pairwise", 1): ((71, 0, 358), (72, 0, 374), (64, 0, 358), (64, 32, 377)),
    ("bwd", "float32", "mean", 0): ((55, 0, 179), (56, 0, 192), (56, 0, 189), (56, 0, 200)),
    ("bwd", "float32", "mean", 1): ((62, 0, 254), (62, 0, 263), (59, 0, 258), (60, 0, 275)),
    ("bwd", "float32", "pairwise", 0): ((59, 0, 251), (64, 0, 259), (56, 0, 241), (61, 0, 259)),
    ("bwd", "float32", "pairwise", 1): ((55, 0, 173), (56, 0, 185), (55, 0, 173), (56, 0, 185)),
    ("bwd", "bfloat16", "mean", 0): ((53, 0, 214), (56, 0, 224), (56, 0, 217), (56, 0, 233)),
    ("bwd", "bfloat16", "mean", 1): ((62, 0, 287), (64, 0, 316), (62, 0, 297), (60, 0, 315)),
    ("bwd", "bfloat16", "pairwise", 0): ((56, 0, 272), (59, 0, 284), (56, 0, 271), (60, 0, 291)),
    ("bwd", "bfloat16", "pairwise", 1): ((72, 0, 342), (72, 0, 369), (64, 0, 348), (64, 0, 366)),
}
#: The forward kernel that also writes the gradient (grad_in_forward: WRITE_GRAD), the same way:
#: (registers, spill bytes, SASS a thread of pass 1's main loop, of pass 2's) for each of TUNINGS,
#: as the fused loss launches it: with DRW weights (phase 1) summing the divisor itself, and
#: max_registers None at its launcher's budget (`register_budget`: 64; float32 "pairwise" with
#: temperatures in the NARROW tile).
GRAD_IN_FORWARD_E4 = {
    ("float32", "mean", 0): ((62, 0, 223, 202), (64, 0, 230, 211), (62, 0, 223, 202), (64, 0, 230, 211)),
    ("float32", "mean", 1): ((64, 0, 348, 271), (64, 0, 363, 282), (64, 0, 348, 271), (64, 0, 363, 282)),
    ("float32", "pairwise", 0): ((64, 0, 199, 247), (64, 0, 205, 263), (64, 0, 199, 247), (64, 0, 205, 263)),
    ("float32", "pairwise", 1): ((64, 0, 209, 198), (64, 0, 225, 198), (64, 0, 209, 198), (64, 0, 225, 198)),
    ("bfloat16", "mean", 0): ((64, 0, 243, 221), (64, 0, 254, 246), (64, 0, 243, 221), (64, 0, 254, 246)),
    ("bfloat16", "mean", 1): ((64, 0, 375, 306), (64, 0, 392, 321), (64, 0, 375, 306), (64, 0, 392, 321)),
    ("bfloat16", "pairwise", 0): ((64, 0, 218, 274), (64, 8, 229, 289), (64, 0, 218, 274), (64, 8, 229, 289)),
    ("bfloat16", "pairwise", 1): ((64, 0, 360, 349), (64, 84, 377, 359), (64, 0, 360, 349), (64, 84, 377, 359)),
}
LOGITS_A_THREAD = 16  # of a main-loop tile at E = 4 (8 in the NARROW tile): the SASS counts above

#: the settings --compare prints, named as the GPU check's kernel variants (benchmarks/gpu_steps.py)
SETTINGS = {
    "default": {},
    "stages2": {"stages": 2},
    "regs64": {"max_registers": 64},
    "stages2-regs64": {"stages": 2, "max_registers": 64},
    "gradfwd": {"design": "grad_in_forward"},
    "gradfwd-stages2": {"design": "grad_in_forward", "stages": 2},
    "gradfwd-regs64": {"design": "grad_in_forward", "max_registers": 64},
    "gradfwd-2sm": {"design": "grad_in_forward", "programs_per_sm": 2},
    "gradfwd-stages2-2sm": {"design": "grad_in_forward", "stages": 2, "programs_per_sm": 2},
    "gradfwd-stages2-regs64": {"design": "grad_in_forward", "stages": 2, "max_registers": 64},
}


def ops_per_element(kernel: str, dtype: str, mode: str, phase: int) -> tuple[float, float]:
    """(MUFU, other float instructions) per logit of one kernel (see OPS_E4)."""
    return OPS_E4[(kernel, dtype, mode, phase)]


def compiled(kernel: str, dtype: str, mode: str, phase: int, stages: int = 1, max_registers: int | None = None,
             counts: dict | None = None) -> dict:
    """registers, spill bytes, and SASS instructions and MUFU operations per logit of each main
    loop (a list: one a pass) of one kernel: "fwd", "bwd" or "fwdgrad" (KERNELS_E4,
    GRAD_IN_FORWARD_E4, OPS_E4; the forward's MUFU count serves pass 1, the backward's pass 2).
    `counts` ({(kernel, dtype, mode): (registers, spills, SASS)}, phase 1 at the default launch:
    `load_counts`) stands in for KERNELS_E4 where it has the kernel: the kernels a measurement
    timed, when they are not the ones compiled today (all of them in the 4-class tile).
    block_c: the classes a tile covers (NARROW: 512)."""
    if (stages, max_registers) not in TUNINGS:
        raise ValueError(f"(stages, max_registers) = {(stages, max_registers)} not modelled; one of {TUNINGS}")
    i = TUNINGS.index((stages, max_registers))
    block_c = BLOCK_C // 2 if (dtype, mode, phase) in NARROW else BLOCK_C
    if kernel == "fwdgrad":
        regs, spills, *sass = GRAD_IN_FORWARD_E4[(dtype, mode, phase)][i]
        mufu = [ops_per_element(k, dtype, mode, phase)[0] for k in ("fwd", "bwd")]
    else:
        regs, spills, *sass = KERNELS_E4[(kernel, dtype, mode, phase)][i]
        if counts and phase == 1 and i == 0 and (kernel, dtype, mode) in counts:
            regs, spills, *sass = counts[(kernel, dtype, mode)]
            block_c = BLOCK_C
        mufu = [ops_per_element(kernel, dtype, mode, phase)[0]]
    logits = LOGITS_A_THREAD * block_c // BLOCK_C
    return {"registers": regs, "spills": spills, "sass": [n / logits for n in sass], "mufu": mufu, "block_c": block_c}


def programs_per_sm(gpu: GPU, registers: int, cap: int | None = None) -> int:
    """Programs an SM holds: registers are allocated 8 a thread at a time; at most 64 warps an SM."""
    n = min(gpu.registers_per_sm // (8 * math.ceil(registers / 8) * 32 * WARPS), 64 // WARPS)
    return max(1, min(n, cap) if cap else n)


def waves(B: int, per_wave: int) -> list[int]:
    """Programs in each wave: full waves, then the rest."""
    return [per_wave] * (B // per_wave) + ([B % per_wave] if B % per_wave else [])


def tile_us(gpu: GPU, n: int, k: int, warp_instr: float, mufu_ops: float, dram_bytes: float, l2_bytes: float,
            latency_us: float, stages: int) -> tuple[float, str]:
    """(time a tile, what bounds it) for a wave of n programs, k on the busiest SM (see the
    module docstring)."""
    c = warp_instr / (gpu.issue_per_clock * gpu.clock_per_us)
    parts = {
        "latency": max(c, (latency_us + c) / stages),
        "dram": n * dram_bytes / gpu.dram_Bps * 1e6,
        "l2": n * l2_bytes / (gpu.l2_TBps * 1e12) * 1e6,
        "issue": k * c,
        "mufu": k * mufu_ops / (gpu.mufu_per_clock * gpu.clock_per_us),
    }
    bound = max(parts, key=parts.get)
    return parts[bound], bound


def l2_hit(gpu: GPU, n: int, row_bytes: float) -> float:
    """Share of grad_in_forward's pass-2 re-read the L2 serves: all of it while the rows of the n
    programs in flight fit its effective share, capacity / bytes in flight beyond."""
    return min(1.0, gpu.l2_effective * gpu.l2_MB * MB / (n * row_bytes))


def _predict(B: int, E: int, C: int, dtype: str, mode: str, gpu: GPU, phase: int = 1, design: str = "two_kernel",
             stages: int = 1, max_registers: int | None = None, programs_per_sm_cap: int | None = None,
             counts: dict | None = None) -> dict:
    """Unrounded prediction of one case (model() formats it; `counts`: see `compiled`)."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if not 1 <= E <= 4:
        raise ValueError(f"E = {E}: the model holds the compiler's counts of the 8-warp kernels of up to 4 experts")
    s = ITEMSIZE[dtype]
    e_block = 1 << (E - 1).bit_length()
    Z = E * B * C * s
    row_bytes = E * C * s

    def passes(kernel, kinds):
        k = compiled(kernel, dtype, mode, phase, stages, max_registers, counts)
        slots = e_block * k["block_c"]  # logits a tile's threads hold: masked and padded ones issue too
        # (warp instructions, MUFU operations) a tile, and the pass's traffic
        return k, [((sass * slots / 32, mufu * slots), kind) for sass, mufu, kind in zip(k["sass"], k["mufu"], kinds)]

    L, L2 = gpu.dram_latency_us, gpu.l2_latency_us

    def kernel(fixed, chain, compiled_kernel, passes):
        tiles = math.ceil(C / compiled_kernel["block_c"])
        tile_bytes = row_bytes / tiles  # what a tile reads (and the backward writes)
        pps = programs_per_sm(gpu, compiled_kernel["registers"], programs_per_sm_cap)
        total, bounds, dram, served = fixed, [], 0.0, 0.0
        for n in waves(B, gpu.sms * pps):
            k = math.ceil(n / gpu.sms)
            total += chain
            wave_bounds = []
            for (instr, mufu), kind in passes:
                if kind == "read":
                    d, l2b, lat, hit = tile_bytes, tile_bytes, L, 0.0
                elif kind == "read+write":
                    d, l2b, lat, hit = 2 * tile_bytes, 2 * tile_bytes, L, 0.0
                else:  # "reread+write": grad_in_forward's pass 2
                    hit = l2_hit(gpu, n, row_bytes)
                    d, l2b, lat = tile_bytes * (2 - hit), 2 * tile_bytes, (L2 if hit >= 1.0 else L)
                t, bound = tile_us(gpu, n, k, instr, mufu, d, l2b, lat, stages)
                total += tiles * t
                dram += n * tiles * d
                served += n * tiles * hit * tile_bytes
                wave_bounds.append(bound)
            bounds.append("+".join(wave_bounds))
        return {"us": total, "bound": "/".join(bounds), "programs_per_sm": pps, "waves": len(bounds), "tile_dram": dram,
                "l2_served": served}

    vectors = (3 if phase == 1 else 1) * 4 * C  # margins (+ weights, temperatures) from DRAM once
    small_in = B * 8 + B * 4 * 2  # targets, gathered margin and weight per row
    stats = B * 3 * E * 4 + B * 3 * 4 + 8  # statistics, partial sums, loss and weight sum
    extra = vectors + small_in + stats
    if design == "two_kernel":
        fwd_k, fwd_passes = passes("fwd", ["read"])
        bwd_k, bwd_passes = passes("bwd", ["read+write"])
        fwd = kernel(gpu.fwd_fixed_us, gpu.fwd_chain_us, fwd_k, fwd_passes)
        bwd = kernel(gpu.bwd_fixed_us, gpu.bwd_chain_us, bwd_k, bwd_passes)
        fwd_dram = fwd["tile_dram"] + extra + B * 3 * 4  # + the last program's read of the partial sums
        bwd_dram = bwd["tile_dram"] + extra
        spills = max(fwd_k["spills"], bwd_k["spills"])
    else:
        fwd_k, fwd_passes = passes("fwdgrad", ["read", "reread+write"])
        fwd = kernel(gpu.fwd_fixed_us, gpu.fwd_chain_us + gpu.bwd_chain_us, fwd_k, fwd_passes)
        # the backward reads grad_output (L2) and returns: a launch and one round trip
        bwd = {"us": gpu.bwd_fixed_us + L, "bound": "launch", "programs_per_sm": None, "waves": 1, "tile_dram": 0.0,
               "l2_served": 0.0}
        fwd_dram = fwd["tile_dram"] + extra + B * 3 * 4
        bwd_dram = 4.0
        spills = fwd_k["spills"]
    floor_bytes = 2 * Z
    floor_us = floor_bytes / gpu.dram_Bps * 1e6
    predicted = fwd["us"] + bwd["us"]
    return {"Z": Z, "fwd": fwd, "bwd": bwd, "fwd_dram": fwd_dram, "bwd_dram": bwd_dram, "floor_bytes": floor_bytes,
            "floor_us": floor_us, "predicted_us": predicted, "spills": spills}


def model(B: int, E: int, C: int, dtype: str, mode: str, gpu: GPU, phase: int = 1, *, design: str = "two_kernel",
          stages: int = 1, max_registers: int | None = None, programs_per_sm: int | None = None) -> dict:
    """One case: bytes per kernel, predicted times and fraction of the floor (see the docstring).
    Keywords: the design ("product": the one the fused loss runs, PRODUCT_DESIGN) and its launch
    options (default: the two kernels as written, at the launchers' register budgets)."""
    if design == "product":
        design = PRODUCT_DESIGN
    p = _predict(B, E, C, dtype, mode, gpu, phase, design, stages, max_registers, programs_per_sm)
    fwd, bwd = p["fwd"], p["bwd"]
    total = p["fwd_dram"] + p["bwd_dram"]
    return {
        "gpu": gpu.name,
        "B": B,
        "E": E,
        "C": C,
        "dtype": dtype,
        "mode": mode,
        "phase": phase,
        "design": design,
        "stages": stages,
        "max_registers": max_registers,
        "programs_per_sm_cap": programs_per_sm,
        "bytes": int(total),
        "floor_bytes": int(p["floor_bytes"]),
        "traffic_ratio": round(total / p["floor_bytes"], 4),
        "l2_reuse_bytes": int(fwd["l2_served"]),
        "fwd_bytes": int(p["fwd_dram"]),
        "bwd_bytes": int(p["bwd_dram"]),
        "fwd_us": round(fwd["us"], 2),
        "bwd_us": round(bwd["us"], 2),
        "fwd_bound": fwd["bound"],
        "bwd_bound": bwd["bound"],
        "fwd_programs_per_sm": fwd["programs_per_sm"],
        "bwd_programs_per_sm": bwd["programs_per_sm"],
        "fwd_waves": fwd["waves"],
        "bwd_waves": bwd["waves"],
        "spill_bytes": p["spills"],
        "floor_us": round(p["floor_us"], 2),
        "predicted_us": round(p["predicted_us"], 2),
        "fraction_of_floor": float(f"{p['floor_us'] / p['predicted_us']:.4g}"),  # 4 digits, however small
    }


def rows(gpu: GPU, phases=(1,), **options) -> list[dict]:
    return [model(B, E, C, dtype, mode, gpu, phase, **options) for (B, E, C) in CASES for dtype in ITEMSIZE for mode in MODES for phase in phases]


def compare(gpu: GPU, phases=(1,)) -> list[dict]:
    """Every SETTINGS entry for every case: the rows, each with its setting's name."""
    return [{"setting": name, **row} for name, options in SETTINGS.items() for row in rows(gpu, phases, **options)]


# --------------------------------------------------------------------------- calibration


def fit(measured: list[dict], gpu: GPU, latencies=None, step: float = 0.05, counts: dict | None = None) -> tuple[GPU, float]:
    """Fit L, both chains and both fixed costs to measured kernel times of the kernels as written
    (rows with B, E, C, dtype, mode, fwd_us, bwd_us; phase 1): for each L on a grid, the chain
    and fixed cost of each kernel that give the least largest relative error (a grid of `step`
    us), then the L with the least. `counts`: the compiler's counts of the kernels timed, where
    they differ from today's (`load_counts`). Returns (the fitted GPU, that error)."""
    latencies = latencies or [round(0.5 + step * i, 2) for i in range(int(round(0.7 / step)) + 1)]
    grid = [round(step * i, 2) for i in range(int(round(12 / step)) + 1)]
    best = None
    for L in latencies:
        bare = replace(gpu, dram_latency_us=L, fwd_chain_us=0.0, fwd_fixed_us=0.0, bwd_chain_us=0.0, bwd_fixed_us=0.0)
        fitted, worst = {}, 0.0
        for kernel in ("fwd", "bwd"):
            pts = []
            for r in measured:
                p = _predict(r["B"], r["E"], r["C"], r["dtype"], r["mode"], bare, 1, counts=counts)[kernel]
                pts.append((p["waves"], p["us"], r[f"{kernel}_us"]))
            kb = None
            for chain in grid:
                for fixed in grid[: int(round(5 / step)) + 1]:
                    err = max(abs((fixed + w * chain + x) / m - 1) for w, x, m in pts)
                    if kb is None or err < kb[0] - 1e-12:
                        kb = (err, chain, fixed)
            fitted[kernel] = kb
            worst = max(worst, kb[0])
        if best is None or worst < best[0] - 1e-12:
            best = (worst, L, fitted)
    worst, L, f = best
    return replace(gpu, dram_latency_us=L, fwd_chain_us=f["fwd"][1], fwd_fixed_us=f["fwd"][2], bwd_chain_us=f["bwd"][1],
                   bwd_fixed_us=f["bwd"][2]), worst


def load_measured(path: str) -> list[dict]:
    """Measured kernel times for `fit`: a JSON file with "rows" (B, E, C, dtype, mode, fwd_us,
    bwd_us), or the rows.jsonl of a GPU check, whose rows of the kernels as written carry the
    profiler's fwd_kernel_us and bwd_kernel_us (phase 1): the fused loss's where it ran the two
    kernels (its row's "design"), else the directly launched defaults' ("kernels-default", the
    "mean" mode)."""
    if not path.endswith(".jsonl"):
        with open(path) as f:
            return json.load(f)["rows"]
    dtypes = {"fp32": "float32", "bf16": "bfloat16"}
    found = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("step") != "loss_bench" or not r.get("fwd_kernel_us"):
                continue
            two_kernel = r.get("provider") == "fused" and r.get("design", "two_kernel") == "two_kernel"
            if two_kernel or r.get("provider") == "kernels-default":
                key = (r["B"], r["E"], r["C"], dtypes[r["dtype"]], r["diversity"])
                if two_kernel or key not in found:
                    found[key] = {"B": r["B"], "E": r["E"], "C": r["C"], "dtype": key[3], "mode": r["diversity"],
                                  "fwd_us": r["fwd_kernel_us"], "bwd_us": r["bwd_kernel_us"]}
    if not found:
        raise SystemExit(f"{path}: no row with the two kernels' times (a GPU check on CUDA writes them)")
    return list(found.values())


def load_counts(path: str) -> dict | None:
    """The compiler's counts of the kernels a measurement file timed ("kernels": kernel, dtype,
    mode, registers, spills, sass: phase 1 at the default launch), for `fit`; None where the file
    has none (a GPU check's rows.jsonl: its kernels are the ones compiled with it)."""
    if path.endswith(".jsonl"):
        return None
    with open(path) as f:
        kernels = json.load(f).get("kernels")
    return {(k["kernel"], k["dtype"], k["mode"]): (k["registers"], k["spills"], k["sass"]) for k in kernels} if kernels else None


def fit_errors(measured: list[dict], gpu: GPU, counts: dict | None = None) -> list[dict]:
    """Each measured kernel time beside the model's (the kernels as written, phase 1)."""
    out = []
    for r in measured:
        p = _predict(r["B"], r["E"], r["C"], r["dtype"], r["mode"], gpu, 1, counts=counts)
        for kernel in ("fwd", "bwd"):
            out.append({"B": r["B"], "E": r["E"], "C": r["C"], "dtype": r["dtype"], "mode": r["mode"], "kernel": kernel,
                        "measured_us": r[f"{kernel}_us"], "model_us": round(p[kernel]["us"], 2),
                        "error": round(p[kernel]["us"] / r[f"{kernel}_us"] - 1, 4), "bound": p[kernel]["bound"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one row per case")
    parser.add_argument("--phase", choices=["0", "1", "both"], default="1",
                        help="DRW phase: 0 (T = 1, shared exponentials), 1 (weights and temperatures; the default, the dearer one)")
    parser.add_argument("--design", choices=("product", *DESIGNS), default="product",
                        help="the fused loss's design (default: the one it runs, PRODUCT_DESIGN)")
    parser.add_argument("--stages", type=int, choices=[1, 2], default=1, help="tiles in flight a program (launch option)")
    parser.add_argument("--max-registers", type=int, choices=[64], default=None, help="register cap (launch option)")
    parser.add_argument("--programs-per-sm", type=int, default=None, help="cap on the programs an SM runs")
    parser.add_argument("--compare", action="store_true", help="every design and option (SETTINGS), side by side")
    parser.add_argument("--fit", metavar="MEASURED", help="fit the calibration to measured kernel times and print it: a JSON "
                        "file with rows, or a GPU check's rows.jsonl")
    args = parser.parse_args(argv)
    gpu = GPUS[args.gpu]
    if args.fit:
        measured, counts = load_measured(args.fit), load_counts(args.fit)
        fitted, worst = fit(measured, gpu, counts=counts)
        params = {k: getattr(fitted, k) for k in ("dram_latency_us", "fwd_chain_us", "fwd_fixed_us", "bwd_chain_us", "bwd_fixed_us")}
        out = {"fitted": params, "max_error": round(worst, 4), "errors": fit_errors(measured, fitted, counts)}
        print(json.dumps(out, indent=1))
        return 0
    phases = (0, 1) if args.phase == "both" else (int(args.phase),)
    if args.compare:
        out = compare(gpu, phases)
        if args.json:
            print(json.dumps(out, indent=1))
            return 0
        cases = [(r["B"], r["E"], r["C"], r["dtype"], r["mode"], r["phase"]) for r in rows(gpu, phases)]
        table = {(r["setting"], (r["B"], r["E"], r["C"], r["dtype"], r["mode"], r["phase"])): r for r in out}
        print(f"{gpu.name}: predicted fraction of the floor (fwd + bwd us)")
        print(f"{'B, E, C, dtype, mode, phase':<34}" + "".join(f"{name:>24}" for name in SETTINGS))
        for case in cases:
            cells = [table[(name, case)] for name in SETTINGS]
            print(f"{', '.join(map(str, case)):<34}" + "".join(f"{r['fraction_of_floor']:>11.3f} ({r['fwd_us']:5.1f}+{r['bwd_us']:4.1f})" for r in cells))
        return 0
    out = rows(gpu, phases, design=args.design, stages=args.stages, max_registers=args.max_registers, programs_per_sm=args.programs_per_sm)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    cols = ["B", "E", "C", "dtype", "mode", "phase", "bytes", "floor_bytes", "traffic_ratio", "fwd_us", "bwd_us", "predicted_us", "floor_us",
            "fraction_of_floor", "fwd_bound", "bwd_bound"]
    print(f"{gpu.name}, {args.design}, stages {args.stages}, max_registers {args.max_registers}, programs_per_sm {args.programs_per_sm}")
    print("  ".join(f"{c:>13}" for c in cols))
    for r in out:
        print("  ".join(f"{str(r[c]):>13}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
