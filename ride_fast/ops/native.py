"""ride_fast's C kernels for the CPU (ride_fast/ops/csrc/), built on first use and loaded with ctypes.

The C sources are compiled by the system's C compiler (`$CC`, else `cc`) with `-O3 -march=native
-fopenmp` into a shared library under the cache folder, named by a hash of the source, the
compiler's version, the flags and this CPU's instruction sets, so a changed source or another CPU
builds its own copy and a cached one is loaded in milliseconds. The library takes its OpenMP
runtime from the process (torch's own libgomp, loaded before it), so its threads are torch's.

Where there is no compiler, the build fails, the platform is not Linux or `RIDE_FAST_NATIVE=0` is
set, `library()` returns None once and for all, and every caller keeps its PyTorch path (with one
warning naming the reason, except when switched off on purpose).

    RIDE_FAST_NATIVE=0        never build or load the C kernels (PyTorch's operators instead)
    RIDE_FAST_CACHE_DIR       the cache folder (default $XDG_CACHE_HOME/ride_fast, else ~/.cache/ride_fast)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("ride_fast")

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("batch_norm_act.c", "conv3x3.c", "cpu_rates.c"))
HEADERS = (Path(__file__).parent / "csrc" / "common.h",)  # included by SOURCES: hashed with them
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")

_P, _I64, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
# name -> (argument types): the C functions every caller may use once `library()` is not None
SIGNATURES = {
    "ride_bn_act_forward": [_P, _P, _P, _P, _DOUBLE, _I64, _I64, _INT, _INT, _P, _P, _INT],
    "ride_bn_act_backward": [_P, _P, _P, _P, _P, _I64, _I64, _INT, _INT, _P, _P, _P, _P, _INT],
    "ride_conv3x3_supported": [_I64, _I64],
    "ride_conv3x3_weight_grad_supported": [_I64, _I64],
    "ride_conv3x3_forward": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT, _INT],
    "ride_conv3x3_weight_grad": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT, _INT],
    "ride_bf16_product_ratio": [_I64, _INT],
}
RESTYPES = {"ride_bf16_product_ratio": _DOUBLE}  # the rest return an int status

_LIBRARY: ctypes.CDLL | None = None
_TRIED = False


def enabled() -> bool:
    """False when RIDE_FAST_NATIVE=0 (or "false", "off", "no")."""
    return os.environ.get("RIDE_FAST_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    if os.environ.get("RIDE_FAST_CACHE_DIR"):
        return Path(os.environ["RIDE_FAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ride_fast"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _cpu_features() -> str:
    """The "flags" line of /proc/cpuinfo: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def library_path() -> Path:
    """Where the library for these sources, this compiler and this CPU is (or will be) built."""
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES + HEADERS), version.encode(), " ".join(FLAGS).encode(), _cpu_features().encode()]:
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"ride_fast_native_{key.hexdigest()[:16]}.so"


def build(path: Path) -> None:
    """Compile SOURCES into `path`, atomically: a concurrent process sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([_compiler(), *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed on {', '.join(p.name for p in SOURCES)}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded C kernels, built first if needed; None where they cannot be had (see the module
    docstring). Tried once per process."""
    global _LIBRARY, _TRIED
    if _TRIED:
        return _LIBRARY
    _TRIED = True
    if not enabled():
        return None
    try:
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"the C kernels are built on Linux only, not on {sys.platform}")
        import torch  # noqa: F401  (its OpenMP runtime must be loaded first, so the library shares it)

        path = library_path()
        if not path.exists():
            build(path)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, RESTYPES.get(name, ctypes.c_int)
        _LIBRARY = lib
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("ride_fast's C kernels for the CPU are not available (%s); PyTorch's operators run instead", e)
    return _LIBRARY


def reset() -> None:
    """Forget the outcome of `library()` (tests), so that the next call tries again, and the products
    ratio timed with it."""
    global _LIBRARY, _TRIED
    _LIBRARY, _TRIED = None, False
    bf16_product_ratio.cache_clear()


# bf16 multiplies faster than float32 on a CPU without AMX only where its bf16 dot product runs at
# least this many times the float32 products its FMAs run (`bf16_product_ratio`): about 2 on AMD's
# Zen 4 by the instruction tables, about 0.5 measured on an Intel Xeon with AMX switched off
# (docs/performance-notes.md, "bf16 on a CPU whose bf16 products are slow").
BF16_FASTER_AT = 1.25


@functools.cache
def bf16_product_ratio() -> float | None:
    """bf16 products a second by this CPU's AVX512-BF16 dot product over float32 products a second
    by its FMAs, timed once per process (about 2 ms; csrc/cpu_rates.c). None where that cannot be
    timed: no AVX512-BF16 in this build, or no library."""
    lib = library()
    if lib is None:
        return None
    ratio = float(lib.ride_bf16_product_ratio(20000, 5))
    return ratio if ratio > 0 else None


def cpu_multiplies_bf16_faster() -> bool:
    """Whether this CPU multiplies bf16 faster than float32: AMX tiles, or an AVX512-BF16 dot product
    at BF16_FASTER_AT times float32's products or more (where it cannot be timed, having the
    instructions decides). Never without oneDNN, which runs PyTorch's bf16 convolutions."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if torch.cpu._is_amx_tile_supported():
            return True
        if not torch.cpu._is_avx512_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    ratio = bf16_product_ratio()
    return ratio is None or ratio >= BF16_FASTER_AT
