/* How fast this core multiplies in bf16 against float32: the products a second of its AVX512-BF16
 * dot product (vdpbf16ps, two bf16 products a lane) over those of its 512-bit float32 FMA (one a
 * lane), each timed on independent accumulators so that throughput, not latency, is measured.
 * Under bf16 autocast on a CPU without AMX, ride_fast.ops.conv3x3 leaves the convolutions to oneDNN's
 * bf16 kernels where this ratio says bf16 multiplies faster, and runs its own kernel (bf16 in memory,
 * float32 products) where it does not (docs/performance-notes.md, "bf16 on a CPU whose bf16 products
 * are slow").
 *
 * Why measure: the instruction set does not say. A core that runs 512-bit FMAs as two 256-bit halves
 * (AMD's Zen 4) runs vdpbf16ps at the FMA's rate, twice the products; an Intel core with AMX
 * switched off runs two FMAs a cycle and one vdpbf16ps every other cycle or so, half the products.
 */
#include <stdint.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define CHAINS(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The seconds of n rounds of one instruction on each of 16 accumulators: a float32 FMA, or a
 * vdpbf16ps when dot; their sum goes to *sink, so that the compiler keeps the work. */
static inline __attribute__((always_inline)) double chains_seconds(int64_t n, float *sink, const int dot) {
    const __m512 m = _mm512_set1_ps(0.5f), v = _mm512_set1_ps(0.25f);
    const __m512bh mb = (__m512bh)_mm512_set1_epi32(0x3f003f00), vb = (__m512bh)_mm512_set1_epi32(0x3e803e80); /* 0.5, 0.25 */
#define DECLARE(k) __m512 a##k = _mm512_set1_ps((float)k); /* different starts: no two chains are the same value */
    CHAINS(DECLARE)
#undef DECLARE
    const double t = seconds();
    for (int64_t r = 0; r < n; ++r) {
#define STEP(k) a##k = dot ? _mm512_dpbf16_ps(a##k, mb, vb) : _mm512_fmadd_ps(m, v, a##k);
        CHAINS(STEP)
#undef STEP
    }
    const double elapsed = seconds() - t;
    float s = 0.0f;
#define SUM(k) s += _mm512_reduce_add_ps(a##k);
    CHAINS(SUM)
#undef SUM
    *sink += s;
    return elapsed;
}
#endif

/* (bf16 products a second) / (float32 products a second) on the calling thread's core, from the
 * fastest of `rounds` interleaved timings of each kind over n rounds of 16 instructions (the first
 * of each also brings the core to its 512-bit clock). -1 where this build has no AVX512-BF16, or
 * for n or rounds under 1. */
double ride_bf16_product_ratio(int64_t n, int rounds) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (n < 1 || rounds < 1) return -1.0;
    float sink = 0.0f;
    double fma = 1e30, dot = 1e30;
    for (int r = 0; r < rounds; ++r) {
        const double f = chains_seconds(n, &sink, 0), d = chains_seconds(n, &sink, 1);
        fma = f < fma ? f : fma;
        dot = d < dot ? d : dot;
    }
    if (!(sink > 0.0f) || !(fma > 0.0) || !(dot > 0.0)) return -1.0;
    return (32.0 / dot) / (16.0 / fma); /* products per instruction: 2 in each of 16 lanes against 1 */
#else
    (void)n;
    (void)rounds;
    return -1.0;
#endif
}
