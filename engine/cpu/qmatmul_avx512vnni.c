/* The integer kernels of engine/cpu/qblocks.h with AVX512-VNNI (Ice Lake and later Xeons, Zen 4 and later): u8 x s8 block
 * dots by dpbusd (one instruction for AVX2's maddubs + madd, accumulating in int32, so nothing can saturate) and int16
 * pairs by dpwssd, in their 256-bit AVX512VL forms: one 32-byte block is one ymm register, as in llama.cpp's x86
 * kernels, so the kernels' block loops, scales and float sums stay those of the AVX2 reference. Built with -mavx512f
 * -mavx512bw -mavx512vl -mavx512vnni by engine/cpu/library.py, run where /proc/cpuinfo lists those (or
 * MCL_CPU_ISA=avx512vnni), checked there against engine/cpu/qmatmul.c's AVX2 variant.
 */
#include <immintrin.h>

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

static inline __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
}

static inline __m256i dot2_s16(__m256i a0, __m256i b0, __m256i a1, __m256i b1) {
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(a0, b0), a1, b1);
}

#define QMATMUL_NAME qmatmul_avx512vnni
#include "qblocks.h"
