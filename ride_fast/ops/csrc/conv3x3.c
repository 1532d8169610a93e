/* 3x3 convolution, stride 1, zero padding 1, no bias, of float32 or bf16 channels-last (NHWC)
 * tensors with a float32 weight on a CPU with AVX-512: ride_fast.ops.conv3x3 (docs/performance-notes.md,
 * "3x3 convolutions of the narrow expert layers on the CPU" and "bf16 on a CPU whose bf16 products
 * are slow").
 *
 * Shape legend: B images, H x W pixels, G groups, CI input and CO output channels of one group.
 *
 *   x    [B, H, W, G*CI]     group g reads channels [g*CI, (g+1)*CI)
 *   wp   [G, 3, 3, CI, CO]   the weight packed tap-major, CO innermost (the Python side packs it)
 *   out  [B, H, W, G*CO]     out[b, h, w, g*CO + o] = sum over kh, kw, i of
 *                              x[b, h+kh-1, w+kw-1, g*CI + i] * wp[g, kh, kw, i, o]   (0 outside the image)
 *
 * The same function computes the input gradient of such a convolution: it is the convolution of the
 * output gradient with the weight flipped in both taps and with CI and CO swapped, which the Python
 * side packs. A third function computes the weight gradient (except at 16 channels, where oneDNN's is
 * faster).
 *
 * Why: the experts' layers are narrow (RIDE-ResNet-32: 16, 24 and 48 channels a group), and
 * oneDNN's kernels pad a group's output channels to a multiple of 16 or 32 and run 24-channel
 * groups at about a quarter of the cores' float32 peak. Here each tile is PB output pixels of one
 * row by all CO channels of one group, held in registers (CO / 16 512-bit vectors, plus one 256-bit
 * vector for the 8 channels left over), and every input value is broadcast once per tile and tap.
 * The input rows a tile reads are first copied into a zero-bordered ring of three rows per group of
 * the thread, so the inner loop has no bounds tests and each row is copied once per output image.
 * Each output is summed over taps, then input channels, in one fixed order by one thread: results do
 * not depend on the thread count.
 *
 * bf16 (bf16 autocast on a CPU whose bf16 products are no faster than float32): x, out and the
 * output gradient are bf16 in memory, widened to float32 as the rows are copied; the products are
 * of that float32 input and the float32 weight, summed in float32 and rounded once to bf16 (to
 * nearest even, as PyTorch rounds) when stored. The weight gradient is float32 either way.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* (CI, CO, 512-bit vectors, one 256-bit vector or not, pixels per tile, weight gradient too): the
 * shapes compiled. The registers a tile holds, PB * (NZ + HY), stay at or under 24 of the 32. At 16
 * channels oneDNN's weight gradient is the faster one (one vector of output channels leaves each
 * broadcast input value a single multiply here), so that shape has the forward and the input
 * gradient only. */
#define SHAPES(M) M(16, 16, 1, 0, 16, 0) M(24, 24, 1, 1, 8, 1) M(32, 32, 2, 0, 8, 1) M(48, 48, 3, 0, 8, 1)

#ifdef __AVX512F__
#define FOR_PIXELS(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

/* The tiles' register blocking, for a function with compile-time NZ and HY and zero vectors z, zy:
 * up to 16 accumulators k of CO lanes (a<k>_0..2 and y<k>), the CO-lane vectors m0..m2, my loaded
 * from a row of floats, and one multiply-add of a broadcast value into accumulator k (when k < n). */
#define DECLARE_ACCUMULATOR(k)                      \
    __m512 a##k##_0 = z, a##k##_1 = z, a##k##_2 = z; \
    __m256 y##k = zy;
#define LOAD_LANES(row)                                               \
    const __m512 m0 = NZ > 0 ? _mm512_loadu_ps(row) : z;              \
    const __m512 m1 = NZ > 1 ? _mm512_loadu_ps((row) + 16) : z;       \
    const __m512 m2 = NZ > 2 ? _mm512_loadu_ps((row) + 32) : z;       \
    const __m256 my = HY ? _mm256_loadu_ps((row) + 16 * NZ) : zy;
#define MULTIPLY_ADD(k, value, n)                                                \
    if (k < (n)) {                                                               \
        const __m512 v = _mm512_set1_ps(value);                                  \
        if (NZ > 0) a##k##_0 = _mm512_fmadd_ps(m0, v, a##k##_0);                 \
        if (NZ > 1) a##k##_1 = _mm512_fmadd_ps(m1, v, a##k##_1);                 \
        if (NZ > 2) a##k##_2 = _mm512_fmadd_ps(m2, v, a##k##_2);                 \
        if (HY) y##k = _mm256_fmadd_ps(my, _mm512_castps512_ps256(v), y##k);     \
    }

/* n (a multiple of 8) bf16 values as float32: exact (a bf16 is the upper half of a float32). */
INLINE void widen(float *dst, const uint16_t *src, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, bf16x16_to_float(_mm256_loadu_si256((const __m256i *)(src + k))));
    if (k < n) { /* 8 left: the upper 8 lanes converted are not stored */
        const __m256i h = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(src + k)));
        _mm256_storeu_ps(dst + k, _mm512_castps512_ps256(bf16x16_to_float(h)));
    }
}

/* Row hh of image b, group g, of x [B, H, W, G*CI] (float32, or bf16 when BF) into dst as float32
 * (pixel-major, pixel 0 at dst + CI): zeros for a row outside the image. */
INLINE void copy_row(float *dst, const void *x, int64_t b, int64_t hh, int64_t H, int64_t W, int64_t G, int64_t g, int64_t CI, const int BF) {
    dst += CI;
    if (hh < 0 || hh >= H) {
        memset(dst, 0, sizeof(float) * (size_t)(W * CI));
        return;
    }
    const int64_t at = (b * H + hh) * W * G * CI + g * CI, n = G == 1 ? W * CI : CI, runs = G == 1 ? 1 : W;
    for (int64_t w = 0; w < runs; ++w) { /* one run of the whole row, or one pixel's CI channels at a time */
        if (BF)
            widen(dst + w * CI, (const uint16_t *)x + at + w * G * CI, n);
        else
            memcpy(dst + w * CI, (const float *)x + at + w * G * CI, sizeof(float) * (size_t)n);
    }
}

/* Rows first .. first + count - 1 (see copy_row) into buf, one after another, rowlen floats apart. */
INLINE void copy_rows(float *buf, int64_t rowlen, const void *x, int64_t b, int64_t first, int count, int64_t H, int64_t W,
                      int64_t G, int64_t g, int64_t CI, const int BF) {
    for (int k = 0; k < count; ++k) copy_row(buf + k * rowlen, x, b, first + k, H, W, G, g, CI, BF);
}

/* np (<= PB) output pixels of one row and group, from the three input rows above, at and below it
 * (rows[kh], pixel-major, each at the tile's pixel -1) and wg (the group's packed weight), stored at
 * o (element stride ostride) as float32, or as bf16 when BF. The accumulators are named variables,
 * not an array, so that the compiler keeps them in registers. */
INLINE void tile(const float *const rows[3], const float *wg, void *o, int64_t ostride, int np, const int CI, const int CO, const int NZ,
                 const int HY, const int PB, const int BF) {
    const __m512 z = _mm512_setzero_ps();
    const __m256 zy = _mm256_setzero_ps();
    FOR_PIXELS(DECLARE_ACCUMULATOR)
    for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
            const float *xb = rows[kh] + kw * CI;
            const float *wt = wg + (kh * 3 + kw) * CI * CO;
            for (int i = 0; i < CI; ++i) {
                LOAD_LANES(wt + i * CO)
                const float *s = xb + i;
#define PIX(p) MULTIPLY_ADD(p, s[p * CI], PB)
                FOR_PIXELS(PIX)
#undef PIX
            }
        }
#define STORE(p)                                                                                        \
    if (p < PB && p < np) {                                                                             \
        if (BF) {                                                                                       \
            uint16_t *q = (uint16_t *)o + p * ostride;                                                  \
            if (NZ > 0) _mm256_storeu_si256((__m256i *)q, float_to_bf16x16(a##p##_0));                          \
            if (NZ > 1) _mm256_storeu_si256((__m256i *)(q + 16), float_to_bf16x16(a##p##_1));                   \
            if (NZ > 2) _mm256_storeu_si256((__m256i *)(q + 32), float_to_bf16x16(a##p##_2));                   \
            if (HY)                                                                                     \
                _mm_storeu_si128((__m128i *)(q + 16 * NZ), _mm256_castsi256_si128(float_to_bf16x16(_mm512_castps256_ps512(y##p)))); \
        } else {                                                                                        \
            float *q = (float *)o + p * ostride;                                                        \
            if (NZ > 0) _mm512_storeu_ps(q, a##p##_0);                                                  \
            if (NZ > 1) _mm512_storeu_ps(q + 16, a##p##_1);                                             \
            if (NZ > 2) _mm512_storeu_ps(q + 32, a##p##_2);                                             \
            if (HY) _mm256_storeu_ps(q + 16 * NZ, y##p);                                                \
        }                                                                                               \
    }
    FOR_PIXELS(STORE)
#undef STORE
}

/* Output rows [r0, r1) of the B*H rows, every group. buf: G rings of 3 rows of rowlen floats,
 * zeroed by the caller (their border columns stay zero: only pixels 0..W-1 of a row are ever
 * written). Input row hh of the current image sits in slot (hh + 1) % 3 of each group's ring, so
 * that the next output row of the same image copies one new row, not three. */
INLINE void rows_block(const void *x, const float *wp, void *out, int64_t H, int64_t W, int64_t G, float *buf, int64_t rowlen,
                       int64_t r0, int64_t r1, const int CI, const int CO, const int NZ, const int HY, const int PB, const int BF) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, h = r % H;
        const int64_t first = r > r0 && h > 0 ? h + 1 : h - 1; /* the rows above are in the rings already */
        if (r + 1 < r1 && h + 2 < H) { /* the input row the next output row copies: fetched while this row computes */
            const int64_t bytes = W * G * CI * (BF ? 2 : 4);
            const char *next = (const char *)x + (b * H + h + 2) * bytes;
            for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(next + k, _MM_HINT_T0);
        }
        for (int64_t g = 0; g < G; ++g) {
            float *ring = buf + g * 3 * rowlen;
            for (int64_t hh = first; hh <= h + 1; ++hh) copy_row(ring + (hh + 1) % 3 * rowlen, x, b, hh, H, W, G, g, CI, BF);
            for (int64_t w0 = 0; w0 < W; w0 += PB) {
                const float *const rows[3] = {ring + h % 3 * rowlen + w0 * CI, ring + (h + 1) % 3 * rowlen + w0 * CI,
                                              ring + (h + 2) % 3 * rowlen + w0 * CI};
                const int64_t at = ((b * H + h) * W + w0) * G * CO + g * CO;
                tile(rows, wp + g * 9 * CI * CO, (char *)out + at * (BF ? 2 : 4), G * CO, (int)(W - w0 < PB ? W - w0 : PB), CI, CO, NZ, HY,
                     PB, BF);
            }
        }
    }
}

#define FOR_CHANNELS FOR_PIXELS

/* d[0..16) += v, d[0..8) += h: float32 partial sums added into double. */
INLINE void add16(double *d, __m512 v) {
    _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_cvtps_pd(_mm512_castps512_ps256(v))));
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), _mm512_cvtps_pd(upper)));
}

INLINE void add8(double *d, __m256 h) { _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_cvtps_pd(h))); }

/* The weight gradient of one tap (kh, kw) and IB input channels [i0, i0 + IB), all CO output
 * channels, over R output rows of one image and group, added to gw [IB][CO] (double): the sum over
 * the rows' pixels of x[pixel + tap, i] * gy[pixel, o], in float32 registers (at most ROWS * W terms
 * each), then in double. xb: the rows' input, pixel-major with borders (R + 2 rows of rowlen floats);
 * gy: the first row's output gradient, pixel stride gstride, row stride W * gstride. */
INLINE void weight_tile(const float *xb, int64_t rowlen, const float *gy, int64_t gstride, int64_t W, int R, double *gw, const int CI,
                        const int CO, const int NZ, const int HY, const int IB) {
    const __m512 z = _mm512_setzero_ps();
    const __m256 zy = _mm256_setzero_ps();
    FOR_CHANNELS(DECLARE_ACCUMULATOR)
    for (int rr = 0; rr < R; ++rr) {
        const float *xr = xb + rr * rowlen, *gr = gy + rr * W * gstride;
        for (int64_t w = 0; w < W; ++w) {
            LOAD_LANES(gr + w * gstride)
            const float *s = xr + w * CI;
#define CH(c) MULTIPLY_ADD(c, s[c], IB)
            FOR_CHANNELS(CH)
#undef CH
        }
    }
#define STORE(c)                                          \
    if (c < IB) {                                         \
        if (NZ > 0) add16(gw + c * CO, a##c##_0);         \
        if (NZ > 1) add16(gw + c * CO + 16, a##c##_1);    \
        if (NZ > 2) add16(gw + c * CO + 32, a##c##_2);    \
        if (HY) add8(gw + c * CO + 16 * NZ, y##c);        \
    }
    FOR_CHANNELS(STORE)
#undef STORE
}

/* Adds the weight gradient of output rows [r0, r1) to gw [G, 3, 3, CI, CO] (double), in chunks of up to
 * ROWS rows of one image; x and gy are float32, or bf16 when BF. buf: (ROWS + 2) * rowlen floats,
 * zeroed by the caller. */
#define ROWS 8
INLINE void weight_rows(const void *x, const void *gy, double *gw, int64_t H, int64_t W, int64_t G, float *buf, float *gbuf, int64_t rowlen,
                        int64_t r0, int64_t r1, const int CI, const int CO, const int NZ, const int HY, const int IB, const int BF) {
    for (int64_t r = r0; r < r1;) {
        const int64_t b = r / H, h0 = r % H;
        int64_t rows_here = r1 - r < H - h0 ? r1 - r : H - h0; /* to the end of the block or of the image */
        const int R = (int)(rows_here < ROWS ? rows_here : ROWS);
        for (int64_t g = 0; g < G; ++g) {
            copy_rows(buf, rowlen, x, b, h0 - 1, R + 2, H, W, G, g, CI, BF);
            /* the rows' output gradient, contiguous with a pixel stride of whole cache lines where CO allows */
            const int64_t gs = HY ? CO + 8 : CO;
            for (int k = 0; k < R; ++k)
                for (int64_t w = 0; w < W; ++w) {
                    const int64_t at = ((b * H + h0 + k) * W + w) * G * CO + g * CO;
                    if (BF)
                        widen(gbuf + (k * W + w) * gs, (const uint16_t *)gy + at, CO);
                    else
                        memcpy(gbuf + (k * W + w) * gs, (const float *)gy + at, sizeof(float) * CO);
                }
            for (int kh = 0; kh < 3; ++kh)
                for (int kw = 0; kw < 3; ++kw)
                    for (int i0 = 0; i0 < CI; i0 += IB)
                        weight_tile(buf + kh * rowlen + kw * CI + i0, rowlen, gbuf, gs, W, R,
                                    gw + ((g * 9 + kh * 3 + kw) * CI + i0) * CO, CI, CO, NZ, HY, IB);
        }
        r += R;
    }
}
#endif

/* 1 when (CI, CO) is a compiled shape and this build has AVX-512, else 0. */
int ride_conv3x3_supported(int64_t CI, int64_t CO) {
#ifdef __AVX512F__
#define KNOWN(ci, co, nz, hy, pb, wg) || (CI == ci && CO == co)
    return 0 SHAPES(KNOWN);
#undef KNOWN
#else
    (void)CI;
    (void)CO;
    return 0;
#endif
}

/* 1 when ride_conv3x3_weight_grad computes the weight gradient of shape (CI, CO) here, else 0. */
int ride_conv3x3_weight_grad_supported(int64_t CI, int64_t CO) {
#ifdef __AVX512F__
#define KNOWN(ci, co, nz, hy, pb, wg) || (wg && CI == ci && CO == co)
    return 0 SHAPES(KNOWN);
#undef KNOWN
#else
    (void)CI;
    (void)CO;
    return 0;
#endif
}

/* out = conv3x3(x, wp) as above; x and out are float32, or bf16 when bf16 is 1 (the sums are float32
 * either way, rounded once to bf16). Returns 0; -2 when (CI, CO) is not supported (nothing written);
 * -1 when out of memory. */
int ride_conv3x3_forward(const void *x, const float *wp, void *out, int64_t B, int64_t H, int64_t W, int64_t G, int64_t CI, int64_t CO,
                         int bf16, int nt) {
    if (!ride_conv3x3_supported(CI, CO)) return -2;
#ifdef __AVX512F__
    const int64_t rows = B * H, rowlen = (W + 16 + 2) * CI; /* W rounded up to a whole tile, plus the two border pixels */
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        float *buf = calloc((size_t)(G * 3 * rowlen), sizeof(float));
        int64_t r0, r1;
        rows_of(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        if (!buf) {
            failed = 1;
        } else {
#define RUN(ci, co, nz, hy, pb, wg)                                                         \
    if (CI == ci && CO == co && bf16) rows_block(x, wp, out, H, W, G, buf, rowlen, r0, r1, ci, co, nz, hy, pb, 1); \
    else if (CI == ci && CO == co) rows_block(x, wp, out, H, W, G, buf, rowlen, r0, r1, ci, co, nz, hy, pb, 0); else
            SHAPES(RUN) {}
#undef RUN
            free(buf);
        }
    }
    return failed ? -1 : 0;
#else
    (void)x, (void)wp, (void)out, (void)B, (void)H, (void)W, (void)G, (void)bf16, (void)nt;
    return -2;
#endif
}

/* gw [G, 3, 3, CI, CO] (float32) = the weight gradient of out = conv3x3(x, wp), from gy = d loss /
 * d out [B, H, W, G*CO]; x and gy are float32, or bf16 when bf16 is 1. Each thread sums its rows
 * into its own copy in double, and the copies are added in thread order and rounded once: the
 * result depends on the thread count only. Returns 0, -2 (shape not supported, nothing written) or
 * -1 (out of memory, nothing written). */
int ride_conv3x3_weight_grad(const void *x, const void *gy, float *gw, int64_t B, int64_t H, int64_t W, int64_t G, int64_t CI, int64_t CO,
                             int bf16, int nt) {
    if (!ride_conv3x3_weight_grad_supported(CI, CO)) return -2;
#ifdef __AVX512F__
    const int64_t rows = B * H, rowlen = (W + 2) * CI, size = G * 9 * CI * CO;
    double *part = calloc((size_t)(nt * size), sizeof(double));
    if (!part) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        const int t = omp_get_thread_num();
        int64_t r0, r1;
        rows_of(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        float *buf = calloc((size_t)((ROWS + 2) * rowlen), sizeof(float));
        float *gbuf = aligned_alloc(64, (size_t)(ROWS * W * (CO + 8) * 4 + 64) / 64 * 64);
        if (!buf || !gbuf) {
            failed = 1;
            free(buf);
            free(gbuf);
        } else {
#define RUN(ci, co, nz, hy, pb, wg)                                                                                        \
    if (wg && CI == ci && CO == co)                                                                                        \
        weight_rows(x, gy, part + t * size, H, W, G, buf, gbuf, rowlen, r0, r1, ci, co, nz, hy, nz + hy == 1 ? 16 : 8, bf16 != 0); \
    else
            SHAPES(RUN) {}
#undef RUN
            free(buf);
            free(gbuf);
        }
    }
    if (!failed)
        for (int64_t k = 0; k < size; ++k) {
            double sum = part[k];
            for (int t = 1; t < nt; ++t) sum += part[t * size + k]; /* a thread that did not run left zeros */
            gw[k] = (float)sum;
        }
    free(part);
    return failed ? -1 : 0;
#else
    (void)x, (void)gy, (void)gw, (void)B, (void)H, (void)W, (void)G, (void)bf16, (void)nt;
    return -2;
#endif
}
