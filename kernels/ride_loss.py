"""Fused RIDE stage-1 loss: every expert's LDAM cross-entropy, the diversity KL and the gradient
with respect to every expert's logits, in one kernel launch (plus a tiny one for the weight sum).

Shape legend: E experts, B images (rows), C classes.

    expert_logits  [E, B, C]  s-scaled logits z_k (float32, bfloat16 or float16; any strides)
    target         [B]        int64 (or int32) class indices y_i
    margins        [C]        s * m_c, subtracted from the target logit only (None: plain CE)
    class_weights  [C]        DRW weights w_c (None: plain batch mean)
    temperature    [C]        diversity temperatures T_c (None: all ones)
    grad           [E, B, C]  d loss / d expert_logits, in the logits' dtype (contiguous)
    row_loss       [B]        float32 per-image share of the loss; loss = row_loss.sum()

Math (all in float32), with a_k = z_k - margins[y] * onehot(y), q_k = softmax(z_k / T),
pbar = softmax(zbar / T) where zbar = mean_k z_k (pbar carries no gradient), Tm = temperature_mean,
lam = diversity_factor, c_i = w_{y_i} / sum_j w_{y_j} (or 1/B without weights):

    loss = sum_i c_i sum_k [lse(a_ki) - a_ki[y_i]]                                  LDAM / CE
         + lam Tm^2 / B       sum_i sum_k KL(pbar_i || q_ki)                         "mean"
         + lam Tm^2 / (B (E-1)) sum_i sum_k K_ki,                                  "pairwise"
           K_ki = sum_{j!=k} KL(q_ki || q_ji) = sum_c q_kic (E log q_kic - S_ic),  S = sum_j log q_j

    d loss / d z_k = c_i (softmax(a_ki) - onehot(y_i))
                   + lam Tm^2 / B (q_ki - pbar_i) / T                                "mean"
                   + lam Tm^2 / (B (E-1)) [q_k (E log q_k - S - K_k) + E q_k - sum_j q_j] / T
                                                                                    "pairwise"
(the pairwise gradient goes through both distributions of every pair; with Q = sum_j q_j it is
d/du_k of E sum_k <q_k, log q_k> - <Q, S>, using sum_c Q_c = E). Because sum_k z_k / T = E zbar / T,
the "mean" KL of a row needs only the log-sum-exps: sum_k KL(pbar || q_k) = sum_k lse(z_k / T)
- E lse(zbar / T).

Passes over one row of E x C values (one program per row, all E experts in one
[E_BLOCK, BLOCK_C] tile, E_BLOCK = next_pow2(E), the class axis in blocks of BLOCK_C; the
gradient is stored once, already final, in a contiguous [E, B, C] buffer of the logits' dtype):
  pass 1  online max / sum-exp per expert of a_k and z_k / T, and of zbar / T ("mean"):
          with a_k[y] (one load per expert) this gives the CE loss and the "mean" KL
  pass 2  ("pairwise" only) K_k, which needs every expert's log q at each class
  last    (when a gradient is wanted) writes d loss / d z for the whole row
The row's loss goes to row_loss[i]; the launcher sums it with torch (no atomics, deterministic).
A row is read from DRAM once (later passes mostly hit L2: one row is E*C*itemsize bytes) and its
gradient written once: the floor for a loss with its gradient.

The weighted-mean denominator sum_i w_{y_i} is reduced on the device by `_weight_sum_kernel`
(never read back); the backward only scales the stored gradient by grad_output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from ride_fast_kernels._utils import (
    MAX_EXPERTS,
    check_logits,
    check_targets,
    check_vector,
    next_power_of_2,
    pick_block_c,
    pick_num_warps,
)
from torch import Tensor

__all__ = ["DIVERSITY_MODES", "ride_loss_forward", "ride_loss_fused"]

#: constexpr codes of the diversity term
_DIV_NONE, _DIV_MEAN, _DIV_PAIRWISE = 0, 1, 2
DIVERSITY_MODES = {"mean": _DIV_MEAN, "pairwise": _DIV_PAIRWISE}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _weight_sum_kernel(w_ptr, target_ptr, out_ptr, B, C, BLOCK_B: tl.constexpr):
    """out[0] = sum_i w[target[i]] (out-of-range targets contribute 0). One program."""
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        y = tl.load(target_ptr + offs, mask=offs < B, other=-1).to(tl.int32)
        ok = (offs < B) & (y >= 0) & (y < C)
        acc += tl.load(w_ptr + y, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit
def _online_lse_2d(m, s, x):
    """Online log-sum-exp over the class axis of x [E_BLOCK, BLOCK_C]: running max m, sum s [E_BLOCK]."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def _online_lse_1d(m, s, x):
    """Online log-sum-exp of a vector x [BLOCK_C]: running max m and sum s (scalars)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, s


@triton.jit
def _inv_temperature(temp_ptr, offs_c, c_mask, HAS_TEMP: tl.constexpr, BLOCK_C: tl.constexpr):
    """1 / T_c for one block of classes (ones without a temperature vector)."""
    if HAS_TEMP:
        return 1.0 / tl.load(temp_ptr + offs_c, mask=c_mask, other=1.0)
    else:
        return tl.full([BLOCK_C], 1.0, tl.float32)


@triton.jit
def _load_tile(z_ptr, row_off, e_off, offs_c, e_mask, c_mask):
    """[E_BLOCK, BLOCK_C] float32 tile of one row: padded experts read 0, padded classes -inf."""
    ptrs = z_ptr + row_off + e_off[:, None] + offs_c[None, :]
    x = tl.load(ptrs, mask=e_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    return tl.where(c_mask[None, :], x, float("-inf"))


@triton.jit
def _ride_loss_kernel(
    z_ptr, target_ptr, margin_ptr, weight_ptr, temp_ptr, wsum_ptr,  # inputs
    grad_ptr, row_loss_ptr,  # outputs
    E, B, C,
    stride_ze, stride_zb,  # logits strides (class stride is 1)
    stride_ge, stride_gb,  # gradient strides (class stride is 1)
    div_scale,  # lam * Tm^2 / B ("mean") or lam * Tm^2 / (B (E-1)) ("pairwise")
    HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_TEMP: tl.constexpr,
    DIV_MODE: tl.constexpr,  # 0 none, 1 mean, 2 pairwise
    COMPUTE_GRAD: tl.constexpr,
    E_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    z_row = row64 * stride_zb
    g_row = row64 * stride_gb

    offs_e = tl.arange(0, E_BLOCK)
    e_mask = offs_e < E
    ze_off = offs_e.to(tl.int64) * stride_ze
    ge_off = offs_e.to(tl.int64) * stride_ge

    # ---- per-row scalars: target, its margin, the CE coefficient c_i
    y = tl.load(target_ptr + row).to(tl.int32)
    y_ok = (y >= 0) & (y < C)
    if HAS_MARGIN:
        m_y = tl.load(margin_ptr + y, mask=y_ok, other=0.0)
    else:
        m_y = 0.0
    if HAS_WEIGHT:
        coef = tl.load(weight_ptr + y, mask=y_ok, other=0.0) / tl.load(wsum_ptr)
    else:
        coef = 1.0 / B
    # target logit of every expert, with its margin: a_k[y]
    a_y = tl.load(z_ptr + z_row + ze_off + y, mask=e_mask & y_ok, other=0.0).to(tl.float32) - m_y

    # ---- pass 1: online log-sum-exp of a_k, z_k / T and zbar / T
    m_a = tl.full([E_BLOCK], float("-inf"), tl.float32)
    s_a = tl.zeros([E_BLOCK], dtype=tl.float32)
    m_u = tl.full([E_BLOCK], float("-inf"), tl.float32)
    s_u = tl.zeros([E_BLOCK], dtype=tl.float32)
    m_v = float("-inf")
    s_v = 0.0
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        x = _load_tile(z_ptr, z_row, ze_off, offs_c, e_mask, c_mask)
        is_y = (offs_c == y)[None, :]
        a = tl.where(is_y, x - m_y, x)
        m_a, s_a = _online_lse_2d(m_a, s_a, a)
        if DIV_MODE != 0:
            inv_t = _inv_temperature(temp_ptr, offs_c, c_mask, HAS_TEMP, BLOCK_C)
            m_u, s_u = _online_lse_2d(m_u, s_u, x * inv_t[None, :])
            if DIV_MODE == 1:
                zbar = tl.sum(tl.where(e_mask[:, None], x, 0.0), axis=0) / E
                m_v, s_v = _online_lse_1d(m_v, s_v, zbar * inv_t)
    lse_a = m_a + tl.log(s_a)
    lse_u = tl.zeros([E_BLOCK], dtype=tl.float32)
    lse_v = 0.0
    if DIV_MODE != 0:
        lse_u = m_u + tl.log(s_u)
        if DIV_MODE == 1:
            lse_v = m_v + tl.log(s_v)

    # ---- pass 2 ("pairwise"): K_k = sum_c q_kc (E log q_kc - S_c)
    kpair = tl.zeros([E_BLOCK], dtype=tl.float32)
    if DIV_MODE == 2:
        for start in range(0, C, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            c_mask = offs_c < C
            valid = e_mask[:, None] & c_mask[None, :]
            x = _load_tile(z_ptr, z_row, ze_off, offs_c, e_mask, c_mask)
            inv_t = _inv_temperature(temp_ptr, offs_c, c_mask, HAS_TEMP, BLOCK_C)
            logq = tl.where(valid, x * inv_t[None, :] - lse_u[:, None], 0.0)
            q = tl.where(valid, tl.exp(logq), 0.0)
            s_sum = tl.sum(logq, axis=0)
            kpair += tl.sum(q * (E * logq - s_sum[None, :]), axis=1)

    # ---- last pass: the gradient
    if COMPUTE_GRAD:
        for start in range(0, C, BLOCK_C):
            offs_c = start + tl.arange(0, BLOCK_C)
            c_mask = offs_c < C
            valid = e_mask[:, None] & c_mask[None, :]
            x = _load_tile(z_ptr, z_row, ze_off, offs_c, e_mask, c_mask)
            if DIV_MODE != 0:
                inv_t = _inv_temperature(temp_ptr, offs_c, c_mask, HAS_TEMP, BLOCK_C)
                logq = tl.where(valid, x * inv_t[None, :] - lse_u[:, None], 0.0)
                q = tl.where(valid, tl.exp(logq), 0.0)
                if DIV_MODE == 1:
                    zbar = tl.sum(tl.where(e_mask[:, None], x, 0.0), axis=0) / E
                    p = tl.where(c_mask, tl.exp(zbar * inv_t - lse_v), 0.0)
                    g_div = (q - p[None, :]) * inv_t[None, :]
                else:
                    s_sum = tl.sum(logq, axis=0)
                    q_sum = tl.sum(q, axis=0)
                    g_div = (q * (E * logq - s_sum[None, :] - kpair[:, None]) + E * q - q_sum[None, :]) * inv_t[None, :]
            is_y = (offs_c == y)[None, :]
            a = tl.where(is_y, x - m_y, x)
            g = coef * (tl.exp(a - lse_a[:, None]) - is_y.to(tl.float32))
            if DIV_MODE != 0:
                g += div_scale * g_div
            g_ptrs = grad_ptr + g_row + ge_off[:, None] + offs_c[None, :]
            tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=valid)

    # ---- the row's loss
    nll = tl.where(e_mask, lse_a - a_y, 0.0)
    loss = coef * tl.sum(nll, axis=0)
    if DIV_MODE == 1:  # sum_k KL(pbar || q_k) = sum_k lse(z_k / T) - E lse(zbar / T)
        loss += div_scale * tl.sum(tl.where(e_mask, lse_u - lse_v, 0.0), axis=0)
    if DIV_MODE == 2:
        loss += div_scale * tl.sum(tl.where(e_mask, kpair, 0.0), axis=0)
    loss = tl.where(y_ok, loss, float("nan"))  # an out-of-range target poisons the loss
    tl.store(row_loss_ptr + row, loss)


# --------------------------------------------------------------------------- launchers


def _weight_sum(class_weights: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """sum_i w[target[i]] as a float32 [1] device tensor (no host sync)."""
    out = torch.empty(1, dtype=torch.float32, device=target.device)
    _weight_sum_kernel[(1,)](class_weights, target, out, target.numel(), n_classes, BLOCK_B=1024, num_warps=4)
    return out


def ride_loss_forward(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    compute_grad: bool = True,
    block_c: int | None = None,
    grad_out: Tensor | None = None,
    row_loss_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Launch the fused kernel: returns (loss float32 scalar, grad [E, B, C] or None).

    `block_c` overrides the class-block width (a power of two >= 16); `grad_out` ([E, B, C],
    contiguous, the logits' dtype) and `row_loss_out` ([B] float32) are optional output buffers
    (tests pass poisoned ones). Validates shapes, dtypes and devices; under RIDE_FAST_DEBUG=1 also
    the target range (a host sync). A target out of range otherwise yields a NaN loss.
    """
    check_logits("expert_logits", expert_logits, 3, "[E, B, C]")
    E, B, C = expert_logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"expert_logits has E = {E} experts; the fused kernel supports at most {MAX_EXPERTS}")
    if diversity not in DIVERSITY_MODES:
        raise ValueError(f"diversity must be 'mean' or 'pairwise', got {diversity!r}")
    device = expert_logits.device
    target = check_targets(target, B, C, device, f"expert_logits {tuple(expert_logits.shape)}")
    margins = check_vector("margins", margins, C, device)
    class_weights = check_vector("class_weights", class_weights, C, device)
    temperature = check_vector("temperature", temperature, C, device)

    z = expert_logits.detach()
    if z.stride(2) != 1:  # the kernel reads the class axis with unit stride (coalesced)
        z = z.contiguous()

    if compute_grad:
        if grad_out is None:
            grad_out = torch.empty((E, B, C), dtype=z.dtype, device=device)
        elif grad_out.shape != (E, B, C) or grad_out.dtype != z.dtype or grad_out.stride(2) != 1 or grad_out.device != device:
            raise ValueError(f"grad_out must be [E, B, C] = {(E, B, C)} of {z.dtype} on {device} with unit class stride")
        grad_arg = grad_out
    else:
        grad_out = None
        grad_arg = z  # never written (COMPUTE_GRAD=False)
    if row_loss_out is None:
        row_loss_out = torch.empty(B, dtype=torch.float32, device=device)
    elif row_loss_out.shape != (B,) or row_loss_out.dtype != torch.float32 or not row_loss_out.is_contiguous():
        raise ValueError(f"row_loss_out must be a contiguous float32 [B] = [{B}] tensor, got {tuple(row_loss_out.shape)} {row_loss_out.dtype}")

    if diversity_factor == 0.0 or (diversity == "pairwise" and E == 1):
        div_mode, div_scale = _DIV_NONE, 0.0
    elif diversity == "mean":
        div_mode, div_scale = _DIV_MEAN, diversity_factor * temperature_mean**2 / B
    else:
        div_mode, div_scale = _DIV_PAIRWISE, diversity_factor * temperature_mean**2 / (B * (E - 1))

    wsum = _weight_sum(class_weights, target, C) if class_weights is not None else row_loss_out  # dummy ptr
    e_block = next_power_of_2(E)
    bc = pick_block_c(E, C, block_c)
    dummy = row_loss_out  # pointer for absent optional vectors (never read: constexpr flags)
    _ride_loss_kernel[(B,)](
        z, target,
        margins if margins is not None else dummy,
        class_weights if class_weights is not None else dummy,
        temperature if temperature is not None else dummy,
        wsum,
        grad_arg, row_loss_out,
        E, B, C,
        z.stride(0), z.stride(1),
        grad_arg.stride(0), grad_arg.stride(1),
        float(div_scale),
        HAS_MARGIN=margins is not None,
        HAS_WEIGHT=class_weights is not None,
        HAS_TEMP=temperature is not None,
        DIV_MODE=div_mode,
        COMPUTE_GRAD=compute_grad,
        E_BLOCK=e_block,
        BLOCK_C=bc,
        num_warps=pick_num_warps(e_block * bc),
    )
    return row_loss_out.sum(), grad_out


# --------------------------------------------------------------------------- autograd


class _RideLossFunction(torch.autograd.Function):
    """Forward = the fused kernel (loss and gradient); backward = gradient * grad_output."""

    @staticmethod
    def forward(ctx, expert_logits, target, margins, class_weights, temperature,
                diversity_factor, temperature_mean, diversity, block_c):
        loss, grad = ride_loss_forward(
            expert_logits, target, margins, class_weights, temperature,
            diversity_factor, temperature_mean, diversity,
            compute_grad=ctx.needs_input_grad[0], block_c=block_c,
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # out of place, so a second backward (retain_graph=True) sees the unscaled gradient
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None, None


def ride_loss_fused(
    expert_logits: Tensor,
    target: Tensor,
    margins: Tensor | None = None,
    class_weights: Tensor | None = None,
    temperature: Tensor | None = None,
    diversity_factor: float = 0.0,
    temperature_mean: float = 1.0,
    diversity: str = "mean",
    block_c: int | None = None,
) -> Tensor:
    """The RIDE loss (individual LDAM + diversity, summed over experts) as one fused op.

    Equals `ride_fast.ops.ride_loss_reference(..., individual=True)`; differentiable with respect
    to `expert_logits` only (margins, weights and temperatures are constants). Returns a float32
    scalar; the gradient comes back in the logits' dtype.
    """
    return _RideLossFunction.apply(
        expert_logits, target, margins, class_weights, temperature,
        float(diversity_factor), float(temperature_mean), diversity, block_c,
    )
