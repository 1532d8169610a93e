"""The Triton kernels of the fused RIDE loss: the forward (`_ride_loss_fwd_kernel`, with its
finishing reduction `_finish`) and the backward (`_ride_loss_bwd_kernel`), which runs a row's
gradient pass `_bwd_row`; the forward runs it too, after its own pass, when it writes the gradient
itself (WRITE_GRAD). The math, the memory traffic, the tile shape and the register budget are
described in `ride_fast_kernels.ride_loss`, whose launchers are the only callers; the tile
loads and stores and the arithmetic kept off the MUFU are in `ride_fast_kernels.ride_loss_tiles`.

Tile: [R, V, E_BLOCK] float32, R = 32 num_warps rows of V consecutive classes (one vector load
per expert and thread), the E_BLOCK experts joined as the minor axis (`tl.join` keeps a joined
axis inside each thread). Sums over experts and over a thread's V classes are therefore register
arithmetic; the forward keeps its running maxima and sums per thread ([R, E_BLOCK]) and reduces
across threads once per row.

Exponentials are base 2 with log2(e) (and 1/T) folded into one multiply-add. The running maxima
are integers in log2 units (a ceiling of the true maximum, kept negated: n = -m is the addend of
that multiply-add), so rescaling a sum by 2^(m_old - m_new) is an exponent-field shift (`_exp2i`)
rather than an exponential; the largest term of a sum stays in (1/2, 1]. The MUFU computes only
the per-logit exponentials: pbar's per-class ones (`_exp2_fma`) and 1/T (`_rcp`, one per thread
and tile) run on the FMA pipe.
"""
from __future__ import annotations

import triton
import triton.language as tl
from ride_fast_kernels.ride_loss_tiles import (_exp2_fma, _exp2i, _inv_temp, _join3, _load_tile, _margin, _rest_classes,
                                                _row_split, _split3, _store_tile, _target_logits)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
BIG = tl.constexpr(1e30)  # the negated running maxima's start: finite, so no inf - inf


@triton.jit
def _fwd_tile(n_z, s_rest, n_u, s_u, t_k, n_v, s_v,
              z_ptr, z_row, stride_ze, E, offs, C, y, temp_ptr, inv_e,
              R: tl.constexpr, V: tl.constexpr, E_BLOCK: tl.constexpr,
              MASKED: tl.constexpr, HAS_TEMP: tl.constexpr, DIV_MODE: tl.constexpr):
    """Fold one [R, V, E_BLOCK] tile into the per-thread running sums ([R, E_BLOCK]; [R] for
    pbar), in log2 units. The running maxima are kept negated (n = -m, integer-valued), so that
    exp2(w - m) is one multiply-add or add with n, no negation (see the module docstring)."""
    x = _load_tile(z_ptr, z_row, stride_ze, E, offs, C, R, V, E_BLOCK, MASKED, "evict_last")
    is_y = (offs == y)[:, :, None]
    # exp(z - max z): every class but the target feeds lse(a_k); the target's a_y comes later
    nz_new = tl.minimum(n_z, tl.math.floor(tl.max(x, axis=1) * -LOG2E))
    e = tl.exp2(x * LOG2E + nz_new[:, None, :])
    alpha = _exp2i(nz_new - n_z)
    s_rest = s_rest * alpha + tl.sum(tl.where(is_y, 0.0, e), axis=1)
    if DIV_MODE != 0:
        if HAS_TEMP:
            k_n = _inv_temp(temp_ptr, offs, C, -LOG2E, R, V, MASKED)  # -log2(e) / T, [R, V]
            k_x = k_n[:, :, None]
            w_n = x * k_x  # -u in log2 units
            nu_new = tl.minimum(n_u, tl.math.floor(tl.min(w_n, axis=1)))
            beta = _exp2i(nu_new - n_u)
            eu = tl.exp2(nu_new[:, None, :] - w_n)
            s_u = s_u * beta + tl.sum(eu, axis=1)
            n_u = nu_new
        else:  # T = 1: u = z, the same exponentials (lse(u) follows from s_rest at the end)
            k_n = -LOG2E
            k_x = -LOG2E
            beta = alpha
            eu = e
        # padded experts read 0, so sums over experts need no mask
        if DIV_MODE == 2:
            h = (tl.sum(x, axis=2) * k_n)[:, :, None] - x * (E * k_x)  # E u - sum_j u_j, log2 units
            if MASKED:  # padded classes: x = -inf, h = nan, eu = 0
                t_k = t_k * beta + tl.sum(tl.where(eu > 0.0, eu * h, 0.0), axis=1)
            else:  # all finite; a padded expert's t_k is never read
                t_k = t_k * beta + tl.sum(eu * h, axis=1)
        if DIV_MODE == 1:
            v_e = tl.sum(x, axis=2) * k_n  # -E zbar / T, log2 units (1/E is applied below)
            nv_new = tl.minimum(n_v, tl.math.floor(tl.min(v_e, axis=1) * inv_e))
            s_v = s_v * _exp2i(nv_new - n_v) + tl.sum(_exp2_fma(nv_new[:, None] - v_e * inv_e, MASKED), axis=1)
            n_v = nv_new
    return nz_new, s_rest, n_u, s_u, t_k, n_v, s_v


@triton.jit
def _ride_loss_fwd_kernel(
    z_ptr, target_ptr, margin_ptr, weight_ptr, temp_ptr,  # inputs
    stats_ptr, part_ptr, loss_ptr, aux_ptr,  # outputs: [B, 3, E], [B, 3], [], [1] float32
    wsum_ptr,  # [1] float32: the classification term's divisor when HAS_WSUM (else its own sum_i w_{y_i})
    counter_ptr,  # int32 ticket counter, 0 between calls (the last program resets it)
    g_ptr,  # [E, B, C] output when WRITE_GRAD: grad_scale * d loss / d z, in z's dtype
    E, B, C,
    stride_ze, stride_zb,  # logits strides (class stride is 1)
    stride_ge, stride_gb,  # gradient strides (WRITE_GRAD)
    div_scale,  # lam * Tm^2 / B ("mean") or lam * Tm^2 / (B (E-1)) ("pairwise")
    grad_scale,  # WRITE_GRAD: the grad_output the gradient is written for (float32; 1 for a loss not scaled)
    HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_WSUM: tl.constexpr,
    DIV_MODE: tl.constexpr,  # 0 none, 1 mean, 2 pairwise
    E_BLOCK: tl.constexpr, R: tl.constexpr, V: tl.constexpr, FINISH_BLOCK: tl.constexpr,
    STAGES: tl.constexpr = 1,  # > 1: the main loop's logit loads run that many blocks ahead (cp.async into shared memory)
    WRITE_GRAD: tl.constexpr = False,  # a second pass over the row (from L2) writes its gradient
    G_ALIGNED: tl.constexpr = False,  # as in the backward
):
    BLOCK_C: tl.constexpr = R * V
    stride_ze = stride_ze.to(tl.int64)  # expert offsets (E - 1) B C may pass 2^31 elements
    row = tl.program_id(0).to(tl.int64)
    z_row = row * stride_zb
    offs_e = tl.arange(0, E_BLOCK)
    e_mask = offs_e < E
    ze_off = offs_e.to(tl.int64) * stride_ze

    y = tl.load(target_ptr + row).to(tl.int32)
    y_ok = (y >= 0) & (y < C)
    # the "pairwise" gradient-writing forward of 2-byte logits with temperatures loads the target's
    # margin and logits after its first pass (`_target_logits`), where they are used: held through
    # it, they spill at 64 registers (float32 logits run the narrow tile instead: there the late
    # loads spill more, `ride_loss.narrow_tile`)
    LATE_TARGET: tl.constexpr = (WRITE_GRAD and HAS_MARGIN and HAS_TEMP and DIV_MODE == 2
                                 and z_ptr.dtype.element_ty.primitive_bitwidth == 16)
    if not LATE_TARGET:
        m_y = _margin(margin_ptr, y, y_ok, HAS_MARGIN)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
    else:
        w_y = 1.0
    if not LATE_TARGET:
        z_y, a_y = _target_logits(z_ptr, z_row, ze_off, e_mask, y, y_ok, m_y)
    OWN_WSUM: tl.constexpr = WRITE_GRAD and HAS_WEIGHT and not HAS_WSUM
    w_div = B * 1.0  # the classification term's divisor without weights, sum_i 1

    inv_e = 1.0 / E
    h, end, rest = _row_split(z_row, C, BLOCK_C)
    n_z = tl.full([R, E_BLOCK], BIG, tl.float32)
    s_rest = tl.zeros([R, E_BLOCK], dtype=tl.float32)
    n_u = tl.full([R, E_BLOCK], BIG, tl.float32)
    s_u = tl.zeros([R, E_BLOCK], dtype=tl.float32)
    t_k = tl.zeros([R, E_BLOCK], dtype=tl.float32)
    n_v = tl.full([R], BIG, tl.float32)
    s_v = tl.zeros([R], dtype=tl.float32)
    cls = tl.arange(0, R)[:, None] * V + tl.arange(0, V)[None, :]  # [R, V]: V consecutive classes a thread
    # the tail and the head first, as the lanes of masked blocks (one unless they pass BLOCK_C), in
    # the main loop's layout: the same running state, no head of its own to fold in at the end
    for lane in tl.range(0, rest, BLOCK_C):
        offs = _rest_classes(lane + cls, h, end, C, BLOCK_C)
        n_z, s_rest, n_u, s_u, t_k, n_v, s_v = _fwd_tile(
            n_z, s_rest, n_u, s_u, t_k, n_v, s_v, z_ptr, z_row, stride_ze, E, offs, C, y, temp_ptr, inv_e,
            R, V, E_BLOCK, True, HAS_TEMP, DIV_MODE)
    for start in tl.range(h, end, BLOCK_C, num_stages=STAGES):  # full blocks, no class mask, from class h
        z_al = tl.multiple_of(z_row + start, 16)  # a multiple of 16 by construction
        n_z, s_rest, n_u, s_u, t_k, n_v, s_v = _fwd_tile(
            n_z, s_rest, n_u, s_u, t_k, n_v, s_v, z_ptr, z_al, stride_ze, E, cls, C - start, y - start,
            temp_ptr + start, inv_e, R, V, E_BLOCK, False, HAS_TEMP, DIV_MODE)

    if LATE_TARGET:
        m_y = _margin(margin_ptr, y, y_ok, HAS_MARGIN)
        z_y, a_y = _target_logits(z_ptr, z_row, ze_off, e_mask, y, y_ok, m_y)
    # across threads, once per row: one reduction for the maxima (bottom = -max), one for the sums,
    # each of the values joined (`_join3`)
    if DIV_MODE == 1:
        n_vb = tl.broadcast_to(n_v[:, None], [R, E_BLOCK])  # one value a thread, in each expert's column
        if HAS_TEMP:
            bottom_z, bottom_u, bottom_v = _split3(tl.min(_join3(n_z, n_u, n_vb), axis=0))
        else:
            bottom_z, bottom_v = tl.split(tl.min(tl.join(n_z, n_vb), axis=0))
            bottom_u = bottom_z
        bottom_v = tl.min(bottom_v, axis=0)  # equal in every column
        f_v = _exp2i(bottom_v - n_v)
    elif HAS_TEMP:
        bottom_z, bottom_u = tl.split(tl.min(tl.join(n_z, n_u), axis=0))
    else:
        bottom_z = tl.min(n_z, axis=0)
        bottom_u = bottom_z
    f_z = _exp2i(bottom_z[None, :] - n_z)  # each thread's sums rescaled to the row's maxima
    f_u = f_z
    if HAS_TEMP:
        f_u = _exp2i(bottom_u[None, :] - n_u)
    if DIV_MODE == 1:
        sv_b = tl.broadcast_to((s_v * f_v)[:, None], [R, E_BLOCK])
        if HAS_TEMP:
            s_rest, s_u, s_v = _split3(tl.sum(_join3(s_rest * f_z, s_u * f_u, sv_b), axis=0))
        else:
            s_rest, s_v = tl.split(tl.sum(tl.join(s_rest * f_z, sv_b), axis=0))
        s_v = tl.max(s_v, axis=0)  # equal in every column
    elif DIV_MODE == 2:
        if HAS_TEMP:  # t_k is rescaled with n_u
            s_rest, s_u, t_row = _split3(tl.sum(_join3(s_rest * f_z, s_u * f_u, t_k * f_u), axis=0))
        else:  # t_k follows n_z
            s_rest, t_row = tl.split(tl.sum(tl.join(s_rest * f_z, t_k * f_z), axis=0))
    else:
        s_rest = tl.sum(s_rest * f_z, axis=0)
    lse_a = (tl.log2(s_rest + tl.exp2(a_y * LOG2E + bottom_z)) - bottom_z) * LN2
    nll = tl.where(e_mask, lse_a - a_y, 0.0)
    cls_part = w_y * tl.sum(nll, axis=0)
    cls_part = tl.where(y_ok, cls_part, float("nan"))  # an out-of-range target poisons the loss
    slot2 = tl.zeros([E_BLOCK], dtype=tl.float32)
    div_part = 0.0
    if HAS_TEMP:
        s_row = s_u
    else:  # lse(z): the shared sum plus the target's own exp(z_y - max)
        s_row = s_rest + tl.exp2(z_y * LOG2E + bottom_z)
    lse_u = (tl.log2(s_row) - bottom_u) * LN2
    if DIV_MODE == 1:
        lse_v = (tl.log2(s_v) - bottom_v) * LN2
        slot2 = slot2 + lse_v
        div_part = div_scale * tl.sum(tl.where(e_mask, lse_u - lse_v, 0.0), axis=0)
    if DIV_MODE == 2:
        l_sum = tl.sum(tl.where(e_mask, lse_u, 0.0), axis=0)
        slot2 = t_row / s_row * LN2 - E * lse_u + l_sum  # K_k
        div_part = div_scale * tl.sum(tl.where(e_mask, slot2, 0.0), axis=0)
    # the three statistics in one store (one exchange between threads, not three): `_join3` puts
    # statistic j = a + 2 b at [:, a, b] of [E_BLOCK, 2, 2] (j = 3 is unused)
    j = tl.arange(0, 2)[:, None] + 2 * tl.arange(0, 2)[None, :]
    tl.store(stats_ptr + row * 3 * E + offs_e[:, None, None] + E * j[None, :, :], _join3(lse_a, lse_u, slot2),
             mask=e_mask[:, None, None] & (j < 3)[None, :, :])
    tl.store(part_ptr + row * 3, cls_part)
    tl.store(part_ptr + row * 3 + 1, div_part)
    tl.store(part_ptr + row * 3 + 2, w_y)
    if WRITE_GRAD:
        # the backward's row for grad_output = grad_scale, from the statistics as the backward loads them
        # (padded experts' as 0), through the same function: so the same bits; from the row's end.
        # It needs the divisor before the rows are summed: given, or summed by every program in one
        # fixed order (the same bits in each; L2 hits after the first)
        if HAS_WSUM:
            w_div = tl.load(wsum_ptr)
        elif OWN_WSUM:
            w_div = _weight_sum(target_ptr, weight_ptr, B, C, R)  # one target a thread at a time
        lse_a = tl.where(e_mask, lse_a, 0.0)
        lse_u = tl.where(e_mask, lse_u, 0.0)
        if DIV_MODE == 1:
            s2 = lse_v
            if HAS_TEMP:
                # read back as stored: held in registers, their inputs (the target's logits) would be
                # loaded again in each layout that uses them and held through the first pass, which
                # then spills at 64 registers
                tl.debug_barrier()  # the statistics this program stored, visible to all its threads
                st = stats_ptr + row * 3 * E + offs_e
                lse_a = tl.load(st, mask=e_mask, other=0.0)
                lse_u = tl.load(st + E, mask=e_mask, other=0.0)
        else:
            s2 = tl.where(e_mask, slot2, 0.0)
            if LATE_TARGET:
                # lse(a_k) read back as stored (as "mean" does), which leaves the first pass's
                # masked blocks without spills at 64 registers
                tl.debug_barrier()  # the statistics this program stored, visible to all its threads
                lse_a = tl.load(stats_ptr + row * 3 * E + offs_e, mask=e_mask, other=0.0)
        go = tl.cast(grad_scale, tl.float32)  # as the backward loads it (the interpreter passes a Python float)
        _bwd_row(z_ptr, z_row, stride_ze, E, C, y, m_y, w_y, w_div, go, lse_a, lse_u, s2, z_y, temp_ptr, g_ptr,
                 row * stride_gb, stride_ge.to(tl.int64), div_scale, R, V, E_BLOCK, HAS_TEMP, DIV_MODE, G_ALIGNED, STAGES,
                 True)
    # the last program to finish reduces every row's partial sums (the atomic orders the stores
    # above before it: release; and the other programs' stores before the loads below: acquire)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == B - 1:
        if HAS_WSUM and not WRITE_GRAD:  # the gradient pass loaded it already
            w_div = tl.load(wsum_ptr)
        _finish(part_ptr, loss_ptr, aux_ptr, w_div, B, FINISH_BLOCK, HAS_WSUM or OWN_WSUM)
        tl.store(counter_ptr, 0)  # ready for the next call


@triton.jit
def _finish(part_ptr, loss_ptr, aux_ptr, w_div, B, BLOCK: tl.constexpr, GIVEN: tl.constexpr):
    """loss = sum_i part[i, 0] / W + sum_i part[i, 1]; aux[0] = W, the divisor the backward reads:
    W = sum_i part[i, 2], or w_div where GIVEN. One program, fixed order: deterministic whichever
    program runs it."""
    cls = tl.zeros([BLOCK], dtype=tl.float32)
    div = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < B
        cls += tl.load(part_ptr + offs * 3, mask=mask, other=0.0, cache_modifier=".cg")
        div += tl.load(part_ptr + offs * 3 + 1, mask=mask, other=0.0, cache_modifier=".cg")
        wsum += tl.load(part_ptr + offs * 3 + 2, mask=mask, other=0.0, cache_modifier=".cg")
    if GIVEN:  # one reduction across the warps for the sums (see `_join3`)
        c, d = tl.split(tl.sum(tl.join(cls, div), axis=0))
        w = w_div
    else:
        c, d, w = _split3(tl.sum(_join3(cls, div, wsum), axis=0))
    tl.store(loss_ptr, c / w + d)
    tl.store(aux_ptr, w)


@triton.jit
def _weight_sum(target_ptr, weight_ptr, B, C, BLOCK: tl.constexpr):
    """sum_i w_{y_i} over the batch (an out-of-range target's weight as 0, as in part[i, 2]), in
    one fixed order: every program that calls it gets the same bits."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(target_ptr + offs, mask=offs < B, other=-1).to(tl.int32)
        acc += tl.load(weight_ptr + t, mask=(t >= 0) & (t < C), other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _bwd_tile(z_ptr, z_row, stride_ze, E, offs, C, y, m_yl, temp_ptr, inv_e, g_ptr, g_row, stride_ge,
              lse_al, lse_ul, slot2, cg, cgr, g_y, dg, pad,
              R: tl.constexpr, V: tl.constexpr, E_BLOCK: tl.constexpr,
              MASKED: tl.constexpr, HAS_TEMP: tl.constexpr, DIV_MODE: tl.constexpr):
    """Write grad_output * d loss / d z for one [R, V, E_BLOCK] tile (see the module docstring).
    lse_al, lse_ul: lse(a_k), lse(u_k) in log2 units, [E_BLOCK]."""
    x = _load_tile(z_ptr, z_row, stride_ze, E, offs, C, R, V, E_BLOCK, MASKED, "evict_first")
    is_y = (offs == y)[:, :, None]
    if HAS_TEMP:
        k_u = _inv_temp(temp_ptr, offs, C, LOG2E, R, V, MASKED)  # log2(e) / T
        lq = x * k_u[:, :, None] - lse_ul[None, None, :]  # log2 q
        q = tl.exp2(lq)
        la = x * LOG2E - lse_al[None, None, :]
        pa = tl.exp2(tl.where(is_y, la - m_yl, la))
        g = cg * pa - tl.where(is_y, cg, 0.0)
    else:  # one exponential: softmax(a) = q * exp(lse_u - lse_a) off the target
        k_u = LOG2E
        lq = x * LOG2E - lse_ul[None, None, :]
        q = tl.exp2(lq)
        g = tl.where(is_y, g_y[None, None, :], q * cgr[None, None, :])
    if DIV_MODE == 1:
        p = tl.exp2(tl.sum(x, axis=2) * (k_u * inv_e) - slot2)  # slot2: lse(zbar / T) in log2 units
        if HAS_TEMP:
            dgt = dg * k_u * LN2  # dg / T
            g += (q - p[:, :, None]) * dgt[:, :, None]
        else:
            g += (q - p[:, :, None]) * dg
    if DIV_MODE == 2:
        # [q (E log q - S - K) + E q - sum_j q_j] / T; a padded expert's lq is 0 - 0 and its q 1
        s_sum = tl.sum(lq, axis=2)
        q_sum = tl.sum(q, axis=2) - pad
        inner = lq * (E * LN2) + (slot2[None, None, :] - (s_sum * LN2)[:, :, None])  # slot2: E - K_k
        term = q * inner - q_sum[:, :, None]
        if HAS_TEMP:
            g += term * (dg * k_u * LN2)[:, :, None]
        else:
            g += term * dg
    _store_tile(g_ptr, g_row, stride_ge, E, offs, C, g, R, V, E_BLOCK, MASKED)


@triton.jit
def _ride_loss_bwd_kernel(
    z_ptr, target_ptr, margin_ptr, weight_ptr, temp_ptr, stats_ptr, aux_ptr, go_ptr,  # inputs
    g_ptr,  # output [E, B, C], contiguous
    E, B, C,
    stride_ze, stride_zb, stride_ge, stride_gb,
    div_scale,
    written_scale,  # GRAD_WRITTEN: the grad_output the forward wrote g for (float32)
    HAS_MARGIN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_TEMP: tl.constexpr,
    DIV_MODE: tl.constexpr, E_BLOCK: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
    G_ALIGNED: tl.constexpr,  # (stride_gb - stride_zb) % 16 == 0
    STAGES: tl.constexpr = 1,  # as in the forward
    GRAD_WRITTEN: tl.constexpr = False,  # the forward wrote g for written_scale: nothing to do where grad_output is that
):
    go = tl.load(go_ptr).to(tl.float32)  # grad_output stays float32
    if GRAD_WRITTEN:
        if go == written_scale:
            return
    # rows in reverse order: the rows the forward read last are the likeliest still in L2
    stride_ze = stride_ze.to(tl.int64)  # expert offsets (E - 1) B C may pass 2^31 elements
    stride_ge = stride_ge.to(tl.int64)
    row = (B - 1 - tl.program_id(0)).to(tl.int64)
    z_row = row * stride_zb
    g_row = row * stride_gb
    offs_e = tl.arange(0, E_BLOCK)
    e_mask = offs_e < E
    ze_off = offs_e.to(tl.int64) * stride_ze

    y = tl.load(target_ptr + row).to(tl.int32)
    y_ok = (y >= 0) & (y < C)
    m_y = _margin(margin_ptr, y, y_ok, HAS_MARGIN)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=y_ok, other=0.0)
    else:
        w_y = 1.0
    st = stats_ptr + row * 3 * E + offs_e
    lse_a = tl.load(st, mask=e_mask, other=0.0)
    lse_u = tl.load(st + E, mask=e_mask, other=0.0)
    if DIV_MODE == 1:
        s2 = tl.load(stats_ptr + row * 3 * E + 2 * E)  # lse(zbar / T): one value per row
    else:
        s2 = tl.load(st + 2 * E, mask=e_mask, other=0.0)  # K_k
    z_y = tl.zeros([E_BLOCK], dtype=tl.float32)
    if not HAS_TEMP:
        z_y, _ = _target_logits(z_ptr, z_row, ze_off, e_mask, y, y_ok, m_y)
    _bwd_row(z_ptr, z_row, stride_ze, E, C, y, m_y, w_y, tl.load(aux_ptr), go, lse_a, lse_u, s2, z_y, temp_ptr,
             g_ptr, g_row, stride_ge, div_scale, R, V, E_BLOCK, HAS_TEMP, DIV_MODE, G_ALIGNED, STAGES, False)


@triton.jit
def _bwd_row(z_ptr, z_row, stride_ze, E, C, y, m_y, w_y, w_sum, go, lse_a, lse_u, s2, z_y, temp_ptr,
             g_ptr, g_row, stride_ge, div_scale,
             R: tl.constexpr, V: tl.constexpr, E_BLOCK: tl.constexpr, HAS_TEMP: tl.constexpr, DIV_MODE: tl.constexpr,
             G_ALIGNED: tl.constexpr, STAGES: tl.constexpr, FROM_END: tl.constexpr):
    """One row's gradient, grad_output go times d loss / d z, from the row's statistics as the
    forward stores them ([E_BLOCK] vectors, padded experts' 0): lse_a, lse_u, and s2 (lse(zbar / T),
    one value, for "mean"; K_k for "pairwise"), with the target's logits z_y (read only with T = 1)
    and the classification term's divisor w_sum. The backward kernel runs it, and the forward
    kernel too when it writes the gradient itself (WRITE_GRAD): one function from the same
    statistics, so the same bits.

    Order: the head [0, min(h, C)) as a 16-class tile, the unmasked main loop, the masked tail.
    FROM_END (the forward's second pass) runs the mirror image of the forward's own pass, which
    reads the tail and the head first (as the lanes of shared masked blocks) and then the main
    loop: the main loop from its last block to its first, then the tail and the head. So the
    second pass meets the blocks it read last first: where the rows in flight overflow the L2, a
    least-recently-used cache still holds the end of each row, while a second pass in the first's
    order would evict each block just before its turn. The head keeps a tile of its own here: with
    no running state to fold it into, a shared masked block saves nothing, and in the 8-expert
    backward it cost spills."""
    BLOCK_C: tl.constexpr = R * V
    cg = w_y / w_sum * go  # the classification term's weight
    cgr = tl.zeros([E_BLOCK], dtype=tl.float32)
    g_y = tl.zeros([E_BLOCK], dtype=tl.float32)
    if not HAS_TEMP:
        cgr = cg * tl.exp2((lse_u - lse_a) * LOG2E)  # softmax(a) = q exp(lse_u - lse_a) off the target
        g_y = cg * (tl.exp2((z_y - m_y - lse_a) * LOG2E) - 1.0)
    if DIV_MODE == 1:
        slot2 = s2 * LOG2E  # lse(zbar / T) in log2 units
    else:
        slot2 = E - s2  # E - K_k
    dg = div_scale * go
    pad = (E_BLOCK - E) * 1.0
    inv_e = 1.0 / E
    m_yl = m_y * LOG2E
    lse_al = lse_a * LOG2E
    lse_ul = lse_u * LOG2E
    h, end, _ = _row_split(z_row, C, BLOCK_C)
    cls = tl.arange(0, R)[:, None] * V + tl.arange(0, V)[None, :]
    HR: tl.constexpr = 16 // V
    hcls = tl.arange(0, HR)[:, None] * V + tl.arange(0, V)[None, :]
    if not FROM_END:
        _bwd_tile(z_ptr, z_row, stride_ze, E, hcls, tl.minimum(h, C), y, m_yl, temp_ptr, inv_e, g_ptr, g_row,
                  stride_ge, lse_al, lse_ul, slot2, cg, cgr, g_y, dg, pad, HR, V, E_BLOCK, True, HAS_TEMP, DIV_MODE)
    STEP: tl.constexpr = -BLOCK_C if FROM_END else BLOCK_C
    for start in tl.range(end - BLOCK_C if FROM_END else h, h - BLOCK_C if FROM_END else end, STEP, num_stages=STAGES):
        z_al = tl.multiple_of(z_row + start, 16)
        if G_ALIGNED:  # the gradient's row stride equals the logits' modulo 16: aligned there too
            g_al = tl.multiple_of(g_row + start, 16)
        else:
            g_al = g_row + start
        _bwd_tile(z_ptr, z_al, stride_ze, E, cls, C - start, y - start, m_yl, temp_ptr + start, inv_e, g_ptr,
                  g_al, stride_ge, lse_al, lse_ul, slot2, cg, cgr, g_y, dg, pad, R, V, E_BLOCK, False,
                  HAS_TEMP, DIV_MODE)
    if end < C:
        _bwd_tile(z_ptr, z_row, stride_ze, E, end + cls, C, y, m_yl, temp_ptr, inv_e, g_ptr, g_row, stride_ge,
                  lse_al, lse_ul, slot2, cg, cgr, g_y, dg, pad, R, V, E_BLOCK, True, HAS_TEMP, DIV_MODE)
    if FROM_END:
        _bwd_tile(z_ptr, z_row, stride_ze, E, hcls, tl.minimum(h, C), y, m_yl, temp_ptr, inv_e, g_ptr, g_row,
                  stride_ge, lse_al, lse_ul, slot2, cg, cgr, g_y, dg, pad, HR, V, E_BLOCK, True, HAS_TEMP, DIV_MODE)
