"""The traffic and time model of the fused RIDE loss (benchmarks/loss_traffic.py): its calibration
against the H200's kernel times, its arithmetic on a hand-computed case, the DRAM traffic of each
design, and the compiler's counts it holds."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import loss_traffic as lt
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEASURED = os.path.join(HERE, "results", "loss_traffic", "2026-12-04_h200_measured_kernel_times.json")
CALIBRATED = ("dram_latency_us", "fwd_chain_us", "fwd_fixed_us", "bwd_chain_us", "bwd_fixed_us")


def _measured() -> dict:
    with open(MEASURED) as f:
        return json.load(f)


def test_measured_times_are_the_gpu_checks():
    """The measured file holds the profiler's kernel times of the GPU check it names."""
    measured = _measured()
    with open(os.path.join(ROOT, measured["source"])) as f:
        text = f.read()
    assert len(measured["rows"]) == 6
    for r in measured["rows"]:
        dtype = {"float32": "torch.float32", "bfloat16": "torch.bfloat16"}[r["dtype"]]
        block = text.split(f"== profile B{r['B']} E{r['E']} C{r['C']} {dtype} {r['mode']} ")[1].split("==")[0]
        for kernel in ("fwd", "bwd"):
            assert re.search(rf"\b{r[f'{kernel}_us']:.2f} us/iter\s+x1\.0\s+_ride_loss_{kernel}_kernel", block), (r, kernel)


@pytest.mark.parametrize("gpu", ["h200"])
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("case", range(6))
def test_calibration_reproduces_the_measured_kernel_times(gpu, kernel, case):
    """Each of the 12 profiler kernel times of the kernels as written, within 15 %: the model of
    the kernels that were timed (the file's compiler counts, where today's kernels differ)."""
    r = _measured()["rows"][case]
    p = lt._predict(r["B"], r["E"], r["C"], r["dtype"], r["mode"], lt.GPUS[gpu], 1, counts=lt.load_counts(MEASURED))
    assert p[kernel]["us"] == pytest.approx(r[f"{kernel}_us"], rel=0.15), (r, p[kernel])


def test_fit_reads_a_gpu_checks_rows(tmp_path):
    """--fit takes the check's rows.jsonl as it is: the profiler's kernel times of the two kernels
    as written, nothing else (the providers that are not the fused op, the copy row, other steps).
    Where the fused loss ran the gradient-writing forward (its row's design), the directly launched
    defaults' times ("kernels-default") stand in for it."""
    measured = _measured()["rows"]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    lines = [{"step": "loss_bench", "kind": "measure", "case": "copy", "gbps": 4229.7}]
    for i, r in enumerate(measured):
        common = {"step": "loss_bench", "kind": "measure", "B": r["B"], "E": r["E"], "C": r["C"], "dtype": short[r["dtype"]],
                  "diversity": r["mode"]}
        times = {"fwd_kernel_us": r["fwd_us"], "bwd_kernel_us": r["bwd_us"]}
        if i % 2:  # a check whose fused loss wrote the gradient in its forward
            lines += [{**common, "provider": "fused", "design": "grad_in_forward", "fwd_kernel_us": 50.0, "bwd_kernel_us": 2.0},
                      {**common, "provider": "kernels-default", **times}]
        else:  # the fused loss as two kernels (a row without a design is one of those), before its variants
            lines += [{**common, "provider": "fused", **({"design": "two_kernel"} if i % 4 else {}), **times, "other_kernels_us": 0.8},
                      {**common, "provider": "kernels-default", "fwd_kernel_us": 99.0, "bwd_kernel_us": 99.0}]
        lines += [{**common, "provider": "eager", "ms": 1.0}, {**common, "provider": "kernels-regs64", "fwd_kernel_us": 1.0, "bwd_kernel_us": 1.0}]
    lines.append({"step": "r50", "kind": "measure", "provider": "fused", "images_per_s": 2576})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert lt.load_measured(str(path)) == measured
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[3]) + "\n")  # the copy and an eager row
    with pytest.raises(SystemExit, match="no row with the two kernels' times"):
        lt.load_measured(str(empty))


def test_fit_gives_the_recorded_calibration():
    """Fitting again to the measured times, with the compiler's counts of the kernels they timed
    (the file's "kernels"), gives the H200's values; the H100 shares them."""
    fitted, worst = lt.fit(_measured()["rows"], lt.GPUS["h200"], counts=lt.load_counts(MEASURED))
    for field in CALIBRATED:
        assert getattr(fitted, field) == pytest.approx(getattr(lt.GPUS["h200"], field), abs=1e-9), field
        assert getattr(lt.GPUS["h100"], field) == getattr(lt.GPUS["h200"], field), field
    assert worst < 0.10
    assert lt.GPUS["h100"].dram_efficiency == lt.GPUS["h200"].dram_efficiency == 0.88


# a GPU with round numbers: one SM at 1 GHz (1000 clocks a us), 4 warp instructions and 16 MUFU
# operations a clock, 16,384 bytes a us of DRAM, an L2 of which 65,536 bytes keep rows, an L2 bandwidth
# that never binds; latencies 1 us (DRAM) and 0.25 us (L2); chains 2 and 0.5 us, fixed 1 and 0.5 us
TOY = lt.GPU("toy", dram_TBps=0.016384, l2_MB=0.065536, sms=1, clock_GHz=1.0, dram_efficiency=1.0, l2_TBps=1e6,
             issue_per_clock=4, mufu_per_clock=16, registers_per_sm=65536, dram_latency_us=1.0, l2_latency_us=0.25,
             l2_effective=1.0, fwd_chain_us=2.0, fwd_fixed_us=1.0, bwd_chain_us=0.5, bwd_fixed_us=0.5)


def test_hand_computed_case():
    # B = 4, E = 4, C = 2048, float32, mean, phase 1: Z = 4 * 4 * 2048 * 4 = 131,072 bytes; a row
    # is 32,768 bytes in 2 tiles of 16,384 bytes (4096 logits: 128 warps' worth of 32).
    # forward: 72 registers, 65,536 / (72 * 256) = 3 programs an SM: waves of 3 and 1 programs.
    #   350 SASS a thread a tile: 21.875 x 128 = 2800 warp instructions, c = 2800 / 4000 = 0.7 us;
    #   MUFU 2 x 4096 / 16,000 = 0.512 us a program.
    #   wave 1 (3): max(latency 1 + 0.7, DRAM 3 x 16,384 / 16,384 = 3, issue rate 3 x 0.7, MUFU 1.536) = 3 -> 6 us
    #   wave 2 (1): max(1.7, 1, 0.7, 0.512) = 1.7 -> 3.4 us
    #   forward = fixed 1 + chains 2 x 2 + 6 + 3.4 = 14.4 us
    # backward: 62 registers (64 allocated), 4 programs an SM: one wave of 4.
    #   254 SASS: 2032 warp instructions, c = 0.508 us; MUFU 2.25 x 4096 / 16,000 = 0.576 us.
    #   max(1.508, DRAM 4 x 32,768 / 16,384 = 8, issue rate 2.032, MUFU 2.304) = 8 -> 16 us
    #   backward = 0.5 + 0.5 + 16 = 17 us.
    # floor: 2 Z / 16,384 = 16 us; fraction 16 / 31.4.
    # bytes: vectors 3 * 4 * 2048 = 24,576, targets and gathers 4 * 16 = 64, statistics
    #   4 * 3 * 4 * 4 + 4 * 12 + 8 = 248: forward Z + 24,888 + the partial sums read back 48
    #   = 156,008; backward 2 Z + 24,888 = 287,032.
    row = lt.model(4, 4, 2048, "float32", "mean", TOY, phase=1)
    assert (row["fwd_waves"], row["bwd_waves"], row["fwd_programs_per_sm"], row["bwd_programs_per_sm"]) == (2, 1, 3, 4)
    assert row["fwd_us"] == pytest.approx(14.4, abs=0.01) and row["bwd_us"] == pytest.approx(17.0, abs=0.01)
    assert row["fwd_bound"] == "dram/latency" and row["bwd_bound"] == "dram"
    assert row["fraction_of_floor"] == pytest.approx(16 / 31.4, abs=1e-4)
    assert row["fwd_bytes"] == 156_008 and row["bwd_bytes"] == 287_032 and row["floor_bytes"] == 262_144

    # stages = 2: the forward's 363 SASS give c = 22.6875 x 128 / 4000 = 0.726 us and a latency term
    # of max(0.726, (1 + 0.726) / 2) = 0.863: wave 1 stays at DRAM's 3 us, wave 2 becomes DRAM's
    # 1 us: forward = 1 + 4 + 6 + 2 = 13 us; the backward (4 programs, DRAM-bound) stays 17 us
    staged = lt.model(4, 4, 2048, "float32", "mean", TOY, phase=1, stages=2)
    assert staged["fwd_us"] == pytest.approx(13.0, abs=0.01) and staged["bwd_us"] == pytest.approx(17.0, abs=0.01)

    # grad_in_forward: a 64-register program (348 + 275 SASS, the launcher's budget with margins),
    #   4 an SM: one wave of 4, which chains 2 + 0.5 once.
    #   pass 1: c = 21.75 x 128 / 4000 = 0.696 us; max(latency 1.696, DRAM 4 x 16,384 / 16,384 = 4,
    #   issue rate 2.784, MUFU 2.048) = 4 -> 8 us.
    #   pass 2: c = 17.1875 x 128 / 4000 = 0.55 us. 4 rows in flight, 131,072 bytes against 65,536:
    #   the L2 serves half, a tile moves 16,384 x (1 + 1/2) DRAM bytes, 4 of them 6 us (latency
    #   1.55, issue rate 2.2, MUFU 2.304) -> 12 us.
    #   forward = 1 + 2.5 + 8 + 12 = 23.5 us; backward = 0.5 + 1 (grad_output) = 1.5 us.
    # bytes: 2 Z + the misses 4 x 32,768 / 2 = 65,536 + 24,888 + 48 = 352,616, the backward 4; the L2
    #   serves 65,536.
    fused = lt.model(4, 4, 2048, "float32", "mean", TOY, phase=1, design="grad_in_forward")
    assert (fused["fwd_programs_per_sm"], fused["fwd_waves"]) == (4, 1)
    assert fused["fwd_us"] == pytest.approx(23.5, abs=0.01) and fused["bwd_us"] == pytest.approx(1.5, abs=0.01)
    assert fused["fwd_bytes"] == 352_616 and fused["bwd_bytes"] == 4 and fused["l2_reuse_bytes"] == 65_536
    assert fused["fwd_bound"] == "dram+dram"

    # one program an SM: 4 waves of 1, every row fits the L2: pass 1 1.696 x 2 and pass 2 (L2 latency
    # 0.25 + 0.55 against DRAM's 1 us a tile) 2 us a wave
    one = lt.model(4, 4, 2048, "float32", "mean", TOY, phase=1, design="grad_in_forward", programs_per_sm=1)
    assert one["fwd_us"] == pytest.approx(1 + 4 * (2.5 + 3.392 + 2), abs=0.01) and one["fwd_bytes"] == 2 * 131_072 + 24_936


@pytest.mark.parametrize("gpu", sorted(lt.GPUS))
def test_dram_traffic_of_each_design(gpu):
    """At (512, 4, 8142), phase 1 (the same on both GPUs: same L2, same shapes). Z = 4 * 512 * 8142
    * itemsize: 66,699,264 bytes float32, 33,349,632 bfloat16; the small terms are 142,768 bytes
    in the forward (vectors 97,704, targets and gathers 8,192, statistics 30,728, partial sums read
    back 6,144) and 136,624 in the backward.
    two_kernel: 3 Z + 279,392 = 1.5 times the floor: 1.5021 float32, 1.5042 bfloat16.
    grad_in_forward (64 registers, 4 programs an SM: all 512 rows in one wave, float32 "pairwise"
    in the narrow tile too): float32 rows are 130,272 bytes, 512 of them 66,699,264; the L2 serves
    30 MB of the re-read and DRAM the other 36,699,264: 2 Z + 36,699,264 + 142,772 = 1.2762 times
    the floor. bfloat16 rows are 65,136 bytes, 33,349,632 in flight: 2 Z + 3,349,632 + 142,772 =
    1.0524 times. (With 80 registers, 3 programs an SM, float32 "pairwise" ran waves of 396 and 116
    rows and moved 1.1629 times the floor, a third of a row's worth less, in a second wave.)"""
    g = lt.GPUS[gpu]
    expect = {("two_kernel", "float32", "mean"): 1.5021, ("two_kernel", "bfloat16", "mean"): 1.5042,
              ("two_kernel", "float32", "pairwise"): 1.5021, ("two_kernel", "bfloat16", "pairwise"): 1.5042,
              ("grad_in_forward", "float32", "mean"): 1.2762, ("grad_in_forward", "bfloat16", "mean"): 1.0524,
              ("grad_in_forward", "float32", "pairwise"): 1.2762, ("grad_in_forward", "bfloat16", "pairwise"): 1.0524}
    for (design, dtype, mode), ratio in expect.items():
        row = lt.model(512, 4, 8142, dtype, mode, g, phase=1, design=design)
        assert row["traffic_ratio"] == pytest.approx(ratio, abs=1e-4), row
    for mode in lt.MODES:
        fp32 = lt.model(512, 4, 8142, "float32", mode, g, phase=1, design="grad_in_forward")
        assert fp32["bytes"] == pytest.approx(2 * 66_699_264 + 36_699_264 + 142_772, abs=2), mode
        assert fp32["l2_reuse_bytes"] == 30_000_000 and fp32["fwd_waves"] == 1, mode
    # every case: within 1.3 times the floor; where the L2 serves all of pass 2, within 1.01
    for row in lt.rows(g, phases=(0, 1), design="grad_in_forward"):
        Z = row["floor_bytes"] // 2
        assert row["traffic_ratio"] <= 1.3 and (row["traffic_ratio"] < 1.01 or row["l2_reuse_bytes"] < Z - 2), row


def test_waves_of_the_kernels_as_written_and_with_64_registers():
    """The forward runs 512 rows in two waves (72 registers, 396 programs); at 64 registers in one
    (528). The mean backward already runs in one (62-64 registers), the bfloat16 pairwise one in
    two (71-72). float32 "pairwise" with temperatures (the DRW phase) runs the narrow tile, both
    kernels at 64 registers or fewer: one wave each."""
    h200 = lt.GPUS["h200"]
    for dtype in lt.ITEMSIZE:
        mean = lt.model(512, 4, 8142, dtype, "mean", h200)
        pairwise = lt.model(512, 4, 8142, dtype, "pairwise", h200)
        regs64 = lt.model(512, 4, 8142, dtype, "pairwise", h200, max_registers=64)
        assert (mean["fwd_waves"], mean["bwd_waves"]) == (2, 1)
        if dtype == "float32":
            assert (pairwise["fwd_waves"], pairwise["bwd_waves"]) == (1, 1)
            assert regs64["predicted_us"] == pairwise["predicted_us"]
        else:
            assert (pairwise["fwd_waves"], pairwise["bwd_waves"]) == (2, 2)
            assert regs64["predicted_us"] < pairwise["predicted_us"]
        assert (regs64["fwd_waves"], regs64["bwd_waves"], regs64["fwd_programs_per_sm"]) == (1, 1, 4)


def test_cli_json():
    out = subprocess.run([sys.executable, os.path.join(HERE, "loss_traffic.py"), "--gpu", "h200", "--json"],
                         capture_output=True, text=True, check=True, timeout=60)
    rows = json.loads(out.stdout)
    assert len(rows) == 2 * 2 * 2  # cases x dtypes x modes
    for row in rows:
        assert {"B", "E", "C", "dtype", "mode", "bytes", "floor_bytes", "predicted_us", "fraction_of_floor", "fwd_us", "bwd_us",
                "traffic_ratio"} <= set(row)
        assert row["dtype"] in ("float32", "bfloat16") and row["mode"] in ("mean", "pairwise")
        assert row["design"] == "grad_in_forward" and row["stages"] == 1 and row["max_registers"] is None
        assert row == lt.model(row["B"], row["E"], row["C"], row["dtype"], row["mode"], lt.GPUS["h200"], 1, design="grad_in_forward")
    assert {(r["B"], r["E"], r["C"]) for r in rows} == {(512, 4, 8142), (256, 4, 1000)}


def test_the_clis_design_is_the_one_the_fused_loss_runs(monkeypatch):
    """--json's rows ("product") are the design the registered operator takes for these cases."""
    import torch
    from ride_fast_kernels._utils import loss_design

    monkeypatch.delenv("RIDE_FAST_LOSS_DESIGN", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        assert loss_design(dtype, 4) == lt.PRODUCT_DESIGN == "grad_in_forward"
    row = lt.model(512, 4, 8142, "bfloat16", "mean", lt.GPUS["h200"], 0, design="product")
    assert (row["design"], row["max_registers"]) == ("grad_in_forward", None)


def test_cli_compare_json():
    out = subprocess.run([sys.executable, os.path.join(HERE, "loss_traffic.py"), "--gpu", "h100", "--compare", "--json"],
                         capture_output=True, text=True, check=True, timeout=60)
    rows = json.loads(out.stdout)
    assert [r["setting"] for r in rows[::8]] == list(lt.SETTINGS)
    by = {(r["setting"], r["B"], r["dtype"], r["mode"]): r for r in rows}
    assert by[("gradfwd-regs64", 512, "float32", "mean")] == {
        "setting": "gradfwd-regs64", **lt.model(512, 4, 8142, "float32", "mean", lt.GPUS["h100"], 1, design="grad_in_forward", max_registers=64)}


def test_options_outside_the_compiled_settings_are_refused():
    h200 = lt.GPUS["h200"]
    for bad in ({"stages": 3}, {"max_registers": 48}, {"design": "one_kernel"}):
        with pytest.raises(ValueError):
            lt.model(512, 4, 8142, "float32", "mean", h200, **bad)
    with pytest.raises(ValueError):
        lt.model(512, 8, 1000, "float32", "mean", h200)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_instruction_counts_are_the_compilers():
    """OPS_E4 holds what the sm_90 compiler emits (three variants checked, a few seconds of compiling)."""
    script = textwrap.dedent(
        """
        import json
        from ride_fast_kernels import report
        rows = (report.variant_rows(4, "pairwise", "bf16", 1) + report.variant_rows(4, "mean", "fp32", 0)
                + report.variant_rows(4, "pairwise", "fp32", 1))  # the narrow tile
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


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel has no bundled ptxas")
def test_registers_and_sass_are_the_compilers():
    """KERNELS_E4 and GRAD_IN_FORWARD_E4 hold what ptxas and nvdisasm give (seven kernels checked,
    the narrow tile's three among them)."""
    script = textwrap.dedent(
        """
        import json
        from ride_fast_kernels import report, sass
        cubins, original = [], report._row
        def row(kernel, variant, gradient, compiled, *args):
            cubins.append(compiled.asm["cubin"])
            return original(kernel, variant, gradient, compiled, *args)
        report._row = row
        out = []
        for mode, dtype, stages, regs, kernels in (("mean", "fp32", 1, None, ("fwd", "bwd")),
                                                   ("pairwise", "bf16", 2, 64, ("fwd", "bwd")),
                                                   ("pairwise", "fp32", 1, None, ("fwdgrad", "fwd", "bwd"))):
            rows = report.variant_rows(4, mode, dtype, 1, stages=stages, max_registers=regs, kernels=kernels)
            for r, cubin in zip(rows, cubins[-len(rows):]):
                # instructions of each loop with vector accesses (the main loops), in order
                loops = [len(loop) for loop in sass.main_loops(sass.listing(cubin, report.ptxas_path()))]
                out.append({"kernel": r["kernel"], "mode": mode, "dtype": dtype, "stages": stages, "max_registers": regs,
                            "registers": r["registers"], "spills": r["spills"], "loops": loops})
        print(json.dumps(out))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dtypes = {"bf16": "bfloat16", "fp32": "float32"}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got) == 7
    for r in got:
        i = lt.TUNINGS.index((r["stages"], r["max_registers"]))
        if r["kernel"] == "fwdgrad":
            expect = lt.GRAD_IN_FORWARD_E4[(dtypes[r["dtype"]], r["mode"], 1)][i]
        else:
            expect = lt.KERNELS_E4[(r["kernel"], dtypes[r["dtype"]], r["mode"], 1)][i]
        assert (r["registers"], r["spills"], *r["loops"]) == expect, r["kernel"]
