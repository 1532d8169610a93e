/* Training-mode BatchNorm fused with the residual add and the ReLU that follow it, for float32
 * channels-last (NHWC) tensors on the CPU: ride_fast.ops.batch_norm_act (docs/performance-notes.md,
 * "Fused BatchNorm and ReLU on the CPU").
 *
 * Shape legend: N rows (batch x height x width), C channels; row n of x is x[n*C .. n*C + C).
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

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))

static void rows_of(int64_t N, int t, int nt, int64_t *begin, int64_t *end) {
    *begin = N * t / nt;
    *end = N * (t + 1) / nt;
}

/* v where keep, else +0 (a NaN or inf gradient too, as torch's ReLU backward): a bit mask, not a
 * branch, so that the loops stay vectorised. */
INLINE float keep_if(float v, int keep) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u &= -(uint32_t)(keep != 0);
    memcpy(&v, &u, sizeof v);
    return v;
}

/* The per-thread sums part [nt][2][C], added in thread order into part[0] (so results depend only
 * on the thread count). */
static void add_up_threads(double *part, int nt, int64_t C) {
    for (int t = 1; t < nt; ++t)
        for (int64_t i = 0; i < 2 * C; ++i) part[i] += part[2 * t * C + i];
}

/* The row loops below take `relu` and `r != NULL` as compile-time constants (each caller passes
 * literals), so every variant is a branch-free loop the compiler vectorises. */

INLINE void stats_rows(const float *RESTRICT x, int64_t b, int64_t e, int64_t C, double *RESTRICT s, double *RESTRICT q) {
    for (int64_t n = b; n < e; ++n) {
        const float *RESTRICT row = x + n * C;
        for (int64_t c = 0; c < C; ++c) {
            double v = row[c];
            s[c] += v;
            q[c] += v * v;
        }
    }
}

INLINE void apply_rows(const float *RESTRICT x, const float *RESTRICT r, const float *RESTRICT scale, const float *RESTRICT shift,
                       float *RESTRICT out, int64_t b, int64_t e, int64_t C, const int relu, const int has_r) {
    for (int64_t n = b; n < e; ++n) {
        const float *RESTRICT xr = x + n * C;
        const float *RESTRICT rr = r + (has_r ? n * C : 0);
        float *RESTRICT o = out + n * C;
        for (int64_t c = 0; c < C; ++c) {
            float p = xr[c] * scale[c] + shift[c];
            if (has_r) p = p + rr[c];
            o[c] = (relu && p < 0.0f) ? 0.0f : p;
        }
    }
}

/* With a residual, g' is also stored as grad_r here, and the second pass reads it back instead of
 * g, x and r (one read less). */
INLINE void grad_reduce_rows(const float *RESTRICT g, const float *RESTRICT x, const float *RESTRICT r, const float *RESTRICT scale,
                             const float *RESTRICT shift, const float *RESTRICT mean, float *RESTRICT grad_r, int64_t b, int64_t e,
                             int64_t C, double *RESTRICT sg, double *RESTRICT sgx, const int relu, const int has_r) {
    for (int64_t n = b; n < e; ++n) {
        const float *RESTRICT gr = g + n * C, *RESTRICT xr = x + n * C;
        const float *RESTRICT rr = r + (has_r ? n * C : 0);
        float *RESTRICT grr = grad_r + (has_r ? n * C : 0);
        for (int64_t c = 0; c < C; ++c) {
            float gv = gr[c];
            if (relu) {
                float p = xr[c] * scale[c] + shift[c];
                if (has_r) p = p + rr[c];
                gv = keep_if(gv, p > 0.0f);
            }
            if (has_r) grr[c] = gv;
            sg[c] += (double)gv;
            sgx[c] += (double)(gv * (xr[c] - mean[c]));
        }
    }
}

INLINE void grad_apply_rows(const float *RESTRICT g, const float *RESTRICT x, const float *RESTRICT scale,
                            const float *RESTRICT shift, const float *RESTRICT mean, const float *RESTRICT k0, const float *RESTRICT k1,
                            const float *RESTRICT k2, float *RESTRICT grad_x, const float *RESTRICT grad_r, int64_t b, int64_t e,
                            int64_t C, const int relu, const int has_r) {
    for (int64_t n = b; n < e; ++n) {
        const float *RESTRICT xr = x + n * C;
        float *RESTRICT gx = grad_x + n * C;
        if (has_r) { /* g' from the first pass */
            const float *RESTRICT gr = grad_r + n * C;
            for (int64_t c = 0; c < C; ++c) gx[c] = k0[c] * (gr[c] - k1[c] - (xr[c] - mean[c]) * k2[c]);
            continue;
        }
        const float *RESTRICT gr = g + n * C;
        for (int64_t c = 0; c < C; ++c) {
            float gv = gr[c];
            if (relu) gv = keep_if(gv, xr[c] * scale[c] + shift[c] > 0.0f);
            gx[c] = k0[c] * (gv - k1[c] - (xr[c] - mean[c]) * k2[c]);
        }
    }
}

#define VARIANTS(call)                  \
    do {                                \
        if (relu && r)                  \
            call(1, 1);                 \
        else if (relu)                  \
            call(1, 0);                 \
        else if (r)                     \
            call(0, 1);                 \
        else                            \
            call(0, 0);                 \
    } while (0)

/* Batch statistics and out = relu(x * scale + shift (+ r)). save [5, C] receives the batch mean,
 * invstd, scale, shift and the unbiased variance (for the running statistics, which the caller
 * updates). Returns 0, or -1 when out of memory (nothing written). */
int ride_bn_act_forward(const float *RESTRICT x, const float *RESTRICT r, const float *RESTRICT weight, const float *RESTRICT bias,
                        double eps, int64_t N, int64_t C, int relu, float *RESTRICT out, float *RESTRICT save, int nt) {
    double *part = calloc((size_t)(2 * nt * C), sizeof(double));
    if (!part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int64_t b, e;
        rows_of(N, omp_get_thread_num(), omp_get_num_threads(), &b, &e);
        double *s = part + 2 * omp_get_thread_num() * C;
        stats_rows(x, b, e, C, s, s + C);
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
#define APPLY(RELU, HAS_R) apply_rows(x, r, scale, shift, out, b, e, C, RELU, HAS_R)
        VARIANTS(APPLY);
#undef APPLY
    }
    return 0;
}

/* Gradients of ride_bn_act_forward: grad_x (and grad_r, which must be given when r is not NULL) from
 * the output gradient g, the forward's x, r and `save`; grad_weight and grad_bias (C each).
 * Returns 0 or -1 (out of memory). */
int ride_bn_act_backward(const float *RESTRICT g, const float *RESTRICT x, const float *RESTRICT r, const float *RESTRICT weight,
                         const float *RESTRICT save, int64_t N, int64_t C, int relu, float *RESTRICT grad_x, float *RESTRICT grad_r,
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
#define REDUCE(RELU, HAS_R) grad_reduce_rows(g, x, r, scale, shift, mean, grad_r, b, e, C, sg, sg + C, RELU, HAS_R)
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
#define APPLY(RELU, HAS_R) grad_apply_rows(g, x, scale, shift, mean, k, k + C, k + 2 * C, grad_x, grad_r, b, e, C, RELU, HAS_R)
        VARIANTS(APPLY);
#undef APPLY
    }
    free(k);
    return 0;
}
