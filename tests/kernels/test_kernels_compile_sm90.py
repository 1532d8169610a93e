"""The Triton kernels compile for an H100 / H200 (sm_90) on a machine without a GPU, within the
design's register budget, without spills, with vector loads and stores in the main loop.

The CPU tests run the kernels through the interpreter, which accepts code the real compiler would
reject. These tests compile them ahead of time (Triton front end, LLVM, and the ptxas bundled with
the triton wheel; no driver needed) in a subprocess without TRITON_INTERPRET, through
`ride_fast_kernels.report`: every variant of its default matrix (E = 1..8, both modes, every
dtype, both DRW phases; the forward also with its divisor passed in, as a DRW step split over ranks
or micro-batches launches it) and, for each expert tile, the other launched kernels (no diversity term,
other combinations of margins, weights and temperatures: `--terms all`), with the strides training
gives at C = 8142 (row stride C, expert stride B C a multiple of 16: the "training" layout), and
short rows (C = 100: 1-warp programs). Integer arguments are declared 32-bit, as a launch passes them.
`python -m ride_fast_kernels.report --arch sm_90` prints the default matrix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

DTYPES = ("fp32", "bf16", "fp16")
MATRIX = [(E, mode, dtype, phase) for E in range(1, 9) for mode in ("mean", "pairwise") for dtype in DTYPES
          for phase in ("phase0", "phase1")]
#: the other launched combinations of per-class vectors and the no-diversity kernels, for every
#: expert tile (E_BLOCK 1, 4, 8)
EXTRA_TERMS = {"mean": ["phase0-temps", "phase1-uniform", "ce", "cb-ce", "ce-temps", "ce-drw"],
               "none": ["phase0", "phase1-uniform", "ce", "cb-ce"]}
EXTRA_TERMS["pairwise"] = EXTRA_TERMS["mean"]
MATRIX += [(E, mode, dtype, terms) for E in (1, 4, 8) for mode, all_terms in EXTRA_TERMS.items() for dtype in DTYPES
           for terms in all_terms]

#: The design's register budget (maxnreg) and warps per program: up to 4 experts three 8-warp
#: programs an SM (72 registers; 64, four, in the narrow tile: `narrow`), 5 to 8 experts four
#: 4-warp programs (128).
BUDGET = {False: (72, 8), True: (128, 4)}

#: the terms launched with temperatures (report.TERMS)
TEMPS_TERMS = ("phase1", "phase0-temps", "ce-temps", "ce-drw")


def narrow(variant: str) -> bool:
    """Whether a report row's variant runs the narrow tile (V = 2 classes a thread, every kernel
    at 64 registers): float32 "pairwise" with temperatures at 3 or 4 experts."""
    experts, mode, dtype, *rest = variant.split("-")
    terms = "-".join(p for p in rest if not (p.startswith("stages") or p in ("r64", "written")))
    return dtype == "fp32" and mode == "pairwise" and experts in ("E3", "E4") and terms in TEMPS_TERMS


def access_bytes(variant: str) -> int:
    """Bytes of one main-loop logit load (and gradient store) of a report row's variant: one
    thread's V classes of an expert, V = 4 (16 bytes of float32, 8 of 2-byte logits), and V = 2 in
    the narrow tile (8 bytes of float32)."""
    return 8 if narrow(variant) or "-fp32-" not in variant else 16


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ride_fast_kernels import report, ride_loss
    rows = []
    for E, mode, dtype, phase in json.loads(sys.argv[1]):
        rows += report.variant_rows(E, mode, dtype, phase, "sm_90", classes=8142, layout="training")
    # when B C is not a multiple of 16, experts past the first cannot be proven aligned
    unaligned = report.variant_rows(4, "mean", "bf16", 1, "sm_90", classes=8142, layout="unaligned")
    # the forward that divides by a weight sum passed in (a DRW step split over ranks or micro-batches)
    split = [r for E in (1, 4, 8) for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16", "fp16")
             for r in report.variant_rows(E, mode, dtype, 1, "sm_90", classes=8142, kernels=("fwd",), weight_sum=True)]
    # short rows (CIFAR-100): 1- to 2-warp programs, whose finishing step holds its block in registers too
    short = [r for E, mode, dtype in ((3, "pairwise", "bf16"), (4, "mean", "fp32"), (8, "pairwise", "fp32"))
             for r in report.variant_rows(E, mode, dtype, 1, "sm_90", classes=100)]
    # B == 1 and E == 1 arrive as constexpr 1 (Triton specialises integer arguments equal to 1)
    sig = dict(report._BWD, z_ptr="*bf16", g_ptr="*bf16", E="constexpr", B="constexpr", G_ALIGNED="constexpr",
               **{n: "constexpr" for n in report._CONSTEXPRS})
    cx = dict(zip(report._CONSTEXPRS, [True, True, True, 1, 1, 256, 4]), E=1, B=1, G_ALIGNED=True)
    report._compile(ride_loss._ride_loss_bwd_kernel, sig, cx, 8, "sm_90", report._PTR_ARGS, ride_loss.register_budget(1, 2))
    print(json.dumps({"rows": rows, "unaligned": unaligned, "short": short, "split": split}))
    """
)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def compiled_rows(script: str, *args: str, timeout: int = 600) -> dict:
    """Run a script of `report` calls in a process that compiles for real (no TRITON_INTERPRET):
    the JSON of its last output line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert result.returncode == 0, f"compilation for sm_90 failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_kernels_compile_for_sm90_within_budget():
    out = compiled_rows(SCRIPT, json.dumps(MATRIX), timeout=900)
    rows = out["rows"]
    assert len(rows) == 2 * len(MATRIX) and len(out["split"]) == 18
    for row in rows + out["split"]:
        where = f"{row['kernel']} {row['variant']}"
        E, _, dtype = row["variant"].split("-")[:3]
        budget, warps = BUDGET[int(E[1:]) > 4]
        if narrow(row["variant"]):
            budget = 64  # every kernel of the narrow tile: four programs an SM
        assert row["spills"] == 0, f"{where} spills {row['spills']} bytes"
        assert row["register_budget"] == budget and row["num_warps"] == warps, where
        assert row["registers"] <= budget, f"{where} uses {row['registers']} registers > {budget}"
        assert row["shared_bytes"] <= 8192, f"{where} uses {row['shared_bytes']} bytes of shared memory"
        if row["kernel"] == "fwd" and E != "E1":
            # the forward's row end crosses its warps in two reductions (maxima, then sums: three
            # barriers each), one store of the statistics (two) and the ticket's broadcast (one);
            # its last program's sum over the rows, one reduction, adds three. One reduction a
            # running value, as the kernels once had, is 30 to 43.
            assert row["barriers"] <= 12, f"{where}: {row['barriers']} barriers"
        # C = 8142, no padding: every logit load (and gradient store) of the main loop is one
        # thread's V classes of an expert in one access (`access_bytes`)
        width = access_bytes(row["variant"])
        assert row["logit_loads"] == width, f"{where}: main-loop logit loads {row['logit_loads']} bytes, not {width}"
        assert row["vectorised"], where
        if row["kernel"] == "bwd":
            assert row["grad_stores"] == width, f"{where}: main-loop gradient stores {row['grad_stores']} bytes"
    # the report tells the layouts apart: without an aligned expert stride the accesses are scalar
    assert [r["vectorised"] for r in out["unaligned"]] == [False, False]
    assert len(out["short"]) == 6
    for row in out["short"]:
        budget, _ = BUDGET[int(row["variant"].split("-")[0][1:]) > 4]
        assert row["spills"] == 0 and row["registers"] <= budget, f"{row['kernel']} {row['variant']} at C = 100: {row}"


@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_report_cli_rejects_bad_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "ride_fast_kernels.report", "--modes", "max"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 2 and "--modes: unknown ['max']" in result.stderr


TUNING_SCRIPT = textwrap.dedent(
    """
    import json
    from ride_fast_kernels import report
    staged = [r for E in (4, 8) for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16")
              for r in report.variant_rows(E, mode, dtype, 1, "sm_90", classes=8142, stages=2)]
    capped = [r for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16")
              for r in report.variant_rows(4, mode, dtype, 1, "sm_90", classes=8142, max_registers=64)]
    print(json.dumps({"staged": staged, "capped": capped}))
    """
)


@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_the_tuning_variants_compile_for_sm90():
    """The launch-time alternatives the GPU check times beside the defaults: stages = 2 loads the
    main loop's logits a block ahead with cp.async (16-byte float32 / 8-byte bf16 copies into
    shared memory) within the register budget, without spills; max_registers = 64 (four 8-warp
    programs an SM) holds the cap, spilling nothing in "mean" and a few bytes at most in the
    phase-1 "pairwise" forward, which carries the most running state."""
    out = compiled_rows(TUNING_SCRIPT)
    assert len(out["staged"]) == 16 and len(out["capped"]) == 8
    for row in out["staged"]:
        where = f"{row['kernel']} {row['variant']}"
        budget, _ = BUDGET[int(row["variant"].split("-")[0][1:]) > 4]
        assert row["variant"].endswith("-stages2") and row["staged_loads"] > 0, f"{where}: no cp.async in the main loop"
        assert row["spills"] == 0 and row["registers"] <= budget, f"{where}: {row['registers']} registers, {row['spills']} bytes spilled"
        assert row["logit_loads"] == access_bytes(row["variant"]) and row["vectorised"], where
        assert row["shared_bytes"] <= 48 * 1024, f"{where} uses {row['shared_bytes']} bytes of shared memory"
    for row in out["capped"]:
        where = f"{row['kernel']} {row['variant']}"
        assert row["registers"] <= 64 and row["register_budget"] == 64 and row["vectorised"], where
        if "-mean-" in row["variant"] or row["kernel"] == "bwd":
            assert row["spills"] == 0, f"{where} spills {row['spills']} bytes"
        else:
            assert row["spills"] <= 64, f"{where} spills {row['spills']} bytes"


WRITTEN_SCRIPT = textwrap.dedent(
    """
    import json
    from ride_fast_kernels import report
    cases = [(E, mode, dtype, 1, False) for E in (1, 2, 3, 4, 8) for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16")]
    cases += [(4, mode, "fp16", phase, False) for mode in ("mean", "pairwise") for phase in (0, 1)]
    cases += [(4, mode, dtype, 1, True) for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16")]
    cases += [(E, mode, dtype, 0, False) for E in (1, 2, 3, 4) for mode in ("mean", "pairwise") for dtype in ("fp32", "bf16")]
    fwd = [r for E, mode, dtype, phase, weight_sum in cases
           for r in report.variant_rows(E, mode, dtype, phase, "sm_90", classes=8142, kernels=("fwdgrad",), weight_sum=weight_sum)]
    bwd = [r for mode in ("mean", "pairwise") for dtype in ("bf16", "fp32")
           for r in report.variant_rows(4, mode, dtype, 1, "sm_90", classes=8142, kernels=("bwd",), grad_written=True)]
    print(json.dumps({"fwd": fwd, "bwd": bwd}))
    """
)


@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_the_forward_that_writes_the_gradient_compiles_for_sm90():
    """The forward with its gradient pass (`grad_out`) within its budget (up to 4 experts 64
    registers with LDAM's margins, four programs an SM; 128 for 5 to 8), with the gradient pass's
    logit loads and gradient stores vector accesses (`access_bytes`: float32 "pairwise" with
    temperatures at 3 or 4 experts fits 64 registers in the narrow tile, V = 2); with DRW weights
    it sums the divisor itself, or is given it
    (weight_sum). Up to 4 experts, where the fused loss runs it for float32 and bfloat16 logits
    (`_utils.loss_design`), without spills; for 5 to 8 (a launch option) the two passes' state at
    once leaves a few, never inside a main loop (`loop_spills`, from the SASS): a handful of
    local-memory accesses a row, none a tile. The backward that returns where grad_output is the
    number the forward wrote the gradient for compiles too (an early return on a value read from
    memory)."""
    out = compiled_rows(WRITTEN_SCRIPT)
    assert len(out["fwd"]) == 44 and len(out["bwd"]) == 4
    for row in out["fwd"]:
        where = f"{row['kernel']} {row['variant']}"
        experts = int(row["variant"].split("-")[0][1:])
        budget, warps = BUDGET[experts > 4]
        if experts <= 4:  # every variant here has margins ("phase0", "phase1")
            budget = 64
        assert row["register_budget"] == budget, where
        assert row["kernel"] == "fwdgrad" and row["registers"] <= budget and row["num_warps"] == warps, where
        assert row["loop_spills"] == 0, f"{where} spills inside a main loop"
        assert row["spills"] <= (0 if experts <= 4 else 128), f"{where} spills {row['spills']} bytes"
        width = access_bytes(row["variant"])
        assert row["logit_loads"] == width and row["grad_stores"] == width and row["vectorised"], where
    for row in out["bwd"]:
        where = f"{row['kernel']} {row['variant']}"
        assert row["variant"].endswith("-written") and row["spills"] == 0 and row["registers"] <= 72, row
        width = access_bytes(row["variant"])
        assert row["logit_loads"] == width and row["grad_stores"] == width and row["vectorised"], where


def test_loop_spills_counts_local_memory_inside_loops_only():
    """`loop_spills` counts the spill instructions between a main loop's label and the branch back
    to it, predicated ones too; those before and after the loop are paid once and not counted, and
    so are those in a loop without vector accesses (the masked blocks', once or twice a row)."""
    from ride_fast_kernels import sass

    main = [".L_x_3", "LDG.E.128 R4, desc[UR4][R2.64]", "FFMA R2, R3, R4, R5", "LDL.LU R8, [R1+0x4]", "@P0 STL [R1+0x8], R9",
            "NOP", "@P1 BRA `(.L_x_3)"]
    masked = [".L_x_6", "@P2 LDG.E R4, desc[UR4][R2.64]", "STL [R1+0xc], R4", "@P1 BRA `(.L_x_6)"]
    listing = ["STL [R1], R16", *masked, *main, "LDL R8, [R1]", ".L_x_4", "BRA `(.L_x_5)", ".L_x_5", "EXIT"]
    assert [len(loop) for loop in sass.loops(listing)] == [3, 5]
    assert [len(loop) for loop in sass.main_loops(listing)] == [5]
    assert sass.loop_spills(listing) == 2
    assert sass.loop_spills(listing[:1] + listing[-5:]) == 0
