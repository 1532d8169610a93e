"""Helpers shared by the launchers of ride_fast_kernels: limits, environment switches, checks.

Imports torch only (no triton), so `ride_fast.ops` can read the limits without importing triton.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

#: Logit dtypes the fused kernels accept (the math is always float32).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Largest class count the launchers accept. Rows are processed in blocks (online softmax), so the
#: kernels themselves have no hard limit; this is the range they are designed and tested for
#: (iNaturalist 2018 has 8,142 classes, ImageNet-21k 21,841). Raise it together with a test.
MAX_CLASSES = 1 << 16

#: Largest expert count: all E experts of a row are held in one [R, V, next_pow2(E)] tile, which
#: fits the register budget without spills up to 8 (the model's own limit, `model.num_experts`).
#: More experts take the closed-form path (`ride_fast.ops.ride_loss_path`).
MAX_EXPERTS = 8


#: The fused loss's two designs (kernels/ride_loss.py): "two_kernel", a forward that keeps per-row
#: statistics and a backward that reads the logits again to write the gradient; "grad_in_forward",
#: a forward that writes the gradient too, each row's second pass right after its first (from the
#: L2) for the grad_output its caller declares (1 unless the loss is multiplied before its
#: backward), and a backward that keeps it where grad_output is that number.
LOSS_DESIGNS = ("two_kernel", "grad_in_forward")

#: Where "grad_in_forward" is the design a training step takes: float32 logits (what the cosine
#: heads give, under autocast too) and bfloat16 ones, of up to 4 experts. There its kernel compiles
#: within its register budget without spills (64 with LDAM's margins, float32 "pairwise" with
#: temperatures at 3 or 4 experts in the narrow tile: `ride_loss.register_budget`; 5 to 8 experts
#: spill outside the main loops), and the traffic model (benchmarks/loss_traffic.py) predicts it
#: faster than the two kernels at (512, 4, 8142) in both dtypes, both DRW phases and both diversity
#: modes (by 6 to 21 points of the floor). float16 steps go through GradScaler, whose grad_output
#: (the scale, on the device) the forward cannot know.
GRAD_IN_FORWARD_MAX_EXPERTS = 4
GRAD_IN_FORWARD_DTYPES = (torch.float32, torch.bfloat16)


def loss_design(dtype: torch.dtype, num_experts: int) -> str:
    """The fused loss's design for a call that wants the gradient of `num_experts` experts'
    logits of `dtype` (one of LOSS_DESIGNS): "grad_in_forward" within GRAD_IN_FORWARD_MAX_EXPERTS
    and GRAD_IN_FORWARD_DTYPES, "two_kernel" elsewhere. RIDE_FAST_LOSS_DESIGN=two_kernel or
    grad_in_forward sets it for every call ("auto" or unset: the rule), for timing one against
    the other; the results are the same either way (with DRW weights up to the order in which
    their sum, the divisor, is taken)."""
    forced = os.environ.get("RIDE_FAST_LOSS_DESIGN", "auto")
    if forced in LOSS_DESIGNS:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"environment variable RIDE_FAST_LOSS_DESIGN={forced!r}: expected auto, {' or '.join(LOSS_DESIGNS)}")
    fits = dtype in GRAD_IN_FORWARD_DTYPES and 1 <= num_experts <= GRAD_IN_FORWARD_MAX_EXPERTS
    return "grad_in_forward" if fits else "two_kernel"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, slowly; bf16 math unsupported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def debug_checks() -> bool:
    """True under RIDE_FAST_DEBUG=1: launchers add checks that need a host sync (target range)."""
    return os.environ.get("RIDE_FAST_DEBUG", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pick_tile(e_block: int, n_cols: int, itemsize: int, block_c: int | None = None,
              narrow: bool = False) -> tuple[int, int, int]:
    """(R, V, num_warps) of a [R, V, e_block] tile: R rows of V consecutive classes, one row a
    thread. V = 4 (16-byte float32 loads, 8-byte 2-byte ones; a thread holds 16 logits up to 4
    experts, 32 with 5 to 8); R = 32 num_warps with 8 warps, 4 for 5 to 8 experts (so that a
    program keeps 4096 logits in flight at 4 and at 8 experts); R * V = block_c classes (the whole
    row when shorter). `narrow`: V = 2 (8-byte float32 loads, 8 logits a thread at 4 experts,
    BLOCK_C 512 with 8 warps), for the kernels that hold too many running values for V = 4
    (`ride_loss.narrow_tile`).

    `block_c` overrides the class-block width (tests use a small one to exercise the blocked path).
    """
    if e_block > next_power_of_2(MAX_EXPERTS):
        raise ValueError(f"a tile holds at most {MAX_EXPERTS} experts, got an expert block of {e_block}")
    v = 2 if narrow else 4
    max_warps = 4 if e_block == 8 else 8
    if block_c is not None:
        if block_c < 16 or block_c & (block_c - 1):
            raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")
        bc = block_c
    else:
        bc = max(16, min(next_power_of_2(n_cols), 32 * max_warps * v))
    v = min(v, bc)
    r = bc // v
    return r, v, max(1, min(max_warps, r // 32))


def check_vector(name: str, vec: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """A [n] per-class vector as contiguous float32 on `device`, or None."""
    if vec is None:
        return None
    if vec.shape != (n,):
        raise ValueError(f"{name} must have shape [C] = [{n}], got {tuple(vec.shape)}")
    if vec.device != device:
        raise ValueError(f"{name} is on {vec.device} but the logits are on {device}; move it with .to(logits.device)")
    return vec.detach().to(torch.float32).contiguous()


def check_targets(target: Tensor, n_rows: int, n_classes: int, device: torch.device, what: str) -> Tensor:
    """Validate a [B] integer target vector; under RIDE_FAST_DEBUG=1 also its range (host sync)."""
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (int64), got {target.dtype}")
    if target.shape != (n_rows,):
        raise ValueError(f"target must have shape [B] = [{n_rows}] to match {what}, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")
    if debug_checks():
        # RIDE_FAST_DEBUG only: this reads values back to the host (a sync), so it is opt-in.
        bad = (target < 0) | (target >= n_classes)
        if bool(bad.any()):
            idx = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{idx}] = {int(target[idx])} is out of range for C = {n_classes} classes "
                f"(valid: 0..{n_classes - 1})"
            )
    return target.contiguous()


def check_logits(name: str, logits: Tensor, dims: int, legend: str) -> None:
    if logits.dim() != dims:
        raise ValueError(f"{name} must be {legend}, got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 for the fused kernel, got {logits.dtype} "
            "(use impl='reference' for other dtypes)"
        )
    n_cols = logits.shape[-1]
    if n_cols < 2 or n_cols > MAX_CLASSES:
        raise ValueError(
            f"{name} has C = {n_cols} classes; the fused kernel supports 2 <= C <= {MAX_CLASSES} "
            "(use impl='reference' beyond that)"
        )
    if any(s == 0 for s in logits.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(logits.shape)}")
    if not (logits.is_cuda or interpreting()):
        raise RuntimeError(
            f"the fused Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"{name} is on {logits.device}"
        )
