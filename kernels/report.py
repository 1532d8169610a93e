"""What the compiler makes of the fused RIDE loss kernels, without a GPU.

    python -m ride_fast_kernels.report --arch sm_90 [--json] [--classes 8142]
                                       [--layout training|padded|unaligned]
                                       [--terms phase0,phase1 | --terms all]
                                       [--experts 1,2,...] [--modes mean,pairwise]
                                       [--dtypes fp32,bf16,fp16]
                                       [--kernels fwd,bwd,fwdgrad]

Compiles every variant ahead of time (Triton front end, LLVM, and the ptxas bundled with the
triton wheel; no driver), one row per kernel variant:

    kernel        fwd (loss and row statistics, its last program reduces the rows: all a
                  forward without gradient runs), bwd (the gradient), and with --kernels
                  fwdgrad: the forward that also writes the gradient in a second pass over
                  each row (its columns describe that pass's loop; the design the fused loss
                  runs for float32 and bfloat16 logits of up to 4 experts, where the bwd kernel
                  only returns: `_utils.loss_design`)
    variant       E<experts>-<mode>-<dtype>-<terms>: mode mean, pairwise or none (no diversity
                  term: lambda = 0, the CE / LDAM losses, and one expert with "pairwise", which
                  the launcher runs without it); terms, the per-class vectors passed (TERMS):
                  phase0 (margins only, T = 1: the shared-exponential path) and phase1 (margins,
                  DRW weights, temperatures) by default, every combination a loss launches with
                  --terms all
    gradient      whether the kernel runs for the gradient (bwd) or for every call (fwd)
    registers     per thread (ptxas -v), under the launchers' maxnreg (register_budget);
                  spills: spill store + load bytes; loop_spills: spill instructions (STL / LDL
                  in the SASS, nvdisasm) inside the main loops (those with vector accesses),
                  where they cost every tile rather than once a row; shared_bytes: static +
                  Triton's scratch
    barriers      bar.sync instructions in the kernel (PTX): each exchange between a program's
                  warps (the forward's once-a-row reductions and statistics' stores, its last
                  program's sum over the rows) waits for its slowest warp, a latency paid once a
                  row that the main loops do not hide
    logit_loads   vector width in bytes of the main loop's global loads of the logits (16: one
                  128-bit load per instruction), and grad_stores likewise for the gradient
    vectorised    every logit load (and gradient store) in the main loop is a vector access
    staged_loads  cp.async copies in the main loop (0 unless compiled with stages > 1, where the
                  logits arrive through shared memory and logit_loads is their copies' width)
    mufu_per_element, alu_per_element
                  the main loop's MUFU instructions (ex2, lg2, rcp, and float32 divisions,
                  which run a reciprocal) and other float
                  instructions (add, mul, fma, max, setp, selp, cvt, shfl ...) per logit: what
                  benchmarks/loss_traffic.py charges against the SM's rates

The main loop is the unmasked full-block loop (the last loop of the PTX with the logits' accesses:
the masked rest of a row runs before it); the logits' accesses are told apart from the per-class vectors by their cache hints (evict_last in the forward,
evict_first in the backward). The main loop of a row starts at its first 16-element boundary, so
its accesses are vector ones when the base pointers are 16-byte aligned and the expert stride
B C is a multiple of 16 elements, whatever C is. --layout says which strides Triton is told are
multiples of 16 (LAYOUTS): "training" (the default) the expert strides only, as for the [E, B, C]
logits of a batch of a multiple of 16 images and C = 8142; "padded" the row strides too (C a multiple of 16);
"unaligned" none (B C not a multiple of 16: only expert 0's accesses can be vector ones).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even from a test process that interprets

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ride_fast_kernels import ride_loss, sass  # noqa: E402
from ride_fast_kernels._utils import next_power_of_2, pick_tile  # noqa: E402

DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
MODES = {"mean": ride_loss._DIV_MEAN, "pairwise": ride_loss._DIV_PAIRWISE, "none": ride_loss._DIV_NONE}
#: (margins, DRW weights, temperatures) passed to the kernels, by what launches them
TERMS = {
    "phase0": (True, False, False),  # LDAM before the DRW switch, T = 1
    "phase1": (True, True, True),  # LDAM-DRW, temperatures (RIDE's default after the switch)
    "phase0-temps": (True, False, True),  # before the switch with T_base != 1
    "phase1-uniform": (True, True, False),  # LDAM-DRW, T = 1 (also LDAM-DRW without diversity)
    "ce": (False, False, False),  # cross-entropy
    "cb-ce": (False, True, False),  # class-balanced cross-entropy
    "ce-temps": (False, False, True),  # RIDE with a CE classification term, T != 1
    "ce-drw": (False, True, True),  # the same after the DRW switch
}
KERNELS = ("fwd", "fwdgrad", "bwd")
_PTR_ARGS = ("z_ptr", "target_ptr", "margin_ptr", "weight_ptr", "temp_ptr", "stats_ptr", "part_ptr", "loss_ptr", "aux_ptr", "wsum_ptr", "counter_ptr", "go_ptr", "g_ptr")
#: argument types as a launch specialises them (an integer below 2^31 arrives as i32; the kernels
#: widen the expert strides to 64 bits themselves)
_FWD = {
    "z_ptr": None, "target_ptr": "*i64", "margin_ptr": "*fp32", "weight_ptr": "*fp32", "temp_ptr": "*fp32",
    "stats_ptr": "*fp32", "part_ptr": "*fp32", "loss_ptr": "*fp32", "aux_ptr": "*fp32", "wsum_ptr": "*fp32",
    "counter_ptr": "*i32", "g_ptr": None, "E": "i32", "B": "i32", "C": "i32", "stride_ze": "i32", "stride_zb": "i32",
    "stride_ge": "i32", "stride_gb": "i32", "div_scale": "fp32", "grad_scale": "fp32",
}
_BWD = {
    "z_ptr": None, "target_ptr": "*i64", "margin_ptr": "*fp32", "weight_ptr": "*fp32", "temp_ptr": "*fp32",
    "stats_ptr": "*fp32", "aux_ptr": "*fp32", "go_ptr": "*fp32", "g_ptr": None, "E": "i32", "B": "i32", "C": "i32",
    "stride_ze": "i32", "stride_zb": "i32", "stride_ge": "i32", "stride_gb": "i32", "div_scale": "fp32",
    "written_scale": "fp32",
}
_CONSTEXPRS = ("HAS_MARGIN", "HAS_WEIGHT", "HAS_TEMP", "DIV_MODE", "E_BLOCK", "R", "V")
#: integer arguments declared multiples of 16 (besides the pointers) per stride layout
LAYOUTS = {
    "training": ("stride_ze", "stride_ge"),
    "padded": ("stride_ze", "stride_ge", "stride_zb", "stride_gb"),
    "unaligned": (),
}


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _arch_number(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise SystemExit(f"--arch must look like sm_90, got {arch!r}")
    return int(m.group(1))


def _compile(fn, signature, constexprs, num_warps, arch, divisible, maxnreg=None):
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in signature}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", _arch_number(arch), 32), options=options)


def ptxas_usage(ptx: str, arch: str) -> dict:
    """registers and spill bytes from `ptxas -v` on the kernel's PTX."""
    gpu = arch if arch.endswith("a") or _arch_number(arch) < 90 else arch + "a"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spills": (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
    }


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
#: a pipelined load (stages > 1): global to shared memory, its size in bytes the third operand
#: (e.g. "cp.async.cg.shared.global [ %r18 + 0 ], [ %rd21 + 0 ], 0x10, %r94;")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


_BARRIER = re.compile(r"^\s*(?:@%p\d+\s+)?(?:bar|barrier)\.sync\b", re.M)


def _width_bytes(suffixes: str) -> int:
    parts = suffixes.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfsu]\d+", p)), 32)
    return vec * bits // 8


# div.full / div.approx (and div.rn) of float32 run a MUFU reciprocal (1/T in the kernels)
_MUFU = re.compile(r"^\s*(?:@%p\d+\s+)?((ex2|lg2|rcp|rsqrt|sqrt)\.approx|div\.(full|approx|rn)\.(ftz\.)?f32)")
_ALU = re.compile(r"^\s*(?:@%p\d+\s+)?(add|sub|mul|fma|max|min|neg|abs|selp|setp|cvt|shfl|mov)\.[\w.]*f(16|32)\b|^\s*(?:@%p\d+\s+)?(shfl|selp)\.")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of each loop of the PTX, in order: from a block marked "Loop Header" to
    the branch back to it."""
    spans = []
    for header, line in enumerate(lines):
        if "Loop Header" not in line:
            continue
        start = next(i for i in range(header, -1, -1) if lines[i].startswith("$L__BB"))
        label = lines[start].split(":")[0].strip()
        end = next(i for i in range(header + 1, len(lines)) if re.search(rf"bra(?:\.uni)?\s+{re.escape(label)};", lines[i]))
        spans.append((start, end))
    return spans


def main_loop_accesses(ptx: str, hint: str) -> dict:
    """Widths (bytes) of the global loads / stores carrying `hint` in the main loop of the PTX,
    the widths of its pipelined loads (cp.async into shared memory: the loop runs with stages > 1;
    the logits' copies, and the per-class temperatures'), and its counts of MUFU instructions (ex2,
    lg2, rcp ...) and other float instructions. The main loop is the last loop with such accesses:
    the kernels run the masked rest of a row first and the forward's finishing loop reads without
    that hint."""
    lines = ptx.splitlines()

    def ours(x):
        m = _ACCESS.search(x)
        return (m and hint in m.group(2)) or _CP_ASYNC.search(x)

    spans = [(a, b) for a, b in _loops(lines) if any(ours(x) for x in lines[a:b + 1])]
    if not spans:
        return {"loads": [], "stores": [], "staged": [], "mufu": 0, "alu": 0}
    start, end = spans[-1]
    loads, stores, staged, mufu, alu = [], [], [], 0, 0
    for line in lines[start:end + 1]:
        m = _ACCESS.search(line)
        if m and hint in m.group(2):
            (loads if m.group(1) == "ld" else stores).append(_width_bytes(m.group(2)))
        c = _CP_ASYNC.search(line)
        if c:
            staged.append(int(c.group(1), 0))
        mufu += bool(_MUFU.search(line))
        alu += bool(_ALU.search(line))
    return {"loads": loads, "stores": stores, "staged": staged, "mufu": mufu, "alu": alu}


def _row(kernel, variant, gradient, compiled, arch, hint, elements_per_thread, budget):
    usage = ptxas_usage(compiled.asm["ptx"], arch)
    acc = main_loop_accesses(compiled.asm["ptx"], hint)
    vec = lambda widths: bool(widths) and all(w >= 8 for w in widths)  # noqa: E731
    # pipelined (stages > 1): the logits arrive by cp.async at the widest width of the loop's
    # copies; the temperatures' copies (4 bytes where a block's start is unaligned) are narrower
    logit_widths = acc["loads"]
    if not logit_widths and acc["staged"]:
        logit_widths = [w for w in acc["staged"] if w == max(acc["staged"])]
    vectorised = vec(logit_widths) and (vec(acc["stores"]) if kernel in ("bwd", "fwdgrad") else True)
    return {
        "kernel": kernel,
        "variant": variant,
        "gradient": gradient,
        "registers": usage["registers"],
        "spills": usage["spills"],
        # spill instructions inside the main loops (0 where nothing spills: no disassembly needed)
        "loop_spills": sass.loop_spills(sass.listing(compiled.asm["cubin"], ptxas_path())) if usage["spills"] else 0,
        "shared_bytes": int(compiled.metadata.shared),
        "barriers": len(_BARRIER.findall(compiled.asm["ptx"])),
        "num_warps": int(compiled.metadata.num_warps),
        "logit_loads": min(logit_widths) if logit_widths else None,
        "staged_loads": len(acc["staged"]),
        "grad_stores": min(acc["stores"]) if acc["stores"] else None,
        "vectorised": vectorised,
        "register_budget": budget,
        # per logit, in the main loop: exponentials (MUFU) and other float instructions
        "mufu_per_element": round(acc["mufu"] / elements_per_thread, 2),
        "alu_per_element": round(acc["alu"] / elements_per_thread, 2),
    }


def variant_rows(E: int, mode: str, dtype: str, phase: int, arch: str = "sm_90", classes: int = 8142,
                 layout: str = "training", kernels=("fwd", "bwd"), weight_sum: bool = False, stages: int = 1,
                 max_registers: int | None = None, grad_written: bool = False) -> list[dict]:
    """Compile the forward and/or backward kernel of one variant as the launcher would launch it
    (the gradient with the logits' strides, as the launcher allocates it for contiguous logits).
    weight_sum: the forward with the divisor passed in (a step split over ranks or micro-batches).
    stages, max_registers: the launchers' tuning overrides (stages > 1 loads the main loop's
    logits through shared memory with cp.async, read here as that loop's logit loads).
    kernels may name "fwdgrad": the forward that also writes the gradient (its row is that of the
    second pass, the gradient's); grad_written: the backward that returns at once where
    grad_output is the number the forward wrote the gradient for, which runs after it."""
    e_block = next_power_of_2(E)
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    terms = f"phase{phase}" if isinstance(phase, int) else phase
    margins, weights, temps = TERMS[terms]
    div = MODES[mode] if not (mode == "pairwise" and E == 1) else ride_loss._DIV_NONE  # as the launcher
    pairwise_temps = bool(temps and div == ride_loss._DIV_PAIRWISE)  # as the launcher passes HAS_TEMP
    r, v, warps = pick_tile(e_block, classes, itemsize, narrow=ride_loss.narrow_tile(e_block, itemsize, pairwise_temps))
    cx = dict(zip(_CONSTEXPRS, [margins, weights, temps and div != ride_loss._DIV_NONE, div, e_block, r, v]))
    divisible = _PTR_ARGS + LAYOUTS[layout]
    variant = (f"E{E}-{mode}-{dtype}-{terms}" + (f"-stages{stages}" if stages > 1 else "") + (f"-r{max_registers}" if max_registers else "")
               + ("-written" if grad_written else ""))
    budget = max_registers or ride_loss.register_budget(e_block, itemsize, pairwise_temps=pairwise_temps)
    rows = []
    for kernel in [k for k in ("fwd", "fwdgrad") if k in kernels]:
        write_grad = kernel == "fwdgrad"
        kbudget = max_registers or ride_loss.register_budget(e_block, itemsize, write_grad, margins, pairwise_temps)
        sig = dict(_FWD, z_ptr="*" + DTYPES[dtype], g_ptr="*" + DTYPES[dtype], FINISH_BLOCK="constexpr",
                   **{n: "constexpr" for n in _CONSTEXPRS})
        for n in ("HAS_WSUM", "STAGES", "WRITE_GRAD", "G_ALIGNED"):
            sig[n] = "constexpr"
        # the forward that writes the gradient needs the divisor up front: with DRW weights each
        # program sums it (a step split over ranks or micro-batches passes it: weight_sum)
        c = dict(cx, FINISH_BLOCK=ride_loss.finish_block(warps), HAS_WSUM=weight_sum, STAGES=stages,
                 WRITE_GRAD=write_grad, G_ALIGNED=write_grad)
        if E == 1:  # Triton specialises an integer argument equal to 1 into a constant
            sig["E"], c["E"] = "constexpr", 1
        k = _compile(ride_loss._ride_loss_fwd_kernel, sig, c, warps, arch, divisible, kbudget)
        # fwdgrad: the last loop with the logits' accesses is the gradient pass (the backward's hints)
        rows.append(_row(kernel, variant, write_grad, k, arch, "evict_first" if write_grad else "evict_last",
                         e_block * r * v / (32 * warps), kbudget))
    if "bwd" in kernels:
        sig = dict(_BWD, z_ptr="*" + DTYPES[dtype], g_ptr="*" + DTYPES[dtype], **{n: "constexpr" for n in _CONSTEXPRS})
        for n in ("G_ALIGNED", "STAGES", "GRAD_WRITTEN"):
            sig[n] = "constexpr"
        c = dict(cx, G_ALIGNED=True, STAGES=stages, GRAD_WRITTEN=grad_written)
        if E == 1:
            sig["E"], c["E"] = "constexpr", 1
        k = _compile(ride_loss._ride_loss_bwd_kernel, sig, c, warps, arch, divisible, budget)
        rows.append(_row("bwd", variant, True, k, arch, "evict_first", e_block * r * v / (32 * warps), budget))
    return rows


def launched_terms(E: int, mode: str, terms=tuple(TERMS)) -> list[str]:
    """The terms of `terms` that compile to distinct kernels for (E, mode): without a diversity
    term the launcher passes no temperatures, so those variants are the ones without them."""
    no_div = mode == "none" or (mode == "pairwise" and E == 1)
    return [t for t in terms if not (no_div and TERMS[t][2])]


def report(arch="sm_90", experts=range(1, 9), modes=("mean", "pairwise"), dtypes=("fp32", "bf16", "fp16"),
           phases=(0, 1), classes=8142, layout="training", kernels=("fwd", "bwd")) -> list[dict]:
    """Rows of every (E, mode, dtype, terms) variant; `phases` lists terms (0, 1 or TERMS keys);
    `kernels`, which kernels of each (see `variant_rows`)."""
    terms = [f"phase{p}" if isinstance(p, int) else p for p in phases]
    rows = []
    for E in experts:
        for mode in modes:
            for dtype in dtypes:
                for t in (terms if mode != "none" else launched_terms(E, mode, terms)):
                    rows += variant_rows(E, mode, dtype, t, arch, classes, layout, kernels)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_fast_kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (H100 / H200)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--classes", type=int, default=8142, help="C: sets the class block as the launcher does")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="training",
                        help="which strides are declared multiples of 16 (default training: the expert strides)")
    parser.add_argument("--experts", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--modes", default="mean,pairwise")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--terms", default="phase0,phase1", help=f"per-class vectors passed: all or some of {list(TERMS)}")
    parser.add_argument("--kernels", default="fwd,bwd", help="fwd, bwd and fwdgrad (the forward that also writes the gradient)")
    args = parser.parse_args(argv)
    if not os.path.exists(ptxas_path()):
        print(f"no ptxas at {ptxas_path()} (the triton wheel bundles one)", file=sys.stderr)
        return 2
    experts = [int(e) for e in args.experts.split(",")]
    modes = args.modes.split(",")
    dtypes = args.dtypes.split(",")
    terms = list(TERMS) if args.terms == "all" else args.terms.split(",")
    kernels = args.kernels.split(",")
    for what, values, valid in (("--modes", modes, MODES), ("--dtypes", dtypes, DTYPES), ("--terms", terms, TERMS),
                                ("--kernels", kernels, KERNELS)):
        bad = [v for v in values if v not in valid]
        if bad:
            print(f"{what}: unknown {bad}; valid: {sorted(valid)}", file=sys.stderr)
            return 2
    rows = report(args.arch, experts, modes, dtypes, terms, classes=args.classes, layout=args.layout, kernels=kernels)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["kernel", "variant", "gradient", "registers", "spills", "loop_spills", "shared_bytes", "barriers", "num_warps", "logit_loads", "grad_stores", "vectorised", "mufu_per_element", "alu_per_element"]
    print("  ".join(f"{c:>12}" if c != "variant" else f"{c:<30}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):>12}" if c != "variant" else f"{r[c]:<30}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
