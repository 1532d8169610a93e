"""The steps of the GPU check and the runner that gives each its own deadline.

    python benchmarks/gpu_steps.py --mode full|quick|dry --out DIR     (run through benchmarks/gpu_check.sh)

The runner imports every module the steps need (a missing one fails the check at once, named),
then runs each step in a forked child process under its deadline. Every measurement is appended
to DIR/rows.jsonl as one JSON line the moment it exists, so a step that is killed keeps the rows
it wrote; the runner then writes the step's `timed_out` row. Each row has `step` and `status`
(passed, failed, timed_out, skipped); `kind` says what it is:

    plan     the steps of the run, their deadlines and the mode's budget (written first)
    start    a step began (runner)
    end      a step finished: its status, seconds, deadline (runner)
    env      device, versions
    test     one pytest test (gpu_tests, dali)
    measure  one measurement; rows with a goal carry `target` (text) and `target_met`
    error    the exception that ended a step (failed; its message and traceback)

Modes: full (<= 500 s on an H100/H200), quick (<= 280 s, fewer repetitions and one compile
shape), dry (tiny sizes on the CPU, Triton through its interpreter; CUDA-only steps skipped).
`benchmarks/gpu_report.py DIR` turns the rows into DIR/report.md.

Test hooks (environment): RIDE_FAST_GPU_CHECK_STEPS=a,b runs only those steps;
RIDE_FAST_GPU_CHECK_DEADLINES=step=seconds,... replaces deadlines; RIDE_FAST_GPU_CHECK_FAULT=step:raise
or step:hang makes that step fail, or hang, right after its first measurement row.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from _results import _jsonable, bf16_dense_tflops  # benchmarks/ is on the path: this file runs from there

ROOT = Path(__file__).resolve().parents[1]

STATUSES = ("passed", "failed", "timed_out", "skipped")
#: imported before the first step; a failure names the module and stops the check
REQUIRED = ("numpy", "yaml", "PIL", "torch", "triton", "pytest", "pytest_benchmark", "fvcore.nn", "iopath", "ride_fast",
            "ride_fast.engine", "ride_fast_kernels")

#: per-step deadlines in seconds: (full, quick, dry). full sums to <= 540 s and quick to <= 320 s,
#: the check's budget on an H100/H200, compiles included (Triton's and inductor's caches start
#: empty on a fresh machine). The full column is what each step took on an H200 plus about 10 %;
#: gpu_tests there compiles 24 kernel variants (~100 s) before the compiled-graph tests (~30 s);
#: loss_bench has 70 s more for the kernel variants it times beside the defaults (20 compiles, and
#: each variant's kernels timed apart by the profiler, the forward also on fewer rows).
#: The quick column is what --quick's steps took there, rounded up. dry only bounds a broken CPU
#: run (it takes about 90 s).
DEADLINES: dict[str, tuple[float, float, float]] = {
    "env": (5, 5, 30),
    "gpu_tests": (160, 42, 60),
    "loss_bench": (130, 105, 60),
    "trainer_compile": (56, 40, 60),
    "trainer_cuda_graphs": (26, 16, 30),
    "amp_fp16": (36, 22, 60),
    "r50": (50, 35, 60),
    "routed": (8, 5, 60),
    "ddp_nccl": (28, 20, 90),
    "e8": (16, 10, 60),
    "dali": (6, 4, 30),
}
BUDGET_S = {"full": 540, "quick": 320, "dry": 60}
STARTUP_S = 10  # the runner's imports and the report, on top of the steps' deadlines


@dataclass(frozen=True)
class Sizes:
    """What each mode runs: shapes, repetitions, steps."""

    device: str
    loss_shapes: tuple  # (B, E, C)
    compile_shapes: tuple  # the loss shapes torch.compile is timed at
    loss_iters: int  # timed iterations per loss case (x4 for the small shape)
    px: int  # CIFAR-size image side of the trainer steps
    classes: int
    per_class_max: int  # long-tailed training set: max images per class
    batch: int
    epochs: int
    steps_per_epoch: int
    fp16_steps: int
    r50_px: int
    r50_batch: int
    r50_iters: int
    routed_batch: int
    ddp_steps: int
    e8_steps: int


SIZES = {
    "full": Sizes("cuda", ((512, 4, 8142), (256, 4, 1000)), ((512, 4, 8142), (256, 4, 1000)), 50, 32, 100, 500, 128, 3, 80,
                  200, 224, 128, 20, 8192, 20, 30),
    "quick": Sizes("cuda", ((512, 4, 8142), (256, 4, 1000)), ((512, 4, 8142),), 20, 32, 100, 500, 128, 2, 50,
                   100, 224, 128, 8, 8192, 14, 10),
    "dry": Sizes("cpu", ((4, 4, 24),), ((4, 4, 24),), 2, 16, 10, 30, 8, 2, 2, 3, 32, 2, 1, 8, 2, 1),
}


# --------------------------------------------------------------------------------------- rows

# the test hook "hang_in_launcher": a launcher like torchrun, whose worker runs in a session of its
# own and which stops that worker when it is sent SIGTERM; the worker's pid goes to the file argv[1]
_HANGING_LAUNCHER = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(worker.pid))
def stop(*_):
    worker.terminate()
    worker.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(3600)
"""


class Rows:
    """Appends rows to DIR/rows.jsonl, one line each, written through at once (a killed step keeps
    what it wrote). A line is one write() on a file opened for appending, so rows of the runner and
    of a step never interleave."""

    def __init__(self, out: Path, step: str, fault: str = ""):
        self.path = Path(out) / "rows.jsonl"
        self.step = step
        self.fault = fault  # "raise", "hang" or "hang_in_launcher": the test hook, after the first measurement row
        self.written: list[dict] = []

    def write(self, status: str = "passed", **fields: Any) -> dict:
        assert status in STATUSES, status
        row = {"step": self.step, "status": status, **fields}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
            fh.flush()
        self.written.append(row)
        if self.fault and fields.get("kind") in ("measure", "test", "env"):
            fault, self.fault = self.fault, ""
            if fault == "hang":
                time.sleep(3600)
            if fault == "hang_in_launcher":
                subprocess.run([sys.executable, "-c", _HANGING_LAUNCHER, str(self.path.parent / "worker.pid")], check=False)
            raise RuntimeError(f"fault injected by RIDE_FAST_GPU_CHECK_FAULT={self.step}:{fault}")
        return row

    def measure(self, status: str = "passed", **fields: Any) -> dict:
        return self.write(status, kind="measure", **fields)


def read_rows(out: Path) -> list[dict]:
    """Rows of DIR/rows.jsonl; a line cut short by a kill is left out."""
    path = Path(out) / "rows.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


# --------------------------------------------------------------------------------------- timing

GRAPH_CALLS = 10  # calls captured in one CUDA graph (one graph launch per 10 calls)


def time_per_iter(fn: Callable[[], Any], iters: int, device, warmup: int = 3, graph: bool = True) -> dict:
    """Seconds per call of `fn`, no host sync inside the timed loop.

    CUDA: `stream_s` from CUDA events around `iters` back-to-back calls (the host's launch cost is
    in it when the host is the slower side); with graph=True also `graph_s` from GRAPH_CALLS calls
    captured once in a CUDA graph and replayed until about `iters` calls ran (the GPU's own time;
    None when the calls cannot be captured, with `graph_error`). CPU: wall clock around the loop.
    `s` is graph_s when there is one, else stream_s."""
    import torch

    from ride_fast.engine.step_graph import CudaGraphBackend

    cuda = torch.device(device).type == "cuda"
    if not cuda:
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        s = (time.perf_counter() - t) / iters
        return {"s": s, "stream_s": s, "graph_s": None, "iters": iters}
    backend = CudaGraphBackend(device)  # the engine's capture: a failed one leaves the current stream as it was
    with backend.warmup():  # on the capture stream, as graph capture wants
        for _ in range(warmup):
            fn()
    fn()  # and once on the timed stream: the allocator keeps a pool per stream, so it is filled before timing
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    out = {"stream_s": start.elapsed_time(end) / 1e3 / iters, "graph_s": None, "iters": iters}
    out["s"] = out["stream_s"]
    if not graph:
        return out
    torch.cuda.set_sync_debug_mode("error")  # a call that synchronises with the host cannot be captured
    try:
        fn()
    except RuntimeError as err:
        out["graph_error"] = f"not captured, the call synchronises with the host: {str(err).splitlines()[0][:200]}"
        return out
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        captured, _ = backend.capture(lambda: [fn() for _ in range(GRAPH_CALLS)])
        captured.replay()
        torch.cuda.synchronize()
        replays = max(1, iters // GRAPH_CALLS)
        start.record()
        for _ in range(replays):
            captured.replay()
        end.record()
        end.synchronize()
        out["graph_s"] = start.elapsed_time(end) / 1e3 / (replays * GRAPH_CALLS)
    except Exception as err:  # some calls cannot be captured: keep the stream timing
        out["graph_error"] = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        torch.cuda.synchronize()
    out["s"] = out["graph_s"] or out["stream_s"]
    return out


def rotation(call_bytes: int, device) -> int:
    """How many copies of a call's inputs to cycle through so that, between two uses of one copy,
    the other calls move at least twice the GPU's L2 (its data is gone from there by then). 2 on
    the CPU, where only the code path matters."""
    import torch

    if torch.device(device).type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 50 * 2**20
    return 1 + -(-2 * l2 // call_bytes)


def copy_bandwidth(device, nbytes: int, iters: int) -> dict:
    """Achievable memory bandwidth: a device-to-device copy of `nbytes`, bytes read + written per second."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_per_iter(lambda: dst.copy_(src), iters, device, warmup=1, graph=False)
    moved = 2 * src.numel() * 4
    del src, dst
    return {"bytes": moved, "ms": t["stream_s"] * 1e3, "gbps": moved / t["stream_s"] / 1e9}


# --------------------------------------------------------------------------------------- data and models

def long_tailed_counts(classes: int, per_class_max: int, seed: int = 0):
    import torch

    from ride_fast.losses.synthetic import long_tailed_counts as counts

    return counts(classes, torch.Generator().manual_seed(seed), per_class_max)


def synthetic_cifar(classes: int, per_class_max: int, px: int, seed: int = 0, test_per_class: int = 10):
    """(train, test) ArrayDatasets of CIFAR size: a random template per class plus noise, long-tailed
    training counts (max per_class_max), a balanced test set. Learnable in a few hundred steps."""
    import torch

    from ride_fast.data import ArrayDataset
    from ride_fast.data.cifar import CIFAR_MEAN, CIFAR_STD

    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (classes, 3, px, px), generator=g).float()

    def make(labels, name, rotate):
        noise = torch.randn(len(labels), 3, px, px, generator=g) * 40
        images = (0.6 * templates[labels] + 50 + noise).clamp(0, 255).to(torch.uint8)
        return ArrayDataset(images, labels, classes, CIFAR_MEAN, CIFAR_STD, name, flip=True, rotate=rotate)

    counts = long_tailed_counts(classes, per_class_max, seed)
    train = make(torch.repeat_interleave(torch.arange(classes), counts), "synthetic_cifar/train", 15.0)
    test = make(torch.arange(classes).repeat(test_per_class), "synthetic_cifar/test", 0.0)
    return train, test


def write_cifar100_pickles(root: Path, train, test) -> None:
    """The data sets as the CIFAR-100 python files (`data.name=cifar100_lt data.root=root`)."""
    import pickle

    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ds in (("train", train), ("test", test)):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": ds.images.reshape(len(ds), -1).numpy(), b"fine_labels": ds.labels.tolist()}, fh)


def trainer_config(sizes: Sizes, out_dir: Path, *overrides: str):
    from ride_fast.config import load_config

    base = [f"train.device={sizes.device}", f"train.out_dir={out_dir}", f"train.epochs={sizes.epochs}",
            f"train.max_steps_per_epoch={sizes.steps_per_epoch}", "train.progress=false", "train.tensorboard=false",
            "train.handle_signals=false", "train.keep_last=1", "optim.warmup_epochs=0", "optim.lr=0.05",
            f"data.batch_size={sizes.batch}", "data.eval_batch_size=1024", f"data.image_size={sizes.px}", "train.amp=bf16"]
    return load_config(None, [*base, *overrides])


# --------------------------------------------------------------------------------------- steps

def step_env(rows: Rows, sizes: Sizes, mode: str) -> None:
    import platform

    import torch
    import triton

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                            "cuda": torch.version.cuda, "mode": mode}
    if sizes.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible to torch: run the check on a GPU machine, or with --cpu-dry-run")
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(0)))
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a torch built without NCCL: the ddp_nccl step says so
            info["nccl"] = None
    else:
        info.update(gpu=None, device="cpu", triton_interpret=os.environ.get("TRITON_INTERPRET"))
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except Exception:  # optional: the dali step says "not installed"
        info["dali"] = None
    # Triton builds each kernel's launcher on the machine (triton/runtime/build.py): with $CC, else gcc,
    # else clang, and CPython's headers from the default install scheme (Debian's posix_local read as posix_prefix)
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    info["c_compiler"] = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    info["python_h"] = Path(include, "Python.h").exists()
    rows.write(kind="env", **info)
    if sizes.device == "cuda" and not (info["c_compiler"] and info["python_h"]):
        lacking = " and ".join(x for x, ok in (("a C compiler ($CC, gcc or clang)", info["c_compiler"]),
                                               (f"Python.h in {include}", info["python_h"])) if not ok)
        raise RuntimeError(f"Triton cannot build its kernel launchers here: this machine lacks {lacking}")


class _PytestRows:
    """A pytest plugin: one row per test, written when its outcome is known."""

    def __init__(self, rows: Rows):
        self.rows = rows
        self.done: set[str] = set()

    def pytest_runtest_logreport(self, report):
        if report.nodeid in self.done:
            return
        if report.when == "call" or report.outcome in ("failed", "skipped"):
            self.done.add(report.nodeid)
            reason = ""
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2]).removeprefix("Skipped: ")
            elif report.outcome == "failed":
                reason = (getattr(report, "longreprtext", "") or "").strip().splitlines()[-1:] or [""]
                reason = reason[0][:300]
            self.rows.write(report.outcome, kind="test", test=report.nodeid, seconds=round(report.duration, 3), reason=reason)


def run_pytest(rows: Rows, args: list[str]) -> None:
    """pytest in this process (the step's child), a row per test; a run that could not test fails the step."""
    import pytest

    plugin = _PytestRows(rows)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "pytest_benchmark.plugin", "--benchmark-disable", *args],
                     plugins=[plugin])
    if int(rc) not in (0, 1, 5) or (int(rc) == 1 and not any(r["status"] == "failed" for r in rows.written)):
        rows.write("failed", kind="test", test="(pytest)", reason=f"pytest exit code {int(rc)} (a collection or usage error)")


GPU_TEST_FILES = ["tests/kernels/test_ride_loss_triton.py", "tests/ops/test_ops_ride_loss_analytic.py",
                  "tests/losses/test_losses_ride_compile.py", "tests/engine/test_engine_step.py",
                  "tests/engine/test_engine_step_graph.py", "tests/data/test_data_loaders.py"]
DALI_TEST = "tests/data/test_data_loaders.py::test_dali_mixed_decoding_on_the_gpu"


def step_gpu_tests(rows: Rows, sizes: Sizes, mode: str) -> None:
    """Every `gpu`-marked test; the fused-loss kernels at full size. The captured-step test in fp16
    only (GradScaler inside the graph; the bf16 step is captured by trainer_cuda_graphs and
    ddp_nccl, and each precision compiles kernels of its own); model + loss traced without a graph
    break in two (phase, mode) cases that cover both phases and both modes. quick: fp32 and bf16 at
    two shapes, and no compiled or captured-step test (trainer_cuda_graphs covers that path)."""
    args = ["-m", "gpu", *GPU_TEST_FILES, "--deselect", DALI_TEST]
    if mode == "quick":
        args += ["-k", ("(not test_gpu_full_size or ((B512-E4-C8142 or B512-E8-C1000) and not fp16)) and not cuda_graphs_match_eager "
                        "and not captured_step_trains and not fullgraph_compile_with_the_triton_kernels")]
    else:
        args += ["-k", "(not captured_step_trains or fp16) and (not fullgraph_compile_with_the_triton_kernels or 0-mean or 1-pairwise)"]
    run_pytest(rows, args)


def step_loss_bench(rows: Rows, sizes: Sizes, mode: str) -> None:
    """Copy bandwidth, then the RIDE loss forward + backward per (shape, dtype, mode, provider)."""
    import torch
    from loss_traffic import GPUS, SETTINGS, model as traffic_model
    from test_bench_ride_loss import LAMBDA, TM, ride_inputs

    from ride_fast.ops import ride_loss_fused, ride_loss_reference
    from ride_fast.ops.ride_loss_design import fused_loss_design

    dev = sizes.device
    copy = copy_bandwidth(dev, (1 << 30) + (1 << 28) if dev == "cuda" else 1 << 23, 20 if dev == "cuda" else 3)
    rows.measure(case="copy", **copy)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    gpu_model = GPUS["h100"] if "H100" in name else GPUS["h200"]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(ride_loss_reference, dynamic=False, **({} if dev == "cuda" else {"backend": "eager"}))
    providers = {"eager": ride_loss_reference, "compile": compiled, "fused": ride_loss_fused}
    for B, E, C in sizes.loss_shapes:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            z, y, m, w, t = ride_inputs(B, E, C, dtype, device=dev)
            z.requires_grad_()
            floor_bytes = 2 * E * B * C * z.element_size()
            # calls cycle through copies of the logits, so that none finds the last one's rows still in
            # the L2 (the traffic model reads every call's logits from DRAM)
            copies = [z] + [z.detach().clone().requires_grad_() for _ in range(rotation(floor_bytes, dev) - 1)]
            turn = itertools.count()
            for div in ("mean", "pairwise"):
                # the traffic model's prediction for a launch setting (its SETTINGS carry the check's variant names)
                def predict(setting="default", shape=(B, E, C), dtype="float32" if dtype_name == "fp32" else "bfloat16", div=div):
                    return traffic_model(*shape, dtype, div, gpu_model, phase=1, **SETTINGS[setting])

                # the fused loss as a step runs it: the design the op takes for these logits (the
                # model's setting of that name: "gradfwd" where the forward writes the gradient)
                design = fused_loss_design(z)
                pred = predict("gradfwd" if design == "grad_in_forward" else "default")
                times, losses = {}, {}
                for provider, fn in providers.items():
                    if provider == "compile" and (B, E, C) not in sizes.compile_shapes:
                        continue

                    def step(fn=fn, copies=copies, turn=turn):
                        zc = copies[next(turn) % len(copies)]
                        zc.grad = None
                        fn(zc, y, m, w, t, LAMBDA, TM, div).backward()

                    z.grad = None
                    losses[provider] = float(fn(z, y, m, w, t, LAMBDA, TM, div))
                    timing = time_per_iter(step, sizes.loss_iters * (4 if B * C < 1e6 else 1), dev, warmup=3 if dev == "cuda" else 0)
                    times[provider] = timing
                    gbps = floor_bytes / timing["s"] / 1e9
                    pct = pct_of_copy(floor_bytes, timing["s"], copy["gbps"])
                    row = {"case": f"B{B}-E{E}-C{C}-{dtype_name}-{div}", "provider": provider, "B": B, "E": E, "C": C,
                           "dtype": dtype_name, "diversity": div, "ms": timing["s"] * 1e3, "ms_stream": timing["stream_s"] * 1e3,
                           "ms_graph": None if timing["graph_s"] is None else timing["graph_s"] * 1e3,
                           "graph_error": timing.get("graph_error"), "timed_by": _timed_by(timing), "gbps": gbps, "floor_bytes": floor_bytes,
                           "pct_copy_bw": pct, "pct_floor_time": pct, "loss": losses[provider],
                           "predicted_pct_floor": 100 * pred["fraction_of_floor"], "predicted_for": gpu_model.name}
                    ok = math.isfinite(losses[provider]) and abs(losses[provider] - losses["eager"]) <= 1e-2 * max(1.0, abs(losses["eager"]))
                    if provider == "fused":
                        if dev == "cuda":
                            row.update(fused_kernel_row(kernel_times_us(step, 20), floor_bytes, copy["gbps"], pred))
                        x_compile = _speedup(times["compile"], timing) if "compile" in times else None
                        floor_goal, floor_text = _floor_goal(B, E, C, dtype_name)
                        row.update(design=design, x_eager=_speedup(times["eager"], timing), x_compile=x_compile,
                                   target=f"fused {floor_text}, >= 10x eager, "
                                          + (">= 2x compile" if x_compile is not None else "(compile not timed at this shape)"),
                                   target_met=bool(pct >= floor_goal and row["x_eager"] >= 10 and (x_compile is None or x_compile >= 2)))
                    rows.measure("passed" if ok else "failed", **row, rotated_copies=len(copies),
                                 **({} if ok else {"reason": f"loss {losses[provider]} vs eager {losses['eager']}"}))
                # "mean" only (each variant compiles kernels of its own); the interpreter: one case
                if div == "mean" and (dev == "cuda" or dtype_name == "fp32"):
                    kernel_variants(rows, copies, y, m, w, t, div, floor_bytes, copy["gbps"], sizes, predict)
            del z, copies


def kernel_times_us(fn: Callable[[], Any], iters: int) -> dict[str, float]:
    """Microseconds per call of each CUDA kernel that `fn` launches, from the profiler's device
    times over `iters` calls (after one untimed call): where a fused loss's time goes, kernel by
    kernel, without the host or the gaps between launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.name] = times.get(event.name, 0.0) + event.device_time_total / iters
    return times


def kernel_us(times: dict[str, float], kernel: str) -> float:
    """Microseconds a call of the kernels whose names contain `kernel` (`kernel_times_us`'s times)."""
    return sum(us for name, us in times.items() if kernel in name)


def pct_of_copy(nbytes: float, seconds: float, copy_gbps: float) -> float:
    """`nbytes` moved in `seconds`, as a percentage of the copy bandwidth (GB/s, read + written)."""
    return 100 * nbytes / seconds / 1e9 / copy_gbps


def fused_kernel_row(times: dict[str, float], floor_bytes: int, copy_gbps: float, pred: dict) -> dict:
    """The forward and backward kernels' times against the copy bandwidth (the forward reads the
    logits, half the floor bytes; the backward reads them and writes the gradient, all of them)
    and against the traffic model's time for each."""
    fwd, bwd = kernel_us(times, "_ride_loss_fwd"), kernel_us(times, "_ride_loss_bwd")
    other = sum(times.values()) - fwd - bwd
    pct = lambda b, us: pct_of_copy(b, us * 1e-6, copy_gbps) if us else None  # noqa: E731
    return {"fwd_kernel_us": fwd, "bwd_kernel_us": bwd, "other_kernels_us": other,
            "fwd_pct_copy_bw": pct(floor_bytes / 2, fwd), "bwd_pct_copy_bw": pct(floor_bytes, bwd),
            "predicted_fwd_us": pred["fwd_us"], "predicted_bwd_us": pred["bwd_us"]}


#: the fused kernels' launch-time alternatives timed beside the defaults (kernels/ride_loss.py):
#: "stages2" runs the main loop's loads a block ahead through shared memory (cp.async), so that a
#: program keeps two tiles in flight; "regs64" caps the registers at 64, four 8-warp programs an
#: SM instead of three, so that 512 rows run in one wave of programs, not two; "gradfwd" has the
#: forward write the gradient in a second pass over each row, right after the first (from L2), and
#: the backward return at once where grad_output is 1: the logits cross DRAM once, not twice
KERNEL_VARIANTS = {"stages2": {"stages": 2}, "regs64": {"max_registers": 64}, "stages2-regs64": {"stages": 2, "max_registers": 64},
                   "gradfwd": {"gradfwd": True}, "gradfwd-regs64": {"gradfwd": True, "max_registers": 64}}


def kernel_variants(rows: Rows, copies: list, y, m, w, t, div: str, floor_bytes: int, copy_gbps: float, sizes: Sizes,
                    predict: Callable[[str], dict]) -> None:
    """The fused loss's two kernels launched directly (no autograd) with the defaults and with each
    of KERNEL_VARIANTS: the time, % of the floor, and the default's time over the variant's (> 1:
    the variant is faster), beside the traffic model's prediction for that setting (`predict`, by
    the variant's name). The gradient of each variant must equal the default's bit for bit (every
    variant divides by the same weight sum, passed in, as the "gradfwd" forward needs)."""
    import torch
    from test_bench_ride_loss import LAMBDA, TM

    from ride_fast_kernels.ride_loss import ride_loss_backward, ride_loss_forward

    z0 = copies[0]
    E, B, C = z0.shape
    dtype_name = "fp32" if z0.dtype == torch.float32 else "bf16"
    case = f"B{B}-E{E}-C{C}-{dtype_name}-{div}"
    go = torch.ones((), device=z0.device)
    turn = itertools.count()
    wsum = None if w is None else w[y].sum().reshape(1)

    def grad_of(z, gradfwd=False, between=None, **tuning):
        g = torch.empty_like(z) if gradfwd else None
        _, stats, aux = ride_loss_forward(z, y, m, w, t, LAMBDA, TM, div, weight_sum=wsum, grad_out=g, **tuning)
        if between is not None:
            between()
        return ride_loss_backward(go, z, y, m, w, t, stats, aux, LAMBDA, TM, div, grad_out=g, grad_written=gradfwd, **tuning)

    def launcher(**tuning):  # each call on the next copy of the logits, as the providers' calls
        return lambda: grad_of(copies[next(turn) % len(copies)].detach(), **tuning)

    def timed(**tuning):
        return time_per_iter(launcher(**tuning), sizes.loss_iters * (4 if B * C < 1e6 else 1), sizes.device,
                             warmup=3 if sizes.device == "cuda" else 0)

    reference = grad_of(z0.detach())
    base = timed()
    for name, tuning in {"default": {}, **KERNEL_VARIANTS}.items():
        try:
            timing = base if name == "default" else timed(**tuning)
            same = bool(torch.equal(grad_of(z0.detach(), **tuning), reference))
            split = kernel_split(launcher(**tuning), floor_bytes, copy_gbps) if sizes.device == "cuda" else {}
            if name == "default" and sizes.device == "cuda":
                split.update(l2_probe(grad_of, copies, turn))
            if name in ("default", "regs64") and sizes.device == "cuda" and B == 512:
                split.update(wave_probe(copies, turn, y, m, w, t, div, wsum, **tuning))
        except Exception as exc:  # a variant that does not compile or launch here is a finding, not a failed step
            rows.measure("failed", case=case, provider=f"kernels-{name}", dtype=dtype_name, diversity=div,
                         reason=f"{type(exc).__name__}: {exc}"[:300])
            continue
        pct = pct_of_copy(floor_bytes, timing["s"], copy_gbps)
        pred = predict(name)
        rows.measure("passed" if same else "failed", case=case, provider=f"kernels-{name}", B=B, E=E, C=C, dtype=dtype_name, diversity=div,
                     ms=timing["s"] * 1e3, ms_stream=timing["stream_s"] * 1e3, timed_by=_timed_by(timing),
                     pct_copy_bw=pct, pct_floor_time=pct, x_default=_speedup(base, timing), **tuning, **split,
                     predicted_pct_floor=100 * pred["fraction_of_floor"], predicted_fwd_us=pred["fwd_us"], predicted_bwd_us=pred["bwd_us"],
                     same_gradient_as_default=same, **({} if same else {"reason": "its gradient differs from the default's"}))


def kernel_split(launch: Callable[[], Any], floor_bytes: int, copy_gbps: float) -> dict:
    """A variant's forward and backward kernels apart (profiler device times, us a call): with the
    gradient written by the forward, its forward's time is both passes' and its backward's the
    early return's."""
    times = kernel_times_us(launch, 10)
    fwd, bwd = kernel_us(times, "_ride_loss_fwd"), kernel_us(times, "_ride_loss_bwd")
    return {"fwd_kernel_us": fwd, "bwd_kernel_us": bwd, "kernels_pct_copy_bw": pct_of_copy(floor_bytes, (fwd + bwd) * 1e-6, copy_gbps)}


def wave_probe(copies: list, turn, y, m, w, t, div: str, wsum, **tuning) -> dict:
    """The forward kernel alone on the first 128, 384 and all 512 rows of the logits (the same
    compiled kernel: the row count is a multiple of 16 each time): one program an SM, one wave of
    three (four at 64 registers) an SM, and two waves. What separates a program's fixed latency
    from its streaming rate when the traffic model is fitted again."""
    from test_bench_ride_loss import LAMBDA, TM

    from ride_fast_kernels.ride_loss import ride_loss_forward

    out = {}
    for rows in (128, 384, 512):
        def forward(rows=rows):
            z = copies[next(turn) % len(copies)].detach()[:, :rows]
            ride_loss_forward(z, y[:rows], m, w, t, LAMBDA, TM, div, weight_sum=wsum, **tuning)
        times = kernel_times_us(forward, 10)
        out[f"fwd_kernel_us_rows{rows}"] = kernel_us(times, "_ride_loss_fwd")
    return out


def l2_probe(grad_of: Callable[..., Any], copies: list, turn) -> dict:
    """The default backward's kernel time with 2 x 128 MB copied between it and the forward, which
    leaves nothing of the forward's rows in L2: against its time right after the forward (the
    default row's bwd_kernel_us), what the L2 gives it. Equal times: the backward's second read of
    the logits comes from DRAM either way."""
    import torch

    src = torch.empty(1 << 27, dtype=torch.uint8, device=copies[0].device)
    dst = torch.empty_like(src)
    scrub = lambda: dst.copy_(src)  # noqa: E731
    times = kernel_times_us(lambda: grad_of(copies[next(turn) % len(copies)].detach(), between=scrub), 10)
    return {"bwd_kernel_us_after_scrub": kernel_us(times, "_ride_loss_bwd")}


def _timed_by(timing: dict) -> str:
    """Which clock `timing["s"]` is: the CUDA-graph replay, or back-to-back launches (the CPU's wall clock there)."""
    return "graph" if timing.get("graph_s") else "stream"


def _speedup(baseline: dict, contender: dict) -> float:
    """baseline time / contender time, both on the same clock: graph replays when both were
    captured, else back-to-back launches."""
    if baseline.get("graph_s") and contender.get("graph_s"):
        return baseline["graph_s"] / contender["graph_s"]
    return baseline["stream_s"] / contender["stream_s"]


#: the fused loss's goal at shapes where two launches' fixed cost is most of the floor time
#: (BENCHMARKS.md): 85 % of what a design bound by that cost alone reaches, 1 us a kernel on an
#: H100 / H200 against a floor of 1.9 us (float32) or 1.0 us (bfloat16) at (256, 4, 1000)
LAUNCH_BOUND_GOAL_PCT = {(256, 4, 1000): {"fp32": 0.85 * 43.0, "bf16": 0.85 * 29.0}}


def _floor_goal(B: int, E: int, C: int, dtype_name: str) -> tuple[float, str]:
    """(least % of the floor time, its words) for the fused loss at a shape: 70 %, or at a
    launch-bound shape (LAUNCH_BOUND_GOAL_PCT) the share its launches' fixed cost leaves."""
    bound = LAUNCH_BOUND_GOAL_PCT.get((B, E, C), {}).get(dtype_name)
    if bound is None:
        return 70.0, ">= 70% of the floor"
    return bound, f">= {bound:.0f}% of the floor (launch-bound shape: 85% of two 1-us launches' bound)"


MIN_STEPS_FALLING = 50  # the trainer's mean epoch loss must fall over runs at least this long


def _trainer_run(rows: Rows, sizes: Sizes, case: str, *overrides: str, goal: float | None = None) -> dict:
    """The real Trainer on synthetic CIFAR-size data; a row with the epochs' losses and images/s."""
    from ride_fast.engine.trainer import Trainer

    train, test = synthetic_cifar(sizes.classes, sizes.per_class_max, sizes.px)
    start = time.perf_counter()

    def progress(line: str) -> None:  # one row an epoch: a step killed at its deadline still shows how far it got
        if line.startswith("epoch"):
            rows.write("passed", kind="progress", case=case, line=line, elapsed_s=round(time.perf_counter() - start, 1))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(trainer_config(sizes, Path(tmp), *overrides), train_set=train, test_set=test, log=progress)
        t0 = time.perf_counter()
        summary = trainer.fit()
        seconds = time.perf_counter() - t0
    hist = summary["history"]
    losses = [h["loss"] for h in hist]
    finite = all(math.isfinite(x) for x in losses) and not any(h["nonfinite_steps"] for h in hist)
    falling = len(losses) >= 2 and losses[-1] < losses[0]
    steps = sizes.epochs * sizes.steps_per_epoch
    must_fall = steps >= MIN_STEPS_FALLING  # a few steps of the dry run are noise
    ips = hist[-1]["images_per_s"]
    fields = dict(case=case, loss_path=trainer.loss_path, amp=trainer.amp, epoch_losses=losses,
                  images_per_s_by_epoch=[h["images_per_s"] for h in hist], images_per_s=ips,
                  steps=steps, batch=sizes.batch, seconds=seconds, finite=finite, falling=falling, falling_required=must_fall,
                  test_acc=hist[-1].get("test", {}).get("overall"))
    if goal is not None:
        fields.update(target=f"RIDE-R32 E=3 >= {goal:,.0f} images/s", target_met=bool(ips >= goal))
    status = "passed" if finite and (falling or not must_fall) else "failed"
    return rows.measure(status, **fields, **({} if status == "passed" else {"reason": "loss not finite or not falling"}))


def step_trainer_compile(rows: Rows, sizes: Sizes, mode: str) -> None:
    """Trainer, bf16, train.compile (dry run: compile off; inductor on the CPU takes minutes)."""
    compile_flag = "true" if sizes.device == "cuda" else "false"
    _trainer_run(rows, sizes, "resnet32-e3-bf16-compile", f"train.compile={compile_flag}", goal=30000)


def step_trainer_cuda_graphs(rows: Rows, sizes: Sizes, mode: str) -> None:
    """Trainer, bf16, train.compile and train.cuda_graphs: against trainer_compile's row, what
    capturing the whole step adds (inductor's caches are warm from that step)."""
    if sizes.device != "cuda":
        rows.write("skipped", kind="measure", case="resnet32-e3-bf16-compile-cuda_graphs", reason="needs CUDA (train.cuda_graphs)")
        return
    _trainer_run(rows, sizes, "resnet32-e3-bf16-compile-cuda_graphs", "train.compile=true", "train.cuda_graphs=true", goal=30000)


FP16_SETTLE_STEPS = 10  # GradScaler may lower its scale (skip a step) this many steps at the start
FP16_FIRST_LOSS_RTOL = 0.02  # same weights, same batch: fp16 and bf16 autocast agree on the first loss
FP16_END_LOSS_RTOL = 0.10  # mean loss of the last quarter of the steps, fp16 against bf16


def _loss_trajectory(sizes: Sizes, amp: str, steps: int) -> dict:
    """Per-step losses (and GradScaler scales) of the Trainer's step, eager, on synthetic data."""
    from ride_fast.engine.step import prefetch_to_device
    from ride_fast.engine.trainer import Trainer

    train, test = synthetic_cifar(sizes.classes, sizes.per_class_max, sizes.px)
    impl = "loss.impl=triton"  # the fused kernels (through the interpreter on the CPU)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(trainer_config(sizes, Path(tmp), f"train.amp={amp}", impl), train_set=train, test_set=test, log=lambda s: None)
        losses, scales, epoch = [], [], 0
        trainer.train_model.train()
        while len(losses) < steps:
            epoch += 1
            trainer.set_epoch_lr(epoch)
            trainer.criterion.set_epoch(epoch)
            trainer.train_loader.set_epoch(epoch)
            for batch in prefetch_to_device(trainer.train_loader, trainer.device):
                losses.append(float(trainer.step(batch.images, batch.labels)))
                scales.append(float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else 1.0)
                if len(losses) == steps:
                    break
        return {"losses": losses, "scales": scales, "loss_path": trainer.loss_path, "amp": trainer.amp}


def step_amp_fp16(rows: Rows, sizes: Sizes, mode: str) -> None:
    """fp16 + GradScaler through the fused loss against bf16: no skipped step after the first few,
    the same first loss (same weights and batch) and the same loss level at the end."""
    n = sizes.fp16_steps
    bf16 = _loss_trajectory(sizes, "bf16", n)
    fp16 = _loss_trajectory(sizes, "fp16", n)
    skipped = [i for i in range(1, n) if fp16["scales"][i] < fp16["scales"][i - 1]]
    late = [i for i in skipped if i >= FP16_SETTLE_STEPS]
    tail = max(1, n // 4)
    end_bf16, end_fp16 = statistics.fmean(bf16["losses"][-tail:]), statistics.fmean(fp16["losses"][-tail:])
    first_rel = abs(fp16["losses"][0] - bf16["losses"][0]) / abs(bf16["losses"][0])
    end_rel = abs(end_fp16 - end_bf16) / abs(end_bf16)
    finite = all(math.isfinite(x) for x in fp16["losses"] + bf16["losses"])
    end_checked = n >= MIN_STEPS_FALLING  # a few steps of the dry run are noise
    problems = [text for bad, text in (
        (not finite, "a loss is not finite"), (late, f"GradScaler skipped steps {late} after step {FP16_SETTLE_STEPS}"),
        (first_rel > FP16_FIRST_LOSS_RTOL, f"first loss {first_rel:.1%} from bf16's"),
        (end_checked and end_rel > FP16_END_LOSS_RTOL, f"final loss level {end_rel:.1%} from bf16's")) if bad]
    rows.measure("failed" if problems else "passed", case="resnet32-e3-fp16-gradscaler", loss_path=fp16["loss_path"], amp=fp16["amp"],
                 steps=n, skipped_steps=skipped, skipped_after_settle=late, final_scale=fp16["scales"][-1],
                 first_loss_fp16=fp16["losses"][0], first_loss_bf16=bf16["losses"][0], first_loss_rel_diff=first_rel,
                 end_loss_fp16=end_fp16, end_loss_bf16=end_bf16, end_loss_rel_diff=end_rel, end_loss_checked=end_checked, finite=finite,
                 reason="; ".join(problems),
                 tolerance=f"no skipped step after step {FP16_SETTLE_STEPS}; first loss within {FP16_FIRST_LOSS_RTOL:.0%}, "
                           f"mean of the last {tail} losses within {FP16_END_LOSS_RTOL:.0%} of bf16")


def _engine_step_throughput(sizes: Sizes, name: str, experts: int, classes: int, batch: int, px: int, iters: int) -> dict:
    """The engine's TrainStep (batched experts, channels-last, bf16, fused loss on CUDA) on one
    synthetic batch: images/s over `iters` steps between CUDA events, and its loss before and after."""
    import torch

    from ride_fast.config import LossConfig, OptimConfig
    from ride_fast.engine.optim import build_optimizer
    from ride_fast.engine.step import TrainStep
    from ride_fast.losses import build_loss
    from ride_fast.models import create_model

    dev = torch.device(sizes.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, num_experts=experts, batched=True).to(dev, memory_format=torch.channels_last)
    crit = build_loss(LossConfig(diversity_factor=-0.2), long_tailed_counts(classes, 500).numpy()).to(dev)
    step = TrainStep(model, crit, build_optimizer(model, OptimConfig(lr=0.01), dev), device=dev, amp="bf16")
    x = torch.randn(batch, 3, px, px, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=dev)
    first = float(step(x, y))  # also the warm-up of the CPU (cuDNN autotuning and Triton compiles on CUDA)
    last = []

    def timed():
        last[:] = [step(x, y)]  # a device tensor: read after the timed loop

    t = time_per_iter(timed, iters, dev, warmup=2 if dev.type == "cuda" else 0, graph=False)  # images/s as training runs
    return {"images_per_s": batch / t["stream_s"], "ms_per_step": t["stream_s"] * 1e3, "first_loss": first, "last_loss": float(last[0]),
            "batch": batch, "px": px, "model": model}


def step_r50(rows: Rows, sizes: Sizes, mode: str) -> None:
    """RIDE-ResNet-50 E=3 and E=4 training steps, 224 px, bf16, channels-last: images/s and MFU."""
    import torch

    from ride_fast.profiling import model_cost

    for E in (3, 4):
        r = _engine_step_throughput(sizes, "resnet50", E, 1000, sizes.r50_batch, sizes.r50_px, sizes.r50_iters)
        macs = model_cost(r.pop("model"), sizes.r50_px).total_macs
        flops = 6 * macs  # forward 2 MACs, backward about twice the forward
        peak = bf16_dense_tflops(torch.cuda.get_device_name() if sizes.device == "cuda" else "")
        mfu = flops * r["images_per_s"] / (peak * 1e12)
        finite = math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        fields = dict(r, case=f"resnet50-e{E}-bf16-cl", train_gflops_per_image=flops / 1e9, mfu=mfu, peak_tflops=peak, finite=finite)
        if E == 3:
            fields.update(target="RIDE-R50 E=3 >= 3,500 images/s", target_met=bool(r["images_per_s"] >= 3500))
        rows.measure("passed" if finite else "failed", **fields)


def step_routed(rows: Rows, sizes: Sizes, mode: str) -> None:
    """Routed inference (RIDE-R32 E=3, half the images stop after expert 1): time ratio vs MACs ratio."""
    import torch
    from test_bench_routed import TOLERANCE, _paired_time_ratio, _setup

    dev = torch.device(sizes.device)
    torch.backends.cudnn.benchmark = True
    all_experts, routed, macs_ratio = _setup(dev, sizes.routed_batch)
    all_experts(), routed()  # warm-up: cuDNN autotuning
    time_ratio, t_all, t_routed = _paired_time_ratio(all_experts, routed)
    over = time_ratio / macs_ratio
    rows.measure(case=f"resnet32-e3-routed-b{sizes.routed_batch}", macs_ratio=macs_ratio, time_ratio=time_ratio, time_over_macs=over,
                 ms_all=t_all * 1e3, ms_routed=t_routed * 1e3, target=f"time ratio within {TOLERANCE:.0%} of the MACs ratio",
                 target_met=bool(abs(over - 1) <= TOLERANCE))


def step_ddp_nccl(rows: Rows, sizes: Sizes, mode: str) -> None:
    """`torchrun --nproc_per_node=1 -m ride_fast train` (NCCL on CUDA, gloo on the CPU) for a few
    steps on CIFAR-100-format files: exit status, one epoch of finite loss, the backend. In the DRW
    phase (loss.reweight_epoch=0), so that the step all-reduces its class-weight sum too. On CUDA
    with train.cuda_graphs (the whole step captured under DDP after its warm-up steps); if that
    run fails, once more without, to tell a capture fault from a DDP one."""
    graphs = sizes.device == "cuda"
    ok = _torchrun_train(rows, sizes, "torchrun-1-process-cli" + ("-cuda_graphs" if graphs else ""), cuda_graphs=graphs)
    if graphs and not ok:
        _torchrun_train(rows, sizes, "torchrun-1-process-cli", cuda_graphs=False)


def _torchrun_train(rows: Rows, sizes: Sizes, case: str, cuda_graphs: bool) -> bool:
    train, test = synthetic_cifar(100, sizes.per_class_max, 32, test_per_class=2 if sizes.device == "cpu" else 10)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100_pickles(Path(tmp) / "data", train, test)
        out = Path(tmp) / "run"
        # --local-addr: the worker reaches the agent's store at 127.0.0.1, whatever the machine's host name resolves to
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1", "--nproc_per_node=1",
               "-m", "ride_fast", "train",
               "data.name=cifar100_lt", f"data.root={Path(tmp) / 'data'}", "data.imbalance_factor=1", f"data.batch_size={sizes.batch}",
               "data.eval_batch_size=1024", f"train.device={sizes.device}", "train.epochs=1", f"train.max_steps_per_epoch={sizes.ddp_steps}",
               "train.progress=false", "train.tensorboard=false", f"train.out_dir={out}", "optim.warmup_epochs=0", "loss.reweight_epoch=0",
               f"train.cuda_graphs={str(cuda_graphs).lower()}"]
        # DDP logs its backend ("backend_name: nccl") at this level
        env = dict(os.environ, TORCH_DISTRIBUTED_DEBUG="INFO", TORCH_CPP_LOG_LEVEL="INFO", NCCL_DEBUG="VERSION",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        metrics = out / "metrics.jsonl"
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    found = re.search(r"backend_name: (\w+)", log)
    backend = found.group(1) if found else None
    ok = proc.returncode == 0 and len(records) == 1 and math.isfinite(records[0]["loss"]) and backend == ("nccl" if sizes.device == "cuda" else "gloo")
    rows.measure("passed" if ok else "failed", case=case, cuda_graphs=cuda_graphs, steps=sizes.ddp_steps, rc=proc.returncode,
                 backend=backend, seconds=seconds, epochs=len(records), loss=records[0]["loss"] if records else None,
                 images_per_s=records[0]["images_per_s"] if records else None, command=" ".join(cmd[1:8]) + " train ...",
                 **({} if ok else {"reason": f"exit code {proc.returncode}, DDP backend {backend}: " + log.strip()[-800:]}))
    return ok


def step_e8(rows: Rows, sizes: Sizes, mode: str) -> None:
    """E = 8 experts (RIDE-R32, batched, fused loss): finite, falling loss over a few steps."""
    r = _engine_step_throughput(sizes, "resnet32", 8, 100, sizes.batch, sizes.px, sizes.e8_steps)
    model = r.pop("model")
    ok = math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]) and r["last_loss"] < r["first_loss"]
    rows.measure("passed" if ok else "failed", case="resnet32-e8-bf16", experts=model.num_experts, **r,
                 **({} if ok else {"reason": "loss not finite or not falling"}))


def step_dali(rows: Rows, sizes: Sizes, mode: str) -> None:
    """The DALI mixed (nvJPEG) pipeline against the torch loader, when DALI imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        rows.write("skipped", kind="measure", case="dali-mixed", reason="not installed")
        return
    run_pytest(rows, [DALI_TEST])


STEPS: dict[str, Callable[[Rows, Sizes, str], None]] = {
    "env": step_env,
    "gpu_tests": step_gpu_tests,
    "loss_bench": step_loss_bench,
    "trainer_compile": step_trainer_compile,
    "trainer_cuda_graphs": step_trainer_cuda_graphs,
    "amp_fp16": step_amp_fp16,
    "r50": step_r50,
    "routed": step_routed,
    "ddp_nccl": step_ddp_nccl,
    "e8": step_e8,
    "dali": step_dali,
}
assert list(STEPS) == list(DEADLINES)


# --------------------------------------------------------------------------------------- the runner

def check_imports() -> list[tuple[str, str]]:
    """(module, why) for each required module that does not import."""
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as err:
            missing.append((name, str(err).splitlines()[0] if str(err) else "import failed"))
    return missing


def _env_map(name: str) -> dict[str, str]:
    text = os.environ.get(name, "")
    return dict(part.split("=", 1) if "=" in part else part.split(":", 1) for part in text.split(",") if part.strip())


def plan(mode: str) -> list[tuple[str, float]]:
    """(step, deadline) in order, after the RIDE_FAST_GPU_CHECK_STEPS / _DEADLINES hooks. A step
    runs under its deadline plus whatever the steps before it left unused (the runner's `carry`)."""
    col = ("full", "quick", "dry").index(mode)
    only = [s for s in os.environ.get("RIDE_FAST_GPU_CHECK_STEPS", "").split(",") if s]
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        raise SystemExit(f"RIDE_FAST_GPU_CHECK_STEPS: unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    override = {k: float(v) for k, v in _env_map("RIDE_FAST_GPU_CHECK_DEADLINES").items()}
    return [(s, override.get(s, DEADLINES[s][col])) for s in STEPS if not only or s in only]


def _child(name: str, out: Path, mode: str, fault: str) -> None:
    """The body of a step's process: its own process group (the runner kills it whole), gone with the runner."""
    os.setpgrp()
    try:  # Linux: die with the runner (a killed runner leaves no step behind)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    rows = Rows(out, name, fault)
    try:
        STEPS[name](rows, SIZES[mode], mode)
    except BaseException as err:
        tb = traceback.format_exc().strip().splitlines()
        rows.write("failed", kind="error", reason=(str(err).splitlines() or [type(err).__name__])[0][:500], traceback=tb[-12:])
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


STOP_GRACE_S = 10.0  # a step past its deadline: how long its processes get to stop after SIGTERM


def stop_step(proc) -> None:
    """Stop a step past its deadline: SIGTERM to its process group, then SIGKILL to what is left once
    STOP_GRACE_S have passed. torchrun starts its workers in sessions of their own, out of the
    group's reach; on SIGTERM it stops them itself, where SIGKILL would leave them running on the
    device through the next steps."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    if signal_group(signal.SIGTERM):
        end = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < end and (proc.is_alive() or signal_group(0)):  # is_alive reaps the step itself
            time.sleep(0.1)
        signal_group(signal.SIGKILL)
    proc.join(10)


def step_status(step_rows: list[dict], rc: int | None) -> tuple[str, str]:
    """(status, reason) of a finished step from its rows and exit code."""
    statuses = [r["status"] for r in step_rows]
    reasons = [r.get("reason", "") for r in step_rows if r["status"] in ("failed", "skipped") and r.get("reason")]
    if "failed" in statuses or rc:
        return "failed", reasons[0] if reasons else (f"exit code {rc}" if rc else "a row failed")
    if not step_rows:
        return "failed", "the step wrote no row"
    if all(s == "skipped" for s in statuses):
        return "skipped", reasons[0] if reasons else ""
    return "passed", ""


def run(mode: str, out: Path) -> int:
    import multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").write_text("")
    steps = plan(mode)
    runner = Rows(out, "plan")
    runner.write(kind="plan", mode=mode, budget_s=BUDGET_S[mode], steps=[{"step": s, "deadline_s": d} for s, d in steps],
                 started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    missing = check_imports()
    imports = Rows(out, "imports")
    if missing:
        names = ", ".join(m for m, _ in missing)
        imports.write("failed", kind="end", reason=f"cannot import {names}", missing=[{"module": m, "why": w} for m, w in missing])
        for s, d in steps:
            Rows(out, s).write("skipped", kind="end", deadline_s=d, reason="not run: a required module does not import")
        print(f"gpu check: cannot import {names}:", file=sys.stderr)
        for m, w in missing:
            print(f"  {m}: {w}", file=sys.stderr)
        print("install them (make gpu-wheels builds .whl/ for a GPU machine; pip install -r requirements.txt here)", file=sys.stderr)
        return 1
    imports.write(kind="end", modules=list(REQUIRED), elapsed_s=round(time.perf_counter() - t0, 2))
    faults = _env_map("RIDE_FAST_GPU_CHECK_FAULT")
    ctx = mp.get_context("fork")
    worst = 0
    carry = 0.0  # seconds the steps so far left unused: the next step may take them, the total stays within the plan's
    for name, planned in steps:
        deadline = round(planned + carry, 2)
        rows = Rows(out, name)
        rows.write(kind="start", deadline_s=deadline, planned_deadline_s=planned)
        print(f"[gpu check] {name} (deadline {deadline:g} s)", flush=True)
        t0 = time.perf_counter()
        proc = ctx.Process(target=_child, args=(name, out, mode, faults.get(name, "")), name=f"gpu-check-{name}")
        proc.start()
        proc.join(deadline)
        elapsed = round(time.perf_counter() - t0, 2)
        if proc.is_alive():
            stop_step(proc)
            rows.write("timed_out", kind="end", elapsed_s=elapsed, deadline_s=deadline,
                       reason=f"killed at its deadline of {deadline:g} s; the rows it wrote are kept")
            worst = 1
            carry = 0.0
            continue
        carry = max(0.0, deadline - elapsed)
        mine = [r for r in read_rows(out) if r["step"] == name and r.get("kind") not in ("start", "end")]
        status, reason = step_status(mine, proc.exitcode)
        targets = [r for r in mine if "target_met" in r]
        rows.write(status, kind="end", elapsed_s=elapsed, deadline_s=deadline, rc=proc.exitcode, reason=reason,
                   targets=len(targets), targets_met=sum(bool(r["target_met"]) for r in targets))
        print(f"[gpu check] {name}: {status} in {elapsed:g} s {reason}", flush=True)
        worst = max(worst, int(status == "failed"))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["full", "quick", "dry"], default="full")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    # the runner forks its steps: it must not start CUDA itself (torch asks NVML whether CUDA is there)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if args.mode == "dry":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    return run(args.mode, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
