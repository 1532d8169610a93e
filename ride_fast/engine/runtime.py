"""Where and how a run computes: the device, the autocast precision, the seeds.

Every engine module that runs a network (stage-1 training, stage 2, routed evaluation) takes these
from here, so the rules ("auto" device, "auto" precision) are written once.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
