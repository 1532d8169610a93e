"""Where and how a run computes: the device, the autocast precision, the seeds, the host heap.

Every engine module that runs a network (stage-1 training, stage 2, routed evaluation) takes these
from here, so the rules ("auto" device, "auto" precision) are written once.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import sys

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """train.device as a torch.device ("auto": CUDA when available, else the CPU). Every engine entry
    (training, stage 2, evaluation, the analyses) resolves its device here, so on the CPU this is
    also where the process starts keeping freed host memory for the next batch (`keep_host_memory`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    if device.type == "cpu":
        keep_host_memory()
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast is faster."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native) and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp with "auto" resolved: bf16 on CUDA devices that support it and on CPUs that
    multiply bf16 natively (AVX512-BF16 or AMX), otherwise "none" (fp32). Other values are returned unchanged."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "none"
    return "none"


def autocast_context(device: torch.device, amp: str):
    """bf16 or fp16 autocast on any device type, or nothing ("auto": see `resolve_amp`)."""
    amp = resolve_amp(amp, torch.device(device))
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: bigger blocks are always mapped
_HEAP_TRIM_THRESHOLD = 1 << 30
_KEPT_HOST_MEMORY: bool | None = None


def keep_host_memory() -> bool:
    """Ask glibc to keep freed heap memory for the next batch instead of returning it to the
    operating system. Returns whether the setting is in force in this process.

    A CPU training step allocates its activations and gradients (about 100 MB for RIDE-ResNet-32
    at batch 128) and frees them all at its end; an evaluation batch does the same with its
    activations. By default glibc then trims the top of its heap, so the next batch faults every
    page back in, zeroed by the kernel: some 15,000 page faults and 2-5 % of a training step,
    45,000 and 4-19 % of an evaluation batch of 256, on a 2-core Xeon (docs/performance-notes.md).
    With a fixed trim threshold of 1 GiB and blocks up to 32 MiB served from the heap, the freed
    memory is reused; the process keeps its peak heap, as a caching allocator does.

    Nothing changes outside Linux with glibc, or when the environment already tunes glibc's
    allocator (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES with malloc settings;
    another allocator preloaded with LD_PRELOAD, such as jemalloc or tcmalloc, leaves the call
    without effect). Once per process.
    """
    global _KEPT_HOST_MEMORY
    if _KEPT_HOST_MEMORY is None:
        _KEPT_HOST_MEMORY = _set_glibc_heap_thresholds()
    return _KEPT_HOST_MEMORY


def _set_glibc_heap_thresholds() -> bool:
    tuned = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
    if any(k in os.environ for k in tuned) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no mallopt parameters to set
            return False
        # the mmap threshold first: setting either one stops glibc's own adjustment of both
        return libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
