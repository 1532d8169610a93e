"""Fused RIDE stage-1 loss: every expert's LDAM cross-entropy and the diversity KL (forward kernel),
and the gradient with respect to every expert's logits, already multiplied by grad_output
(backward kernel, or the forward's second pass over each row: "grad_in_forward" below). Two
launches per training step; the forward's last program to finish reduces the rows' partial sums
(a ticket counter, then a fixed-order sum: deterministic).

Shape legend: E experts, B images (rows), C classes.

    expert_logits  [E, B, C]  s-scaled logits z_k (float32, bfloat16 or float16; unit class stride)
    target         [B]        int64 (or int32) class indices y_i
    margins        [C]        s * m_c, subtracted from the target logit only (None: plain CE)
    class_weights  [C]        DRW weights w_c (None: plain batch mean)
    temperature    [C]        diversity temperatures T_c (None: all ones)
    stats          [B, 3, E]  float32 per-row statistics the forward keeps for the backward:
                              lse(a_k), lse(z_k / T), and K_k ("pairwise") or lse(zbar / T) ("mean")
    part           [B, 3]     float32 per-row partial sums: w_y sum_k nll_k, the row's diversity
                              term, w_y (1 without weights)
    weight_sum     [1]        optional float32 divisor of the classification term (None: its own
                              sum_i w_{y_i}); a step split over ranks or micro-batches passes its share
                              of the whole batch's sum, so that the parts add up to one weighted mean
    aux            [1]        float32 the divisor used, sum_i w_{y_i} (B without weights) or
                              weight_sum, kept for the backward
    counter        [1]        int32 ticket counter (one per device, zero between launches)
    grad           [E, B, C]  grad_output * d loss / d expert_logits, logits' dtype, contiguous

Math (all in float32), with a_k = z_k - margins[y] * onehot(y), u_k = z_k / T, q_k = softmax(u_k),
pbar = softmax(zbar / T) where zbar = mean_k z_k (pbar carries no gradient), Tm = temperature_mean,
lam = diversity_factor, c_i = w_{y_i} / sum_j w_{y_j} (or 1/B without weights; weight_sum replaces
the divisor when given):

    loss = sum_i c_i sum_k [lse(a_ki) - a_ki[y_i]]                                  LDAM / CE
         + lam Tm^2 / B       sum_i sum_k KL(pbar_i || q_ki)                         "mean"
         + lam Tm^2 / (B (E-1)) sum_i sum_k K_ki,                                  "pairwise"
           K_ki = sum_{j!=k} KL(q_ki || q_ji) = sum_c q_kic (E log q_kic - S_ic),  S = sum_j log q_j

    d loss / d z_k = c_i (softmax(a_ki) - onehot(y_i))
                   + lam Tm^2 / B (q_ki - pbar_i) / T                                "mean"
                   + lam Tm^2 / (B (E-1)) [q_k (E log q_k - S - K_k) + E q_k - sum_j q_j] / T
                                                                                    "pairwise"

One pass per kernel. Both terms of the forward are online (running max, rescaled sums):
    sum_k KL(pbar || q_k) = sum_k lse(u_k) - E lse(zbar / T)        (sum_k u_k = E zbar / T)
    K_k = sum_c q_kc h_kc - E lse(u_k) + sum_j lse(u_j),  h_kc = E u_kc - sum_j u_jc
and sum_c q_kc h_kc = t_k / s_k with t_k = sum_c exp(u_kc - m_k) h_kc rescaled like s_k, so the
forward reads each logit exactly once. Without a temperature vector (T = 1, the first DRW phase
with T_base = 1) the exponentials are shared: exp(z - max z) serves lse(a_k) (every class but the
target, whose a_y is added once per expert), lse(u_k) and, in the backward, both softmaxes
(softmax(a_k)_c = q_kc exp(lse u_k - lse a_k) off the target): one exp per element, plus one per
class for pbar ("mean"; in the forward a polynomial on the FMA pipe).

Memory traffic (the floor of a loss with its gradient is 2 E B C itemsize: read the logits once,
write the gradient once): the forward reads the logits once (loads marked evict_last); the
backward reads them once more, rows in reverse order so that the rows the forward read last,
still in L2, come first, and writes the gradient once with evict_first stores that do not push
them out. Per-row statistics are 12 E + 12 bytes. `benchmarks/loss_traffic.py` models the DRAM
bytes this gives per GPU.

Instruction shape: one program per row; a tile is [R, V, E_BLOCK] (E_BLOCK = next_pow2(E)): R =
32 num_warps rows of V consecutive classes, each expert's block one vector load per thread, the
experts joined along the minor axis inside each thread (`ride_fast_kernels.ride_loss_kernels`).
Sums over experts and over a thread's V classes are register arithmetic; the forward keeps its
running maxima and sums per thread and reduces across threads once per row, all of its running
values in two reductions (maxima, then sums; one pass of shuffles and one exchange through shared
memory each). A row's classes run in three parts: the unmasked main loop over full blocks from
the row's first 16-element boundary h (h < 16: vector loads and stores whatever C is, when the
base pointers are 16-byte aligned and the expert stride B C is a multiple of 16 elements, which
Triton sees as divisibility; the gradient shares the logits' row stride modulo 16), the masked
tail, and the head [0, h). The forward reads the tail and the head first, as the lanes of one
masked block (two where they pass BLOCK_C) in the main loop's layout, so that they go into the
same running state; the backward writes them as a tail block and a 16-class head tile.
V = 4 classes a thread (16-byte float32 loads, 8-byte 2-byte ones) up to 8 experts: 16 logits a
thread up to 4 experts, 32 for 5 to 8 (`_utils.pick_tile`); BLOCK_C = R V classes, 1024 with 8
warps up to 4 experts, 512 with 4 warps for 5 to 8. float32 "pairwise" with temperatures at 3-4
experts runs a narrow tile in every kernel (`narrow_tile`: V = 2, 8-byte loads, BLOCK_C 512), whose
running state leaves no room for 16 logits a thread at 64 registers. Register budget
(`register_budget`, passed as maxnreg): 72 up to 4 experts (three 8-warp programs share an SM, 64K
registers), 64 for the forward that writes the gradient with LDAM's margins and for every kernel of
the narrow tile (four programs an SM; 80 for the gradient-writing forward of plain CE, three an
SM), 128 for 5 to 8 experts (four 4-warp programs); the compiler report checks every variant
against it, without spills. Each program keeps one tile of loads in flight, E_BLOCK x BLOCK_C =
4096 elements at 4 and at 8 experts (16 KB in float32; 2048, 8 KB, in the narrow tile), about what
an H100 / H200 SM needs to cover DRAM latency at full bandwidth (bandwidth x latency / SMs): three
or four programs an SM leave room to spare.
Shared memory (the once-a-row reductions, the tail's stores) is at most 4 KB per program. At most
8 experts (the model's own limit; more take the closed-form path). Expert offsets are 64-bit in
the kernels (a launch passes strides below 2^31 as 32-bit integers, and (E - 1) B C may not fit).
Launches run on the logits' device, on its current stream.

Two launch options change scheduling, never results: `stages` > 1 runs the main loop's logit
loads that many blocks ahead through shared memory (cp.async), two tiles in flight a program;
`max_registers` replaces the register budget (64: four 8-warp programs an SM, so that 512 rows run
in one wave of programs instead of two). The defaults are the design above; the GPU check times
the alternatives beside it.

The second design, "grad_in_forward" (`grad_out` on the forward), is the one the registered
operator runs for float32 and bfloat16 logits of up to 4 experts when autograd wants the gradient
(`_utils.loss_design`; `ride_fast.ops.ride_loss_design.fused_loss_design`). Each program runs
its row twice: the first pass as above, then, with the row's statistics (in registers, or read
back from their store in the "mean" variants with temperatures, where holding them spilled), the
backward's pass (`_bwd_row`, the same code) for the grad_output the caller declares (`grad_scale`:
1 for a loss taken as it is, a micro-batch's share or distillation's factor E for one multiplied
before its backward), writing the gradient already scaled. The second
pass reads the row the program has just read, from L2 if it is still there (rows in flight x row
bytes: 4 x 132 programs at 64 registers, all 512 rows x 130 KB = 67 MB in float32 at
(E, C) = (4, 8142), 33 MB in bfloat16, against a 50 MB L2), so the logits may cross DRAM once
instead of twice. It meets the row's blocks in the reverse of the first pass's order, so that a
least-recently-used L2 serves the part of each row it still holds. The backward, told
`grad_written`, reads grad_output and returns at once where it is that number, and recomputes the
gradient (scaled, rounded once) where it is not: GradScaler's float16 steps (a scale on the
device, unknown to the forward's caller) would pay both passes, so they keep the two kernels.
With DRW weights the gradient pass needs the divisor sum_i w_{y_i} before the rows are summed:
unless `weight_sum` is passed, every program sums it from the targets and weights between its two
passes, in one fixed order (the same bits in each; the loss divides by it too). The gradient
equals the backward's bit for bit given the same divisor (same statistics, same operations),
which the tests and the GPU check verify.

grad_output is read from device memory in float32 (never cast to the logits' dtype: GradScaler's
2^16 is inf in float16) and multiplies the float32 gradient before the single rounding to the
logits' dtype.
"""
from __future__ import annotations

import contextlib
import math

import torch
from ride_fast_kernels._utils import (
    MAX_EXPERTS,
    check_logits,
    check_targets,
    check_vector,
    next_power_of_2,
    pick_tile,
)
from ride_fast_kernels.ride_loss_kernels import _ride_loss_bwd_kernel, _ride_loss_fwd_kernel
from torch import Tensor

__all__ = ["DIVERSITY_MODES", "REGISTER_BUDGET", "narrow_tile", "register_budget", "ride_loss_backward", "ride_loss_forward"]

#: constexpr codes of the diversity term
_DIV_NONE, _DIV_MEAN, _DIV_PAIRWISE = 0, 1, 2
DIVERSITY_MODES = {"mean": _DIV_MEAN, "pairwise": _DIV_PAIRWISE}

#: Registers per thread (passed to ptxas as maxnreg; the compiler report and its test check every
#: variant against it): a thread holds E_BLOCK x V logits of a tile and 3 to 5 running values per
#: expert (see the module docstring). Up to 4 experts (16 logits a thread) REGISTER_BUDGET: three
#: 8-warp programs an SM, 12288 logits in flight; 5 to 8 experts hold 32 logits and twice the
#: running state and get REGISTER_BUDGET_WIDE with 4-warp programs (four an SM, 16 warps, each
#: program with 4096 logits in flight as at 4 experts).
REGISTER_BUDGET = 72
REGISTER_BUDGET_WIDE = 128
#: The gradient-writing forward (`grad_out`) of up to 4 experts holds both passes' state: with LDAM's
#: margins REGISTER_BUDGET_GRAD (four 8-warp programs an SM, so that 512 rows run in one wave), where
#: every such variant compiles without spills: the 2-byte "pairwise" ones with temperatures by
#: loading the target's logits late and reading lse(a_k) back, the float32 ones of 3 or 4 experts
#: in a narrow tile (`narrow_tile`; at V = 4 they spilled 80-88 bytes at 64). The plain-CE ones
#: (12 bytes in two "mean" variants at 64) get REGISTER_BUDGET_GRAD_WIDE: the most that keeps three
#: programs an SM, as REGISTER_BUDGET does, and enough for every one of them without spills (the
#: compile test holds both).
REGISTER_BUDGET_GRAD = 64
REGISTER_BUDGET_GRAD_WIDE = 80
#: Every kernel in the narrow tile (`narrow_tile`) fits 64 registers without spills, four programs an SM.
REGISTER_BUDGET_NARROW = 64


def narrow_tile(e_block: int, itemsize: int, pairwise_temps: bool) -> bool:
    """Whether the kernels run V = 2 classes a thread (`_utils.pick_tile`): float32 "pairwise"
    with temperatures at 3 or 4 experts, every kernel of it (so that both designs compute the same
    bits). At V = 4 the forward that writes the gradient holds 16 logits, five running values an
    expert and the target's logits, and fits 64 registers only with spills; at V = 2 it fits 64
    without, with 8-byte loads and stores, at about a quarter more instructions a logit (the issue
    rate has room to spare in float32); the two-kernel forward fits 64 too, and the backward
    drops from 71 registers to 55: every kernel runs four programs an SM (REGISTER_BUDGET_NARROW)."""
    return itemsize == 4 and e_block == 4 and pairwise_temps


def register_budget(e_block: int, itemsize: int, write_grad: bool = False, margins: bool = False,
                    pairwise_temps: bool = False) -> int:
    """maxnreg of the kernels of a [R, V, E_BLOCK] tile of `itemsize`-byte logits (the same for
    every logits dtype but in the gradient-writing forward); `write_grad`: the forward that writes
    the gradient, with `margins` or not, and with the "pairwise" diversity term's temperatures
    (`pairwise_temps`) or not, which decides the narrow tile."""
    if e_block > 4:
        return REGISTER_BUDGET_WIDE
    if narrow_tile(e_block, itemsize, pairwise_temps):
        return REGISTER_BUDGET_NARROW
    if write_grad:
        return REGISTER_BUDGET_GRAD if margins else REGISTER_BUDGET_GRAD_WIDE
    return REGISTER_BUDGET


def finish_block(num_warps: int) -> int:
    """Rows reduced per step by the forward's finishing program: four a thread (three running sums
    each), so that the 1-warp programs of short rows hold no more than the 8-warp ones."""
    return 4 * 32 * num_warps


_COUNTERS: dict[torch.device, Tensor] = {}


def _ticket_counter(device: torch.device) -> Tensor:
    """The forward's int32 ticket counter on `device`: zero between calls (the last program of
    each launch resets it), allocated once, so a launch needs no memset. Launches that share it
    must not overlap: one stream per device, as a training loop runs the loss."""
    counter = _COUNTERS.get(device)
    if counter is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # zeros made inside a capture are only recorded: eager calls before the first replay would read garbage
            raise RuntimeError(f"the fused RIDE loss is being captured into a CUDA graph before its first eager call on "
                               f"{device}; run it once outside the capture (a warm-up step) so that its ticket counter "
                               f"is allocated and zeroed there")
        counter = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _on_device(device: torch.device):
    """Launch on the logits' GPU: Triton launches on the current device, which a single process
    on cuda:1 (no torch.cuda.set_device) would leave at cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- launchers


def _div_mode(diversity: str, diversity_factor: float, temperature_mean: float, E: int, B: int) -> tuple[int, float]:
    if diversity_factor == 0.0 or (diversity == "pairwise" and E == 1):
        return _DIV_NONE, 0.0
    if diversity == "mean":
        return _DIV_MEAN, diversity_factor * temperature_mean**2 / B
    return _DIV_PAIRWISE, diversity_factor * temperature_mean**2 / (B * (E - 1))


def _validate(expert_logits, target, margins, class_weights, temperature, diversity):
    check_logits("expert_logits", expert_logits, 3, "[E, B, C]")
    E, B, C = expert_logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"expert_logits has E = {E} experts; the fused kernel supports at most {MAX_EXPERTS}")
    if diversity not in DIVERSITY_MODES:
        raise ValueError(f"diversity must be 'mean' or 'pairwise', got {diversity!r}")
    device = expert_logits.device
    target = check_targets(target, B, C, device, f"expert_logits {tuple(expert_logits.shape)}")
    vecs = [check_vector(n, v, C, device) for n, v in (("margins", margins), ("class_weights", class_weights), ("temperature", temperature))]
    return (target, *vecs)


def _check_tuning(stages, max_registers):
    if not (isinstance(stages, int) and 1 <= stages <= 4):
        raise ValueError(f"stages must be an integer from 1 to 4, got {stages!r}")
    if max_registers is not None and not (isinstance(max_registers, int) and 24 <= max_registers <= 255 and max_registers % 8 == 0):
        raise ValueError(f"max_registers must be a multiple of 8 from 24 to 255 (or None: the kernel's budget), got {max_registers!r}")


def _check_grad_out(grad_out, expert_logits):
    """A gradient buffer: [E, B, C] of the logits' dtype on their device, unit class stride."""
    if grad_out is None:
        return
    E, B, C = expert_logits.shape
    if (grad_out.shape != (E, B, C) or grad_out.dtype != expert_logits.dtype or grad_out.stride(2) != 1
            or grad_out.device != expert_logits.device):
        raise ValueError(f"grad_out must be [E, B, C] = {(E, B, C)} of {expert_logits.dtype} on {expert_logits.device} with unit "
                         f"class stride; got {tuple(grad_out.shape)} {grad_out.dtype} on {grad_out.device} with strides "
                         f"{tuple(grad_out.stride())}")


def _check_grad_scale(grad_scale):
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be a finite number (the grad_output the written gradient is for), got {grad_scale!r}")


def _prepare(expert_logits, target, margins, class_weights, temperature):
    """Unit class stride, contiguous target and float32 vectors; no checks (already validated)."""
    z = expert_logits.detach()
    if z.stride(2) != 1:  # the kernels read the class axis with unit stride
        z = z.contiguous()
    f32 = lambda v: None if v is None else v.detach().to(torch.float32).contiguous()  # noqa: E731
    return z, target.contiguous(), f32(margins), f32(class_weights), f32(temperature)


def _tile(z, temperature, div_mode, block_c):
    """(E_BLOCK, HAS_TEMP, "pairwise" with temperatures, (R, V, num_warps)) of a call: one place for
    the forward and the backward, whose tiles must agree for the same bits (`narrow_tile`)."""
    E, _, C = z.shape
    e_block = next_power_of_2(E)
    has_temp = temperature is not None and div_mode != _DIV_NONE
    pairwise_temps = has_temp and div_mode == _DIV_PAIRWISE
    narrow = narrow_tile(e_block, z.element_size(), pairwise_temps)
    return e_block, has_temp, pairwise_temps, pick_tile(e_block, C, z.element_size(), block_c, narrow)


def _forward(z, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity,
             block_c=None, stats_out=None, part_out=None, weight_sum=None, stages=1, max_registers=None, grad_out=None,
             grad_scale=1.0):
    """Launch forward + finish on prepared inputs: (loss [] float32, stats [B, 3, E], aux [1]).
    With `grad_out` the forward also writes the gradient for grad_output = grad_scale there."""
    E, B, C = z.shape
    device = z.device
    stats = stats_out if stats_out is not None else torch.empty((B, 3, E), dtype=torch.float32, device=device)
    part = part_out if part_out is not None else torch.empty((B, 3), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    aux = torch.empty(1, dtype=torch.float32, device=device)
    counter = _ticket_counter(device)
    div_mode, div_scale = _div_mode(diversity, diversity_factor, temperature_mean, E, B)
    e_block, has_temp, pairwise_temps, (r, v, warps) = _tile(z, temperature, div_mode, block_c)
    dummy = part  # pointer for absent optional vectors (never read: constexpr flags)
    with _on_device(device):
        _ride_loss_fwd_kernel[(B,)](
            z, target,
            margins if margins is not None else dummy,
            class_weights if class_weights is not None else dummy,
            temperature if temperature is not None else dummy,
            stats, part, loss, aux,
            weight_sum.detach().reshape(1).to(torch.float32) if weight_sum is not None else dummy,
            counter, grad_out if grad_out is not None else z, E, B, C, z.stride(0), z.stride(1),
            *((grad_out.stride(0), grad_out.stride(1)) if grad_out is not None else (0, 0)), float(div_scale),
            float(grad_scale),
            HAS_MARGIN=margins is not None, HAS_WEIGHT=class_weights is not None, HAS_TEMP=has_temp,
            HAS_WSUM=weight_sum is not None, DIV_MODE=div_mode, E_BLOCK=e_block, R=r, V=v, FINISH_BLOCK=finish_block(warps),
            STAGES=stages, WRITE_GRAD=grad_out is not None,
            G_ALIGNED=grad_out is not None and (grad_out.stride(1) - z.stride(1)) % 16 == 0,
            num_warps=warps, maxnreg=max_registers or register_budget(e_block, z.element_size(), grad_out is not None,
                                                                     margins is not None, pairwise_temps),
        )
    return loss, stats, aux


def _backward(grad_output, z, target, margins, class_weights, temperature, stats, aux,
              diversity_factor, temperature_mean, diversity, block_c=None, grad_out=None, stages=1, max_registers=None,
              grad_written=False, grad_scale=1.0):
    """Launch the backward on prepared inputs: grad_output * d loss / d z, [E, B, C] in z's dtype.
    `grad_written`: `grad_out` holds the forward's gradient for grad_output = grad_scale (left as
    it is where grad_output is that number, recomputed otherwise)."""
    E, B, C = z.shape
    g = grad_out if grad_out is not None else torch.empty((E, B, C), dtype=z.dtype, device=z.device)
    go = grad_output.detach().reshape(1).to(torch.float32)  # never the logits' dtype: 2^16 is inf in fp16
    div_mode, div_scale = _div_mode(diversity, diversity_factor, temperature_mean, E, B)
    e_block, has_temp, pairwise_temps, (r, v, warps) = _tile(z, temperature, div_mode, block_c)
    dummy = aux
    with _on_device(z.device):
        _ride_loss_bwd_kernel[(B,)](
            z, target,
            margins if margins is not None else dummy,
            class_weights if class_weights is not None else dummy,
            temperature if temperature is not None else dummy,
            stats, aux, go, g, E, B, C, z.stride(0), z.stride(1), g.stride(0), g.stride(1), float(div_scale), float(grad_scale),
            HAS_MARGIN=margins is not None, HAS_WEIGHT=class_weights is not None, HAS_TEMP=has_temp,
            DIV_MODE=div_mode, E_BLOCK=e_block, R=r, V=v, G_ALIGNED=(g.stride(1) - z.stride(1)) % 16 == 0,
            STAGES=stages, GRAD_WRITTEN=grad_written, num_warps=warps,
            maxnreg=max_registers or register_budget(e_block, z.element_size(), pairwise_temps=pairwise_temps),
        )
    return g


def ride_loss_forward(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    block_c: int | None = None,
    stats_out: Tensor | None = None,
    part_out: Tensor | None = None,
    weight_sum: Tensor | None = None,
    stages: int = 1,
    max_registers: int | None = None,
    grad_out: Tensor | None = None,
    grad_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and launch the forward: (loss float32 scalar, stats [B, 3, E], aux [1]).

    `block_c` overrides the class-block width (a power of two >= 16); `stats_out` ([B, 3, E]) and
    `part_out` ([B, 3]) are optional float32 buffers (tests pass poisoned ones); `weight_sum` (one
    element) replaces the classification term's divisor (see the module docstring). Under
    RIDE_FAST_DEBUG=1 the target range is checked too (a host sync); otherwise a target out of
    range yields a NaN loss. `stages` (> 1: the main loop's loads run that many blocks ahead,
    through shared memory) and `max_registers` (instead of `register_budget`) are tuning
    overrides that the GPU check times against the defaults; the results do not depend on them.
    `grad_out` ([E, B, C], the logits' dtype and device, unit class stride): the forward also writes the
    gradient for grad_output = `grad_scale` there (rounded to float32; 1: the loss's own gradient),
    in a second pass over each row right after its first, which
    `ride_loss_backward(..., grad_out=grad_out, grad_written=True, grad_scale=grad_scale)` then
    keeps where grad_output is that number (the same bits it would compute) and recomputes
    otherwise. With DRW weights
    and no `weight_sum` every program sums the divisor itself before its gradient pass (in another
    order than the last program's sum without `grad_out`: the loss and the gradient may differ
    from that path's in the last bit).
    """
    target, margins, class_weights, temperature = _validate(expert_logits, target, margins, class_weights, temperature, diversity)
    _check_tuning(stages, max_registers)
    E, B, C = expert_logits.shape
    for name, buf, shape in (("stats_out", stats_out, (B, 3, E)), ("part_out", part_out, (B, 3))):
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != torch.float32 or not buf.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 {list(shape)} tensor, got {tuple(buf.shape)} {buf.dtype}")
    z, target, margins, class_weights, temperature = _prepare(expert_logits, target, margins, class_weights, temperature)
    if weight_sum is not None and (weight_sum.numel() != 1 or not weight_sum.is_floating_point() or weight_sum.device != z.device):
        raise ValueError(f"weight_sum must be a one-element floating-point tensor on {z.device}, got shape "
                         f"{tuple(weight_sum.shape)} {weight_sum.dtype} on {weight_sum.device}")
    _check_grad_out(grad_out, expert_logits)
    _check_grad_scale(grad_scale)
    return _forward(z, target, margins, class_weights, temperature, diversity_factor, temperature_mean, diversity,
                    block_c, stats_out, part_out, weight_sum, stages, max_registers, grad_out, grad_scale)


def ride_loss_backward(
    grad_output: Tensor,
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None,
    class_weights: Tensor | None,
    temperature: Tensor | None,
    stats: Tensor,
    aux: Tensor,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    block_c: int | None = None,
    grad_out: Tensor | None = None,
    stages: int = 1,
    max_registers: int | None = None,
    grad_written: bool = False,
    grad_scale: float = 1.0,
) -> Tensor:
    """Validate and launch the backward: grad_output * d loss / d expert_logits, [E, B, C] in the
    logits' dtype, from the forward's `stats` and `aux`. `grad_out` is an optional output buffer
    ([E, B, C], the logits' dtype, unit class stride); `stages` and `max_registers` as in the
    forward. `grad_written`: `grad_out` is the buffer the forward wrote the gradient into (see
    `ride_loss_forward`), for grad_output = `grad_scale`: where grad_output is that number every
    program returns at once, reading nothing else (a device-side test: no host sync, fit for a
    CUDA graph)."""
    target, margins, class_weights, temperature = _validate(expert_logits, target, margins, class_weights, temperature, diversity)
    _check_tuning(stages, max_registers)
    E, B, C = expert_logits.shape
    if grad_output.numel() != 1 or not grad_output.is_floating_point():
        raise ValueError(f"grad_output must be a floating-point scalar, got shape {tuple(grad_output.shape)} {grad_output.dtype}")
    if tuple(stats.shape) != (B, 3, E) or aux.shape != (1,):
        raise ValueError(f"stats must be [B, 3, E] = {[B, 3, E]} and aux [1], got {tuple(stats.shape)} and {tuple(aux.shape)}")
    _check_grad_out(grad_out, expert_logits)
    if grad_written and grad_out is None:
        raise ValueError("grad_written=True needs grad_out: the buffer the forward wrote the gradient into")
    _check_grad_scale(grad_scale)
    z, target, margins, class_weights, temperature = _prepare(expert_logits, target, margins, class_weights, temperature)
    return _backward(grad_output, z, target, margins, class_weights, temperature, stats.contiguous(), aux,
                     diversity_factor, temperature_mean, diversity, block_c, grad_out, stages, max_registers, grad_written,
                     grad_scale)
