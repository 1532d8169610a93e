"""The Triton kernels of the fused RIDE loss: the forward (`_ride_loss_fwd_kernel`, with its
finishing reduction `_finish`) and the backward (`_ride_loss_bwd_kernel`). The math, the memory
traffic and the register budget are described in `ride_fast_kernels.ride_loss`, whose launchers
are the only callers.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, temp_ptr,
                MASKED: tl.constexpr, HAS_TEMP: tl.constexpr, EVICT: tl.constexpr):
    """One [E_BLOCK, BLOCK_C] float32 tile of a row and 1/T of its classes. Padded experts read 0;
    padded classes (MASKED tail block only) read -inf."""
    ptrs = z_ptr + z_row + ze_off[:, None] + offs_c[None, :]
    if MASKED:
        c_mask = offs_c < C
        x = tl.load(ptrs, mask=e_mask[:, None] & c_mask[None, :], other=0.0, eviction_policy=EVICT).to(tl.float32)
        x = tl.where(c_mask[None, :], x, float("-inf"))
        if HAS_TEMP:
            inv_t = 1.0 / tl.load(temp_ptr + offs_c, mask=c_mask, other=1.0)
        else:
            inv_t = tl.full(offs_c.shape, 1.0, tl.float32)
    else:
        x = tl.load(ptrs, mask=e_mask[:, None], other=0.0, eviction_policy=EVICT).to(tl.float32)
        if HAS_TEMP:
            inv_t = 1.0 / tl.load(temp_ptr + offs_c)
        else:
            inv_t = tl.full(offs_c.shape, 1.0, tl.float32)
    return x, inv_t


@triton.jit
def _fwd_block(m_z, s_rest, m_u, s_u, t_k, m_v, s_v,
               z_ptr, z_row, ze_off, e_mask, offs_c, C, y, temp_ptr, E, inv_e,
               MASKED: tl.constexpr, HAS_TEMP: tl.constexpr, DIV_MODE: tl.constexpr):
    """Fold one class block into the running sums of the forward (see the module docstring)."""
    x, inv_t = _load_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, temp_ptr, MASKED, HAS_TEMP, "evict_last")
    is_y = (offs_c == y)[None, :]
    # exp(z - max z): every class but the target feeds lse(a_k); the target's a_y comes later
    mz_new = tl.maximum(m_z, tl.max(x, axis=1))
    alpha = tl.exp(m_z - mz_new)
    e = tl.exp(x - mz_new[:, None])
    s_rest = s_rest * alpha + tl.sum(tl.where(is_y, 0.0, e), axis=1)
    if DIV_MODE != 0:
        if HAS_TEMP:
            u = x * inv_t[None, :]
            mu_new = tl.maximum(m_u, tl.max(u, axis=1))
            beta = tl.exp(m_u - mu_new)
            eu = tl.exp(u - mu_new[:, None])
            s_u = s_u * beta + tl.sum(eu, axis=1)
            m_u = mu_new
        else:  # T = 1: u = z, the same exponentials (lse(u) follows from s_rest at the end)
            u = x
            beta = alpha
            eu = e
        # padded experts read 0, so sums over experts need no mask
        if DIV_MODE == 2:
            u_sum = tl.sum(u, axis=0)
            h = E * u - u_sum[None, :]
            if MASKED:  # padded classes: u = -inf, h = nan, eu = 0
                t_k = t_k * beta + tl.sum(tl.where(eu > 0.0, eu * h, 0.0), axis=1)
            else:  # all finite; a padded expert's t_k is never read
                t_k = t_k * beta + tl.sum(eu * h, axis=1)
        if DIV_MODE == 1:
            v = tl.sum(x, axis=0) * inv_e * inv_t
            mv_new = tl.maximum(m_v, tl.max(v, axis=0))
            s_v = s_v * tl.exp(m_v - mv_new) + tl.sum(tl.exp(v - mv_new), axis=0)
            m_v = mv_new
    return mz_new, s_rest, m_u, s_u, t_k, m_v, s_v


@triton.jit
def _ride_loss_fwd_kernel(
    z_ptr, target_ptr, margin_ptr, weight_ptr, temp_ptr,  # inputs
    stats_ptr, part_ptr, loss_ptr, aux_ptr,  # outputs: [B, 3, E], [B, 3], [], [1] float32
    counter_ptr,  # int32 ticket counter, 0 between calls (the last program resets it)
    E, B, C,
    stride_ze, stride_zb,  # logits strides (class stride is 1)
    div_scale,  # lam * Tm^2 / B ("mean") or lam * Tm^2 / (B (E-1)) ("pairwise")
    HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_TEMP: tl.constexpr,
    DIV_MODE: tl.constexpr,  # 0 none, 1 mean, 2 pairwise
    E_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, FINISH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = row * stride_zb
    offs_e = tl.arange(0, E_BLOCK)
    e_mask = offs_e < E
    ze_off = offs_e.to(tl.int64) * stride_ze

    y = tl.load(target_ptr + row).to(tl.int32)
    y_ok = (y >= 0) & (y < C)
    if HAS_MARGIN:
        m_y = tl.load(margin_ptr + y, mask=y_ok, other=0.0)
    else:
        m_y = 0.0
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
    else:
        w_y = 1.0
    a_y = tl.load(z_ptr + z_row + ze_off + y, mask=e_mask & y_ok, other=0.0).to(tl.float32) - m_y

    m_z = tl.full([E_BLOCK], float("-inf"), tl.float32)
    s_rest = tl.zeros([E_BLOCK], dtype=tl.float32)
    m_u = tl.full([E_BLOCK], float("-inf"), tl.float32)
    s_u = tl.zeros([E_BLOCK], dtype=tl.float32)
    t_k = tl.zeros([E_BLOCK], dtype=tl.float32)
    m_v = float("-inf")
    s_v = 0.0
    inv_e = 1.0 / E
    c_main = C - C % BLOCK_C
    for start in range(0, c_main, BLOCK_C):  # full blocks, no class mask
        offs_c = start + tl.arange(0, BLOCK_C)
        m_z, s_rest, m_u, s_u, t_k, m_v, s_v = _fwd_block(
            m_z, s_rest, m_u, s_u, t_k, m_v, s_v, z_ptr, z_row, ze_off, e_mask, offs_c, C, y, temp_ptr, E, inv_e,
            False, HAS_TEMP, DIV_MODE)
    if c_main < C:  # the partial last block
        offs_c = c_main + tl.arange(0, BLOCK_C)
        m_z, s_rest, m_u, s_u, t_k, m_v, s_v = _fwd_block(
            m_z, s_rest, m_u, s_u, t_k, m_v, s_v, z_ptr, z_row, ze_off, e_mask, offs_c, C, y, temp_ptr, E, inv_e,
            True, HAS_TEMP, DIV_MODE)

    lse_a = m_z + tl.log(s_rest + tl.exp(a_y - m_z))
    nll = tl.where(e_mask, lse_a - a_y, 0.0)
    cls_part = w_y * tl.sum(nll, axis=0)
    cls_part = tl.where(y_ok, cls_part, float("nan"))  # an out-of-range target poisons the loss
    slot2 = tl.zeros([E_BLOCK], dtype=tl.float32)
    div_part = 0.0
    if HAS_TEMP:
        lse_u = m_u + tl.log(s_u)
    else:  # lse(z): the shared sum plus the target's own exp(z_y - max)
        s_u = s_rest + tl.exp(a_y + m_y - m_z)
        lse_u = m_z + tl.log(s_u)
    if DIV_MODE == 1:
        lse_v = m_v + tl.log(s_v)
        slot2 = slot2 + lse_v
        div_part = div_scale * tl.sum(tl.where(e_mask, lse_u - lse_v, 0.0), axis=0)
    if DIV_MODE == 2:
        l_sum = tl.sum(tl.where(e_mask, lse_u, 0.0), axis=0)
        slot2 = t_k / s_u - E * lse_u + l_sum  # K_k
        div_part = div_scale * tl.sum(tl.where(e_mask, slot2, 0.0), axis=0)
    st = stats_ptr + row * 3 * E + offs_e
    tl.store(st, lse_a, mask=e_mask)
    tl.store(st + E, lse_u, mask=e_mask)
    tl.store(st + 2 * E, slot2, mask=e_mask)
    tl.store(part_ptr + row * 3, cls_part)
    tl.store(part_ptr + row * 3 + 1, div_part)
    tl.store(part_ptr + row * 3 + 2, w_y)
    # the last program to finish reduces every row's partial sums (the atomic orders the stores
    # above before it: release; and the other programs' stores before the loads below: acquire)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == B - 1:
        _finish(part_ptr, loss_ptr, aux_ptr, B, FINISH_BLOCK)
        tl.store(counter_ptr, 0)  # ready for the next call


@triton.jit
def _finish(part_ptr, loss_ptr, aux_ptr, B, BLOCK: tl.constexpr):
    """loss = sum_i part[i, 0] / sum_i part[i, 2] + sum_i part[i, 1]; aux[0] = sum_i part[i, 2].
    One program, fixed order: deterministic whichever program runs it."""
    cls = tl.zeros([BLOCK], dtype=tl.float32)
    div = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < B
        cls += tl.load(part_ptr + offs * 3, mask=mask, other=0.0, cache_modifier=".cg")
        div += tl.load(part_ptr + offs * 3 + 1, mask=mask, other=0.0, cache_modifier=".cg")
        wsum += tl.load(part_ptr + offs * 3 + 2, mask=mask, other=0.0, cache_modifier=".cg")
    w = tl.sum(wsum, axis=0)
    tl.store(loss_ptr, tl.sum(cls, axis=0) / w + tl.sum(div, axis=0))
    tl.store(aux_ptr, w)


@triton.jit
def _bwd_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, y, m_y, temp_ptr, E, inv_e,
               g_ptr, g_row, ge_off, lse_a, lse_u, slot2, ratio, pa_y, cg, dg,
               MASKED: tl.constexpr, HAS_TEMP: tl.constexpr, DIV_MODE: tl.constexpr):
    """Write grad_output * d loss / d z for one class block (see the module docstring)."""
    x, inv_t = _load_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, temp_ptr, MASKED, HAS_TEMP, "evict_first")
    is_y = (offs_c == y)[None, :]
    if HAS_TEMP:
        u = x * inv_t[None, :]
        a = tl.where(is_y, x - m_y, x)
        pa = tl.exp(a - lse_a[:, None])
        q = tl.exp(u - lse_u[:, None])
    else:  # one exponential: softmax(a) = q * exp(lse_u - lse_a) off the target
        u = x
        q = tl.exp(x - lse_u[:, None])
        pa = tl.where(is_y, pa_y[:, None], q * ratio[:, None])
    g = cg * (pa - is_y.to(tl.float32))
    if DIV_MODE == 1:
        v = tl.sum(x, axis=0) * inv_e * inv_t  # padded experts read 0
        p = tl.exp(v - slot2)  # slot2 holds lse(zbar / T), the same for every expert
        g += dg * (q - p[None, :]) * inv_t[None, :]
    if DIV_MODE == 2:
        log_q = u - lse_u[:, None]
        s_sum = tl.sum(log_q, axis=0)  # a padded expert's log_q is 0 - 0
        q_sum = tl.sum(tl.where(e_mask[:, None], q, 0.0), axis=0)
        g += dg * (q * (E * log_q - s_sum[None, :] - slot2[:, None]) + E * q - q_sum[None, :]) * inv_t[None, :]
    ptrs = g_ptr + g_row + ge_off[:, None] + offs_c[None, :]
    if MASKED:
        tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=e_mask[:, None] & (offs_c < C)[None, :], eviction_policy="evict_first")
    else:
        tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=e_mask[:, None], eviction_policy="evict_first")


@triton.jit
def _ride_loss_bwd_kernel(
    z_ptr, target_ptr, margin_ptr, weight_ptr, temp_ptr, stats_ptr, aux_ptr, go_ptr,  # inputs
    g_ptr,  # output [E, B, C], contiguous
    E, B, C,
    stride_ze, stride_zb, stride_ge, stride_gb,
    div_scale,
    HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_TEMP: tl.constexpr,
    DIV_MODE: tl.constexpr, E_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # rows in reverse order: the rows the forward read last are the likeliest still in L2
    row = (B - 1 - tl.program_id(0)).to(tl.int64)
    z_row = row * stride_zb
    g_row = row * stride_gb
    offs_e = tl.arange(0, E_BLOCK)
    e_mask = offs_e < E
    ze_off = offs_e.to(tl.int64) * stride_ze
    ge_off = offs_e.to(tl.int64) * stride_ge

    y = tl.load(target_ptr + row).to(tl.int32)
    y_ok = (y >= 0) & (y < C)
    if HAS_MARGIN:
        m_y = tl.load(margin_ptr + y, mask=y_ok, other=0.0)
    else:
        m_y = 0.0
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
    else:
        w_y = 1.0
    go = tl.load(go_ptr).to(tl.float32)  # grad_output stays float32
    cg = w_y / tl.load(aux_ptr) * go
    dg = div_scale * go
    st = stats_ptr + row * 3 * E + offs_e
    lse_a = tl.load(st, mask=e_mask, other=0.0)
    lse_u = tl.load(st + E, mask=e_mask, other=0.0)
    ratio = tl.zeros([E_BLOCK], dtype=tl.float32)
    pa_y = tl.zeros([E_BLOCK], dtype=tl.float32)
    if not HAS_TEMP:
        z_y = tl.load(z_ptr + z_row + ze_off + y, mask=e_mask & y_ok, other=0.0).to(tl.float32)
        ratio = tl.exp(lse_u - lse_a)
        pa_y = tl.exp(z_y - m_y - lse_a)
    if DIV_MODE == 1:
        slot2 = tl.load(stats_ptr + row * 3 * E + 2 * E)  # lse(zbar / T): one value per row
    else:
        slot2 = tl.load(st + 2 * E, mask=e_mask, other=0.0)
    inv_e = 1.0 / E
    c_main = C - C % BLOCK_C
    for start in range(0, c_main, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        _bwd_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, y, m_y, temp_ptr, E, inv_e,
                   g_ptr, g_row, ge_off, lse_a, lse_u, slot2, ratio, pa_y, cg, dg,
                   False, HAS_TEMP, DIV_MODE)
    if c_main < C:
        offs_c = c_main + tl.arange(0, BLOCK_C)
        _bwd_block(z_ptr, z_row, ze_off, e_mask, offs_c, C, y, m_y, temp_ptr, E, inv_e,
                   g_ptr, g_row, ge_off, lse_a, lse_u, slot2, ratio, pa_y, cg, dg,
                   True, HAS_TEMP, DIV_MODE)
