"""Raw benchmark results: one JSON file per benchmark module and timed run, under benchmarks/results/.

    benchmarks/results/<module>/<YYYY-MM-DD>T<HHMM>Z_<machine slug>.json

`<module>` is the benchmark file's name without `test_bench_` (`train_step`, `routed`, ...); the
slug names the machine (`cpu-intel-xeon-processor-2c`, `gpu-nvidia-h100-80gb-hbm3`). A file holds:

    date_utc        when the run ended (ISO 8601, UTC)
    command         the pytest command line, and the RIDE_FAST_BENCH_* / thread variables set
    git             commit and whether the working tree had uncommitted changes
    machine         CPU model, cores, the flags that decide the CPU fast paths (AMX, avx512_bf16),
                    memory, and GPU name / SMs / memory when CUDA is present
    versions        python, torch, triton, nvidia-dali (when importable), numpy, pytest-benchmark
    load_average    1/5/15-minute load when the module's first test started and its last ended
    tests           per timed test: name, params, outcome, stats (seconds: min, max, mean,
                    median, stddev, iqr, rounds, iterations, and the raw per-round `data`) and
                    extra_info (images/s, ratios, ... as each benchmark records them)

benchmarks/conftest.py calls `write_results` at the end of a pytest run. It writes only when
pytest-benchmark timed something: a `--benchmark-disable` run (CI) leaves the tree as it was.
RIDE_FAST_BENCH_RESULTS sets another folder, or `off` to write nothing.

    python benchmarks/_results.py benchmarks/results/<module>/<file>.json ...    print a summary
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2")
ENV_PREFIXES = ("RIDE_FAST_BENCH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ONEDNN_", "DNNL_", "CUDA_VISIBLE_DEVICES")
STAT_FIELDS = ("min", "max", "mean", "median", "stddev", "iqr", "rounds", "ops")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, logical cores and the flags that pick the CPU fast paths (from /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "logical_cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "hypervisor": "hypervisor" in flags,
    }


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_info() -> dict[str, Any] | None:
    """The first CUDA device (name, SMs, memory, count), or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    except Exception as err:  # a broken driver must not lose the CPU results
        return {"error": f"{type(err).__name__}: {err}"}


# bf16 dense tensor-core peaks (TFLOP/s, NVIDIA's data sheets: the sparse figure halved), by a part
# of the device name; the SXM parts are the default. The PCIe and NVL boards run lower clocks and power.
BF16_DENSE_TFLOPS = (("H100 PCIe", 756.0), ("NVL", 835.0), ("H100", 989.0), ("H200", 989.0))


def bf16_dense_tflops(device_name: str) -> float:
    """The bf16 dense peak that MFU divides by, for an H100 / H200 of this name (989: the SXM parts)."""
    return next((tflops for part, tflops in BF16_DENSE_TFLOPS if part in device_name), 989.0)


def machine_info() -> dict[str, Any]:
    return {"hostname": platform.node(), "os": platform.platform(), "cpu": cpu_info(), "memory_gib": memory_gib(),
            "gpu": gpu_info()}


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # not installed, or fails to import on this machine
        return None


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": _version("torch"), "triton": _version("triton"),
            "dali": _version("nvidia.dali"), "numpy": _version("numpy"), "pytest_benchmark": _version("pytest_benchmark")}


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine_slug(machine: Mapping[str, Any]) -> str:
    """`gpu-<gpu name>` with CUDA, else `cpu-<cpu model>-<n>c`: lower case, [a-z0-9-] only."""
    gpu = machine.get("gpu") or {}
    if gpu.get("name"):
        text = f"gpu-{gpu['name']}"
    else:
        cpu = machine.get("cpu", {})
        model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", str(cpu.get("model", "unknown")), flags=re.I)
        text = f"cpu-{model}-{cpu.get('logical_cores')}c"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def module_of(fullname: str) -> str:
    """'benchmarks/test_bench_routed.py::test_x[cpu]' -> 'routed'."""
    stem = Path(fullname.split("::", 1)[0]).stem
    return stem.removeprefix("test_bench_").removeprefix("test_")


def entry_of(meta: Any, outcome: str | None) -> dict[str, Any]:
    """One timed test from a pytest-benchmark `Metadata` (its stats in seconds, raw rounds included)."""
    stats = meta.stats
    return {
        "name": meta.name,
        "fullname": meta.fullname,
        "param": meta.param,
        "params": meta.params,
        "group": meta.group,
        "outcome": outcome,
        "stats": {**{f: getattr(stats, f) for f in STAT_FIELDS}, "iterations": meta.iterations, "data": list(stats.data)},
        "extra_info": dict(meta.extra_info),
    }


def write_results(
    benchmarks_run: Any,
    *,
    command: str,
    results_dir: Path | None = None,
    outcomes: Mapping[str, str] | None = None,
    windows: Mapping[str, Mapping[str, Any]] | None = None,
    now: dt.datetime | None = None,
    machine: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write one JSON file per benchmark module that has timed tests; return the paths written.

    benchmarks_run: pytest-benchmark's state of the run (`config._benchmarksession`): nothing is written
    when it is disabled or timed nothing. outcomes: nodeid -> "passed" / "failed" / "skipped".
    windows: module -> {"load_start", "load_end", "started_utc"}, kept as the module's load record.
    """
    if benchmarks_run is None or getattr(benchmarks_run, "disabled", True):
        return []
    timed = [m for m in getattr(benchmarks_run, "benchmarks", []) if m and m.stats]
    if not timed:
        return []
    env = os.environ.get("RIDE_FAST_BENCH_RESULTS", "")
    if env.lower() == "off":
        return []
    if results_dir is None:
        results_dir = Path(env) if env else RESULTS_DIR
    now = now or dt.datetime.now(dt.timezone.utc)
    machine = dict(machine) if machine is not None else machine_info()
    common = {
        "date_utc": now.isoformat(timespec="seconds"),
        "command": command,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "git": git_state(Path(__file__).resolve().parent),
        "machine": machine,
        "versions": versions(),
    }
    by_module: dict[str, list[dict[str, Any]]] = {}
    for meta in timed:
        by_module.setdefault(module_of(meta.fullname), []).append(entry_of(meta, (outcomes or {}).get(meta.fullname)))
    written = []
    stamp = now.strftime("%Y-%m-%dT%H%MZ")
    for module, tests in sorted(by_module.items()):
        record = {"module": module, **common, **(windows or {}).get(module, {}), "tests": tests}
        path = _unused(results_dir / module / f"{stamp}_{machine_slug(machine)}.json")
        path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
        written.append(path)
    return written


def _unused(path: Path) -> Path:
    """`path`, or the first of path-2, path-3, ... not yet there: a second run within the same
    minute keeps the first one's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _jsonable(value: Any) -> Any:
    """Tensors, numpy scalars, devices and the like as plain JSON values."""
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(args: Iterable[str]) -> str:
    import shlex

    return shlex.join([Path(sys.executable).name, "-m", "pytest", *args])


def summary(record: Mapping[str, Any]) -> list[str]:
    """A results file as text lines: its header, then per test the median / min ms, rounds and extra_info numbers."""
    cpu, gpu = record["machine"]["cpu"], record["machine"].get("gpu") or {}
    v = record["versions"]
    lines = [f"{record['module']}: {record['date_utc']}  {gpu.get('name') or cpu['model']} ({cpu['logical_cores']} cores)  "
             f"torch {v['torch']}  load {record.get('load_start')} -> {record.get('load_end')}", f"  {record['command']}"]
    for t in record["tests"]:
        s = t["stats"]
        extra = {k: x for k, x in t["extra_info"].items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        shown = " ".join(f"{k}={x:.4g}" for k, x in extra.items())
        lines.append(f"  {t['name']:<60} {1e3 * s['median']:10.2f} ms (min {1e3 * s['min']:.2f}, {s['rounds']} rounds) "
                     f"{t['outcome'] or ''}  {shown}")
    return lines


if __name__ == "__main__":  # python benchmarks/_results.py benchmarks/results/<module>/<file>.json ...
    for arg in sys.argv[1:]:
        print("\n".join(summary(json.loads(Path(arg).read_text()))))
