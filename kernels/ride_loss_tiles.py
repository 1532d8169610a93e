"""Tile helpers of the fused RIDE loss kernels (`ride_fast_kernels.ride_loss_kernels`): where a
row's classes run (`_row_split`, `_rest_classes`: the unmasked main loop, then the tail and the
head together as masked blocks), loading and storing a [R, V, E_BLOCK] tile with the experts
joined inside each thread (`_load_tile`, `_store_tile`), the per-class 1 / T (`_inv_temp`), and
the float arithmetic kept off the MUFU: 2^d for integer d as an exponent-field shift (`_exp2i`),
2^d as a polynomial on the FMA pipe (`_exp2_fma`), and a reciprocal by Newton steps (`_rcp`); the
target's margin and logits of a row (`_margin`, `_target_logits`), and three tensors joined for
one cross-thread reduction (`_join3`, `_split3`).
"""
from __future__ import annotations

import triton
import triton.language as tl
from ride_fast_kernels._utils import interpreting

_INTERPRETED = tl.constexpr(interpreting())  # TRITON_INTERPRET=1 when this module was imported


@triton.jit
def _to_int_saturating(d):
    """float32 -> int32, rounding toward zero and clamping to the int32 range. A plain cast of a
    value out of range (-1e30) is undefined in LLVM IR; PTX's cvt.rzi.s32.f32 defines it as the
    clamp, so the compiled kernels say so explicitly (the same one instruction). The interpreter,
    which runs no PTX, clamps first in float."""
    if _INTERPRETED:
        return tl.maximum(d, -2147483648.0).to(tl.int32)
    else:
        return tl.inline_asm_elementwise("cvt.rzi.s32.f32 $0, $1;", "=r,r", [d], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _exp2i(d):
    """2^d for an integer-valued d <= 0, 0 below 2^-126: built in the exponent field with integer
    instructions (the conversion saturates: a d of -1e30 gives the most negative integer)."""
    k = tl.maximum(_to_int_saturating(d), -127)
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_fma(d, MASKED: tl.constexpr):
    """2^d for d <= 0 on the FMA pipe (degree-5 polynomial on [0, 1), relative error 2e-7): the
    forward's per-class exponentials, so that the MUFU serves the per-element ones. Below 2^-126
    it returns at most 2^-126 (against a largest term of at least 1/2 in the sums it feeds); d may
    be -inf only in a MASKED block."""
    if MASKED:
        d = tl.maximum(d, -126.0)
    j = tl.math.floor(d)
    f = d - j
    p = 0.0018762343097478151 * f + 0.008992594666779041
    p = p * f + 0.05582358315587044
    p = p * f + 0.24015454947948456
    p = p * f + 0.6931529641151428
    p = p * f + 0.9999999403953552
    return (p.to(tl.int32, bitcast=True) + (tl.maximum(j.to(tl.int32), -126) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _rcp(x):
    """1 / x for a positive normal float32 x on the FMA pipe: a first guess from the exponent
    field (relative error < 0.13), then three Newton steps (each squares the error)."""
    y = (0x7EF311C3 - x.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    y = y + y * (1.0 - x * y)
    y = y + y * (1.0 - x * y)
    y = y + y * (1.0 - x * y)
    return y


@triton.jit
def _ld(z_ptr, base, k: tl.constexpr, stride_ze, E, offs, C, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """Expert k's [R, V] logits as float32: padded experts (k >= E) read 0."""
    ptrs = z_ptr + base + k * stride_ze + offs
    if MASKED:
        ok = _live(offs, C)
        if k > 0:
            ok = ok & (k < E)
        x = tl.load(ptrs, mask=ok, other=0.0, eviction_policy=EVICT)
    elif k > 0:
        x = tl.load(ptrs, mask=k < E, other=0.0, eviction_policy=EVICT)
    else:
        x = tl.load(ptrs, eviction_policy=EVICT)
    return x.to(tl.float32)


@triton.jit
def _ld2(z_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ze, E, offs, C, MASKED: tl.constexpr,
         EVICT: tl.constexpr):
    """[R, V, 2]: experts k0 and k0 + step joined (the joined axis stays in the thread)."""
    return tl.join(_ld(z_ptr, base, k0, stride_ze, E, offs, C, MASKED, EVICT),
                   _ld(z_ptr, base, k0 + step, stride_ze, E, offs, C, MASKED, EVICT))


@triton.jit
def _ld4(z_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ze, E, offs, C, R: tl.constexpr,
         V: tl.constexpr, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """[R, V, 4]: experts k0 + step * j, j = 0..3 in order. Joining the even-j half to the odd-j
    half and flattening the two minor axes puts expert j at index j."""
    even = _ld2(z_ptr, base, k0, 2 * step, stride_ze, E, offs, C, MASKED, EVICT)
    odd = _ld2(z_ptr, base, k0 + step, 2 * step, stride_ze, E, offs, C, MASKED, EVICT)
    return tl.reshape(tl.join(even, odd), [R, V, 4])


@triton.jit
def _ld8(z_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ze, E, offs, C, R: tl.constexpr,
         V: tl.constexpr, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """[R, V, 8]: experts k0 + step * j in order (as `_ld4`)."""
    even = _ld4(z_ptr, base, k0, 2 * step, stride_ze, E, offs, C, R, V, MASKED, EVICT)
    odd = _ld4(z_ptr, base, k0 + step, 2 * step, stride_ze, E, offs, C, R, V, MASKED, EVICT)
    return tl.reshape(tl.join(even, odd), [R, V, 8])


@triton.jit
def _load_tile(z_ptr, base, stride_ze, E, offs, C, R: tl.constexpr, V: tl.constexpr, E_BLOCK: tl.constexpr,
               MASKED: tl.constexpr, EVICT: tl.constexpr):
    """[R, V, E_BLOCK] float32 logits, the experts in order along the minor (in-thread) axis.
    Padded experts read 0, padded classes (MASKED) -inf."""
    if E_BLOCK == 1:
        x = tl.expand_dims(_ld(z_ptr, base, 0, stride_ze, E, offs, C, MASKED, EVICT), 2)
    elif E_BLOCK == 2:
        x = _ld2(z_ptr, base, 0, 1, stride_ze, E, offs, C, MASKED, EVICT)
    elif E_BLOCK == 4:
        x = _ld4(z_ptr, base, 0, 1, stride_ze, E, offs, C, R, V, MASKED, EVICT)
    else:
        tl.static_assert(E_BLOCK == 8, "E_BLOCK must be a power of two <= 8")
        x = _ld8(z_ptr, base, 0, 1, stride_ze, E, offs, C, R, V, MASKED, EVICT)
    if MASKED:
        x = tl.where(_live(offs, C)[:, :, None], x, float("-inf"))
    return x


@triton.jit
def _st(g_ptr, base, k: tl.constexpr, stride_ge, E, offs, C, g, MASKED: tl.constexpr):
    """Store expert k's [R, V] gradient (padded experts: nothing)."""
    ptrs = g_ptr + base + k * stride_ge + offs
    g = g.to(g_ptr.dtype.element_ty)
    if MASKED:
        ok = _live(offs, C)
        if k > 0:
            ok = ok & (k < E)
        tl.store(ptrs, g, mask=ok, eviction_policy="evict_first")
    elif k > 0:
        tl.store(ptrs, g, mask=k < E, eviction_policy="evict_first")
    else:
        tl.store(ptrs, g, eviction_policy="evict_first")


@triton.jit
def _st2(g_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ge, E, offs, C, g, MASKED: tl.constexpr):
    """Store [R, V, 2]: experts k0 and k0 + step."""
    g0, g1 = tl.split(g)
    _st(g_ptr, base, k0, stride_ge, E, offs, C, g0, MASKED)
    _st(g_ptr, base, k0 + step, stride_ge, E, offs, C, g1, MASKED)


@triton.jit
def _st4(g_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ge, E, offs, C, g, R: tl.constexpr,
         V: tl.constexpr, MASKED: tl.constexpr):
    """Store [R, V, 4]: experts k0 + step * j (the inverse of `_ld4`)."""
    even, odd = tl.split(tl.reshape(g, [R, V, 2, 2]))
    _st2(g_ptr, base, k0, 2 * step, stride_ge, E, offs, C, even, MASKED)
    _st2(g_ptr, base, k0 + step, 2 * step, stride_ge, E, offs, C, odd, MASKED)


@triton.jit
def _st8(g_ptr, base, k0: tl.constexpr, step: tl.constexpr, stride_ge, E, offs, C, g, R: tl.constexpr,
         V: tl.constexpr, MASKED: tl.constexpr):
    """Store [R, V, 8]: experts k0 + step * j (the inverse of `_ld8`)."""
    even, odd = tl.split(tl.reshape(g, [R, V, 4, 2]))
    _st4(g_ptr, base, k0, 2 * step, stride_ge, E, offs, C, even, R, V, MASKED)
    _st4(g_ptr, base, k0 + step, 2 * step, stride_ge, E, offs, C, odd, R, V, MASKED)


@triton.jit
def _store_tile(g_ptr, base, stride_ge, E, offs, C, g, R: tl.constexpr, V: tl.constexpr, E_BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    """Store a [R, V, E_BLOCK] gradient tile (the inverse of `_load_tile`)."""
    if E_BLOCK == 1:
        _st(g_ptr, base, 0, stride_ge, E, offs, C, tl.reshape(g, [R, V]), MASKED)
    elif E_BLOCK == 2:
        _st2(g_ptr, base, 0, 1, stride_ge, E, offs, C, g, MASKED)
    elif E_BLOCK == 4:
        _st4(g_ptr, base, 0, 1, stride_ge, E, offs, C, g, R, V, MASKED)
    else:
        _st8(g_ptr, base, 0, 1, stride_ge, E, offs, C, g, R, V, MASKED)


@triton.jit
def _inv_temp(temp_ptr, offs, C, SCALE: tl.constexpr, R: tl.constexpr, V: tl.constexpr, MASKED: tl.constexpr):
    """SCALE / T of a [R, V] block of classes (padded classes: SCALE) without the MUFU: the V
    temperatures' product is inverted once (`_rcp`) and multiplied back (Montgomery's trick),
    which needs that product to be a normal float32 (temperatures within 1e-9..1e9)."""
    if MASKED:
        t = tl.load(temp_ptr + offs, mask=_live(offs, C), other=1.0)
    else:
        t = tl.load(temp_ptr + offs)
    if V == 4:
        even, odd = tl.split(tl.reshape(t, [R, 2, 2]))
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
        a = t0 * t1
        b = t2 * t3
        inv = _rcp(a * b) * SCALE
        ia = inv * b  # SCALE / (t0 t1)
        ib = inv * a
        k = tl.reshape(tl.join(tl.join(ia * t1, ib * t3), tl.join(ia * t0, ib * t2)), [R, 4])
    elif V == 2:
        t0, t1 = tl.split(t)
        inv = _rcp(t0 * t1) * SCALE
        k = tl.join(inv * t1, inv * t0)
    else:
        k = _rcp(t) * SCALE
    return k


@triton.jit
def _live(offs, C):
    """Lanes of a masked block that hold a class: 0 <= offs < C (a lane before the head's first
    class has a negative one, see `_rest_classes`)."""
    return (offs >= 0) & (offs < C)


@triton.jit
def _row_split(z_row, C, BLOCK_C: tl.constexpr):
    """(h, end, rest) of a row that starts at element z_row. The unmasked main loop runs full
    blocks over classes [h, end) from the row's first 16-element boundary (h < 16), so that its
    loads and stores are vector accesses whatever C is (given a 16-byte aligned base and an expert
    stride that is a multiple of 16 elements, which Triton sees itself). The classes outside it,
    the tail [end, C) and the head [0, min(h, C)), run as `rest` lanes of masked blocks (one block
    unless the two together pass BLOCK_C), which `_rest_classes` maps to classes."""
    h = ((16 - z_row % 16) % 16).to(tl.int32)
    end = h + tl.maximum(C - h, 0) // BLOCK_C * BLOCK_C
    rest = (tl.maximum(C - end, 0) + 15) // 16 * 16 + tl.minimum(h, C)
    return h, end, rest


@triton.jit
def _rest_classes(lane, h, end, C, BLOCK_C: tl.constexpr):
    """The class of each lane (an index into the rest of a row, see `_row_split`) of a masked
    block: the lanes from 0 run over the tail's classes end, end + 1, ... (C and past: not live),
    the last min(h, C) lanes of the rest's last block over the head's 0, 1, ..., and the lanes
    between them over negative classes (not live, `_live`). The switch from tail to head lanes at a
    multiple of 16 keeps each thread's V classes consecutive, so that the block has the main loop's
    layout, and one limit C masks every lane."""
    head = tl.minimum(h, C)
    head_lane = tl.multiple_of((tl.maximum(C - end, 0) + 15) // 16 * 16, 16)
    last_lane = (head_lane + head + BLOCK_C - 1) // BLOCK_C * BLOCK_C  # the end of the rest's last block
    return tl.where(lane < head_lane, end + lane, lane - (last_lane - head))


@triton.jit
def _margin(margin_ptr, y, y_ok, HAS_MARGIN: tl.constexpr):
    """The target's margin m_y (0 without margins or for an out-of-range target)."""
    if HAS_MARGIN:
        m_y = tl.load(margin_ptr + y, mask=y_ok, other=0.0)
    else:
        m_y = 0.0
    return m_y


@triton.jit
def _target_logits(z_ptr, z_row, ze_off, e_mask, y, y_ok, m_y):
    """The target's logits z_y and a_y = z_y - m_y of each expert ([E_BLOCK], float32; padded
    experts and an out-of-range target read 0)."""
    z_y = tl.load(z_ptr + z_row + ze_off + y, mask=e_mask & y_ok, other=0.0).to(tl.float32)
    return z_y, z_y - m_y


@triton.jit
def _join3(a, b, c):
    """Three tensors of one shape as one, [..., 2, 2] (c twice; `_split3` takes them apart), so
    that a reduction over threads (axis 0) crosses them in one pass of shuffles and one exchange
    through shared memory, as it does a joined pair: the forward's row end and its last program
    reduce all their values in one reduction per operation. (A tuple of operands would cross
    shared memory one operand at a time.)"""
    return tl.join(tl.join(a, b), tl.join(c, c))


@triton.jit
def _split3(x):
    """The three tensors of a `_join3` (reduced or not)."""
    ab, cc = tl.split(x)
    a, b = tl.split(ab)
    return a, b, tl.split(cc)[0]
