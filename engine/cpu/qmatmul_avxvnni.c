/* The integer kernels of engine/cpu/qblocks.h with AVX-VNNI (Alder Lake and later cores, Zen 5): u8 x s8 block dots by
 * the 256-bit _mm256_dpbusd_avx_epi32 (one instruction for AVX2's maddubs + madd, accumulating in int32, so nothing
 * can saturate) and int16 pairs by _mm256_dpwssd_avx_epi32. Built with -mavxvnni by engine/cpu/library.py, run where
 * /proc/cpuinfo lists avx_vnni (or MCL_CPU_ISA=avxvnni), checked there against engine/cpu/qmatmul.c's AVX2 variant.
 */
#include <immintrin.h>

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
}

static inline __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
}

static inline __m256i dot2_s16(__m256i a0, __m256i b0, __m256i a1, __m256i b1) {
    return _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(a0, b0), a1, b1);
}

#define QMATMUL_NAME qmatmul_avxvnni
#include "qblocks.h"
