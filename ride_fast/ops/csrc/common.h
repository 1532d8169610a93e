/* What the CPU kernels of this folder share: the split of rows between OpenMP threads and, with
 * AVX-512, bf16 <-> float32 conversion of 16 lanes. Included by the .c files; native.py hashes it
 * with them, so a change here rebuilds the cached library. */
#ifndef RIDE_FAST_COMMON_H
#define RIDE_FAST_COMMON_H

#include <stdint.h>

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))

/* Thread t's block [*begin, *end) of N rows among nt threads: one contiguous block per thread. */
INLINE void rows_of(int64_t N, int t, int nt, int64_t *begin, int64_t *end) {
    *begin = N * t / nt;
    *end = N * (t + 1) / nt;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 values (the low halves of 16 int32 lanes' worth of bits) as float32: exact, a bf16 is
 * the upper half of a float32. */
INLINE __m512 bf16x16_to_float(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* 16 floats as bf16, rounded to nearest even, a NaN as 0x7FC0: PyTorch's own float -> bfloat16. */
INLINE __m256i float_to_bf16x16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}
#endif

#endif
