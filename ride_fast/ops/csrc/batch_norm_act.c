/* Training-mode BatchNorm fused with the residual add and the ReLU that follow it, for float32 or
 * bfloat16 channels-last (NHWC) tensors on the CPU: ride_fast.ops.batch_norm_act
 * (docs/performance-notes.md, "Fused BatchNorm and ReLU on the CPU").
 *
 * Shape legend: N rows (batch x height x width), C channels; row n of x is x[n*C .. n*C + C).
 * x, r, out and their gradients are float32 or bfloat16 (`bf16`); weight, bias, `save` and the
 * weight and bias gradients are float32. All arithmetic is in float32 (sums in double), and a
 * bfloat16 result is rounded once, to nearest even, when it is stored.
 *
 *   forward     pre = x * scale[c] + shift[c] (+ r),  out = relu(pre)
 *               scale = weight * invstd, shift = bias - mean * scale, batch statistics
 *   backward    g' = g where pre > 0 (recomputed from x and r), else 0
 *               grad_bias = sum g',  grad_weight = invstd * sum g' (x - mean)
 *               grad_x = weight * invstd * (g' - mean(g') - (x - mean) * invstd^2 * mean(g' (x - mean)))
 *               grad_r = g'
 *
 * Each direction reads its inputs twice (a reduction over the rows, then the elementwise pass): the
 * unfused BatchNorm, add and ReLU pass over every activation 13 to 17 times per step, these two
 * functions 8 to 11. The running statistics are left to the caller. Rows are split into one contiguous block per thread and the per-thread
 * sums (in double) are added in thread order, so a result depends only on the thread count.
 * Built with -ffp-contract=off: the backward recomputes `pre` bit for bit as the forward did.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* v where keep, else +0 (a NaN or inf gradient too, as torch's ReLU backward): a bit mask, not a
 * branch, so that the loops stay vectorised. */
INLINE float keep_if(float v, int keep) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u &= -(uint32_t)(keep != 0);
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array, as a float. */
INLINE float load(const void *p, int64_t i, const int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* The address of element i of a float32 or bfloat16 array. */
INLINE const void *at(const void *p, int64_t i, const int bf16) {
    return bf16 ? (const void *)((const uint16_t *)p + i) : (const void *)((const float *)p + i);
}

INLINE void *at_mut(void *p, int64_t i, const int bf16) {
    return bf16 ? (void *)((uint16_t *)p + i) : (void *)((float *)p + i);
}

/* Stores v as element i, rounded to the nearest even bfloat16 when bf16 (NaN as 0x7FC0), as
 * PyTorch rounds float to bfloat16. */
INLINE void store(void *p, int64_t i, float v, const int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    ((uint16_t *)p)[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

/* The per-thread sums part [nt][2][C], added in thread order into part[0] (so results depend only
 * on the thread count). */
static void add_up_threads(double *part, int nt, int64_t C) {
    for (int t = 1; t < nt; ++t)
        for (int64_t i = 0; i < 2 * C; ++i) part[i] += part[2 * t * C + i];
}

/* The row loops below take `relu`, `r != NULL` and `bf16` as compile-time constants (each caller
 * passes literals), so every variant is a branch-free loop. With AVX-512 they are written with
 * intrinsics, 16 channels at a time (a masked chunk for the rest): the compiler's own vector loops
 * need more channels than a narrow layer has and ran the bfloat16 variants at a third of the
 * float32 speed. Both versions do the same float32 operations in the same order, and the sums run
 * over the rows in the same order, so they give the same bits (tests/ops/test_ops_batch_norm_act.py
 * builds both). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

/* The lanes of channels c0 .. c0 + 15 that exist (C - c0 of them when fewer than 16 are left). */
INLINE __mmask16 lanes(int64_t c0, int64_t C) { return C - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (C - c0)) - 1u); }

INLINE __m512 load16(const void *p, int64_t i, __mmask16 m, const int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    return bf16x16_to_float(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
}

/* As `store`, 16 lanes at a time. */
INLINE void store16(void *p, int64_t i, __m512 v, __mmask16 m, const int bf16) {
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)p + i, m, v);
        return;
    }
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, float_to_bf16x16(v));
}

/* Per-channel sums in double, 16 channels in two registers of 8: a running sum over the rows of a
 * block (BLOCK rows, whose chunks stay in the L1 cache), loaded from and stored back to the
 * thread's sums once per block, so each channel still adds its rows in row order. */
#define BLOCK 64
typedef struct {
    __m512d lo, hi;
} sum16;

INLINE sum16 sum_load(const double *d, int64_t c0, __mmask16 m) {
    return (sum16){_mm512_maskz_loadu_pd((__mmask8)(m & 0xFF), d + c0), _mm512_maskz_loadu_pd((__mmask8)(m >> 8), d + c0 + 8)};
}

INLINE void sum_store(double *d, int64_t c0, sum16 a, __mmask16 m) {
    _mm512_mask_storeu_pd(d + c0, (__mmask8)(m & 0xFF), a.lo);
    _mm512_mask_storeu_pd(d + c0 + 8, (__mmask8)(m >> 8), a.hi);
}

/* a += v, or a += v * v when square (the square in double). Lanes beyond C hold zeros. */
INLINE sum16 sum_add(sum16 a, __m512 v, const int square) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return (sum16){_mm512_add_pd(a.lo, square ? _mm512_mul_pd(lo, lo) : lo), _mm512_add_pd(a.hi, square ? _mm512_mul_pd(hi, hi) : hi)};
}

INLINE void stats_rows(const void *RESTRICT x, int64_t b, int64_t e, int64_t C, double *RESTRICT s, double *RESTRICT q,
                       const int bf16) {
    for (int64_t n0 = b; n0 < e; n0 += BLOCK) {
        const int64_t n1 = n0 + BLOCK < e ? n0 + BLOCK : e;
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lanes(c0, C);
            sum16 as = sum_load(s, c0, m), aq = sum_load(q, c0, m);
            for (int64_t n = n0; n < n1; ++n) {
                const __m512 v = load16(x, n * C + c0, m, bf16);
                as = sum_add(as, v, 0);
                aq = sum_add(aq, v, 1);
            }
            sum_store(s, c0, as, m);
            sum_store(q, c0, aq, m);
        }
    }
}

/* x * scale + shift (+ r) of 16 lanes, as the forward computes it. */
INLINE __m512 pre16(const void *x, const void *r, const float *scale, const float *shift, int64_t i, int64_t c0, __mmask16 m,
                    const int has_r, const int bf16) {
    __m512 p = _mm512_add_ps(_mm512_mul_ps(load16(x, i, m, bf16), _mm512_maskz_loadu_ps(m, scale + c0)), _mm512_maskz_loadu_ps(m, shift + c0));
    if (has_r) p = _mm512_add_ps(p, load16(r, i, m, bf16));
    return p;
}

INLINE void apply_rows(const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT scale, const float *RESTRICT shift,
                       void *RESTRICT out, int64_t b, int64_t e, int64_t C, const int relu, const int has_r, const int bf16) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t n = b; n < e; ++n)
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lanes(c0, C);
            __m512 p = pre16(x, r, scale, shift, n * C + c0, c0, m, has_r, bf16);
            if (relu) p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(p, zero, _CMP_LT_OQ), zero);
            store16(out, n * C + c0, p, m, bf16);
        }
}

INLINE void grad_reduce_rows(const void *RESTRICT g, const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT scale,
                             const float *RESTRICT shift, const float *RESTRICT mean, void *RESTRICT grad_r, int64_t b, int64_t e,
                             int64_t C, double *RESTRICT sg, double *RESTRICT sgx, const int relu, const int has_r, const int bf16) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t n0 = b; n0 < e; n0 += BLOCK) {
        const int64_t n1 = n0 + BLOCK < e ? n0 + BLOCK : e;
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lanes(c0, C);
            const __m512 mu = _mm512_maskz_loadu_ps(m, mean + c0);
            sum16 ag = sum_load(sg, c0, m), agx = sum_load(sgx, c0, m);
            for (int64_t n = n0; n < n1; ++n) {
                const int64_t i = n * C + c0;
                __m512 gv = load16(g, i, m, bf16);
                const __m512 xv = load16(x, i, m, bf16);
                if (relu) gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(pre16(x, r, scale, shift, i, c0, m, has_r, bf16), zero, _CMP_GT_OQ), gv);
                if (has_r) store16(grad_r, i, gv, m, bf16);
                ag = sum_add(ag, gv, 0);
                agx = sum_add(agx, _mm512_mul_ps(gv, _mm512_sub_ps(xv, mu)), 0);
            }
            sum_store(sg, c0, ag, m);
            sum_store(sgx, c0, agx, m);
        }
    }
}

INLINE void grad_apply_rows(const void *RESTRICT g, const void *RESTRICT x, const float *RESTRICT scale,
                            const float *RESTRICT shift, const float *RESTRICT mean, const float *RESTRICT k0, const float *RESTRICT k1,
                            const float *RESTRICT k2, void *RESTRICT grad_x, const void *RESTRICT grad_r, int64_t b, int64_t e,
                            int64_t C, const int relu, const int has_r, const int bf16) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t n = b; n < e; ++n)
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const __mmask16 m = lanes(c0, C);
            const int64_t i = n * C + c0;
            __m512 gv = load16(has_r ? grad_r : g, i, m, bf16); /* with a residual, g' from the first pass */
            const __m512 xv = load16(x, i, m, bf16);
            if (relu && !has_r) gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(pre16(x, NULL, scale, shift, i, c0, m, 0, bf16), zero, _CMP_GT_OQ), gv);
            const __m512 centred = _mm512_mul_ps(_mm512_sub_ps(xv, _mm512_maskz_loadu_ps(m, mean + c0)), _mm512_maskz_loadu_ps(m, k2 + c0));
            const __m512 inner = _mm512_sub_ps(_mm512_sub_ps(gv, _mm512_maskz_loadu_ps(m, k1 + c0)), centred);
            store16(grad_x, i, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, k0 + c0), inner), m, bf16);
        }
}
#else

INLINE void stats_rows(const void *RESTRICT x, int64_t b, int64_t e, int64_t C, double *RESTRICT s, double *RESTRICT q,
                       const int bf16) {
    for (int64_t n = b; n < e; ++n) {
        const void *RESTRICT row = at(x, n * C, bf16);
        for (int64_t c = 0; c < C; ++c) {
            double v = load(row, c, bf16);
            s[c] += v;
            q[c] += v * v;
        }
    }
}

INLINE void apply_rows(const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT scale, const float *RESTRICT shift,
                       void *RESTRICT out, int64_t b, int64_t e, int64_t C, const int relu, const int has_r, const int bf16) {
    for (int64_t n = b; n < e; ++n) {
        const void *RESTRICT xr = at(x, n * C, bf16);
        const void *RESTRICT rr = at(r, has_r ? n * C : 0, bf16);
        void *RESTRICT o = at_mut(out, n * C, bf16);
        for (int64_t c = 0; c < C; ++c) {
            float p = load(xr, c, bf16) * scale[c] + shift[c];
            if (has_r) p = p + load(rr, c, bf16);
            store(o, c, (relu && p < 0.0f) ? 0.0f : p, bf16);
        }
    }
}

/* With a residual, g' is also stored as grad_r here, and the second pass reads it back instead of
 * g, x and r (one read less). g' is g or 0, so in bfloat16 too it is stored exactly. */
INLINE void grad_reduce_rows(const void *RESTRICT g, const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT scale,
                             const float *RESTRICT shift, const float *RESTRICT mean, void *RESTRICT grad_r, int64_t b, int64_t e,
                             int64_t C, double *RESTRICT sg, double *RESTRICT sgx, const int relu, const int has_r, const int bf16) {
    for (int64_t n = b; n < e; ++n) {
        const void *RESTRICT gr = at(g, n * C, bf16), *RESTRICT xr = at(x, n * C, bf16);
        const void *RESTRICT rr = at(r, has_r ? n * C : 0, bf16);
        void *RESTRICT grr = at_mut(grad_r, has_r ? n * C : 0, bf16);
        for (int64_t c = 0; c < C; ++c) {
            float gv = load(gr, c, bf16), xv = load(xr, c, bf16);
            if (relu) {
                float p = xv * scale[c] + shift[c];
                if (has_r) p = p + load(rr, c, bf16);
                gv = keep_if(gv, p > 0.0f);
            }
            if (has_r) store(grr, c, gv, bf16);
            sg[c] += (double)gv;
            sgx[c] += (double)(gv * (xv - mean[c]));
        }
    }
}

INLINE void grad_apply_rows(const void *RESTRICT g, const void *RESTRICT x, const float *RESTRICT scale,
                            const float *RESTRICT shift, const float *RESTRICT mean, const float *RESTRICT k0, const float *RESTRICT k1,
                            const float *RESTRICT k2, void *RESTRICT grad_x, const void *RESTRICT grad_r, int64_t b, int64_t e,
                            int64_t C, const int relu, const int has_r, const int bf16) {
    for (int64_t n = b; n < e; ++n) {
        const void *RESTRICT xr = at(x, n * C, bf16);
        const void *RESTRICT gr = at(has_r ? grad_r : g, n * C, bf16); /* with a residual, g' from the first pass */
        void *RESTRICT gx = at_mut(grad_x, n * C, bf16);
        for (int64_t c = 0; c < C; ++c) {
            float gv = load(gr, c, bf16), xv = load(xr, c, bf16);
            if (relu && !has_r) gv = keep_if(gv, xv * scale[c] + shift[c] > 0.0f);
            store(gx, c, k0[c] * (gv - k1[c] - (xv - mean[c]) * k2[c]), bf16);
        }
    }
}

#endif

#define VARIANTS_OF(call, BF16)   \
    do {                          \
        if (relu && r)            \
            call(1, 1, BF16);     \
        else if (relu)            \
            call(1, 0, BF16);     \
        else if (r)               \
            call(0, 1, BF16);     \
        else                      \
            call(0, 0, BF16);     \
    } while (0)

#define VARIANTS(call)                 \
    do {                               \
        if (bf16)                      \
            VARIANTS_OF(call, 1);      \
        else                           \
            VARIANTS_OF(call, 0);      \
    } while (0)

/* Batch statistics and out = relu(x * scale + shift (+ r)). save [5, C] receives the batch mean,
 * invstd, scale, shift and the unbiased variance (for the running statistics, which the caller
 * updates). Returns 0, or -1 when out of memory (nothing written). */
int ride_bn_act_forward(const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT weight, const float *RESTRICT bias,
                        double eps, int64_t N, int64_t C, int relu, int bf16, void *RESTRICT out, float *RESTRICT save, int nt) {
    double *part = calloc((size_t)(2 * nt * C), sizeof(double));
    if (!part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        rows_of(N, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        double *s = part + 2 * omp_get_thread_num() * C;
        if (bf16)
            stats_rows(x, b, e, C, s, s + C, 1);
        else
            stats_rows(x, b, e, C, s, s + C, 0);
    }
    float *mean = save, *invstd = save + C, *scale = save + 2 * C, *shift = save + 3 * C, *unbiased = save + 4 * C;
    add_up_threads(part, nt, C);
    for (int64_t c = 0; c < C; ++c) {
        double s = part[c], q = part[C + c];
        double m = s / (double)N, var = q / (double)N - m * m;
        if (var < 0.0) var = 0.0;
        double is = 1.0 / sqrt(var + eps);
        mean[c] = (float)m;
        invstd[c] = (float)is;
        scale[c] = (float)((double)weight[c] * is);
        shift[c] = (float)((double)bias[c] - m * (double)weight[c] * is);
        unbiased[c] = (float)(var * (double)N / (double)(N - 1));
    }
    free(part);
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        rows_of(N, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
#define APPLY(RELU, HAS_R, BF16) apply_rows(x, r, scale, shift, out, b, e, C, RELU, HAS_R, BF16)
        VARIANTS(APPLY);
#undef APPLY
    }
    return 0;
}

/* Gradients of ride_bn_act_forward: grad_x (and grad_r, which must be given when r is not NULL) from
 * the output gradient g, the forward's x, r and `save`; grad_weight and grad_bias (C each).
 * Returns 0 or -1 (out of memory). */
int ride_bn_act_backward(const void *RESTRICT g, const void *RESTRICT x, const void *RESTRICT r, const float *RESTRICT weight,
                         const float *RESTRICT save, int64_t N, int64_t C, int relu, int bf16, void *RESTRICT grad_x, void *RESTRICT grad_r,
                         float *RESTRICT grad_weight, float *RESTRICT grad_bias, int nt) {
    const float *mean = save, *invstd = save + C, *scale = save + 2 * C, *shift = save + 3 * C;
    double *part = calloc((size_t)(2 * nt * C), sizeof(double));
    float *k = malloc((size_t)(3 * C) * sizeof(float));
    if (!part || !k) {
        free(part);
        free(k);
        return -1;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        rows_of(N, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        double *sg = part + 2 * omp_get_thread_num() * C;
#define REDUCE(RELU, HAS_R, BF16) grad_reduce_rows(g, x, r, scale, shift, mean, grad_r, b, e, C, sg, sg + C, RELU, HAS_R, BF16)
        VARIANTS(REDUCE);
#undef REDUCE
    }
    /* grad_x = k0 * (g' - k1 - (x - mean) * k2) */
    add_up_threads(part, nt, C);
    for (int64_t c = 0; c < C; ++c) {
        double sg = part[c], sgx = part[C + c];
        double is = invstd[c];
        grad_bias[c] = (float)sg;
        grad_weight[c] = (float)(sgx * is);
        k[c] = (float)((double)weight[c] * is);
        k[C + c] = (float)(sg / (double)N);
        k[2 * C + c] = (float)(sgx / (double)N * is * is);
    }
    free(part);
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        rows_of(N, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
#define APPLY(RELU, HAS_R, BF16) grad_apply_rows(g, x, scale, shift, mean, k, k + C, k + 2 * C, grad_x, grad_r, b, e, C, RELU, HAS_R, BF16)
        VARIANTS(APPLY);
#undef APPLY
    }
    free(k);
    return 0;
}
