/* Block-quantised matmul for the CPU (AVX2 + FMA, OpenMP): y (M, N) = x (M, K) @ W^T, W in GGUF-style blocks.
 *
 * Built and loaded by engine/cpu_kernels.py (gcc -O3 -mavx2 -mfma -fopenmp); the torch reference of the same
 * arithmetic is engine.cpu_kernels.qmatmul_ref. Layouts (engine/quant.py writes them from a GGUF's blocks):
 *   kind 8: w int8 (N, K), scale fp32 (N, K/G), G = 16 or 32      w[n, k] = scale[n, k/G] * q[n, k] (+ min[n, k/G])
 *   kind 4: w uint8 (N, K/2), scale fp32 (N, K/32), G = 32: the 16 bytes of a 32-block hold element j in the
 *           low nibble and element j + 16 in the high nibble (GGUF's Q4 order); q in 0..15.
 *   min (optional, may be NULL): fp32 (N, K/G), added per group (Q4_1, Q4_K).
 * Activations are quantised as llama.cpp does (its Q8_0 "vec_dot_type"): per 32 inputs x ~= dx * qx, qx int8,
 * dx = amax / 127; sx holds dx * sum(qx) per 16 inputs for the min terms. The block dot products are exact in
 * integers (_mm256_maddubs_epi16 cannot saturate: |w| <= 128 and |qx| <= 127 give pair sums <= 32512) and are
 * scaled and summed in fp32.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>

void quantize_x(const float *x, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx, int nt) {
    int64_t nb = M * K / 32;
#pragma omp parallel for num_threads(nt) schedule(static) if (nb > 256)
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int s0 = 0, s1 = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            qx[b * 32 + j] = (int8_t)q;
            if (j < 16) s0 += q; else s1 += q;
        }
        dx[b] = d;
        sx[2 * b] = d * (float)s0;
        sx[2 * b + 1] = d * (float)s1;
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int32 lanes of the block dot product: lanes 0-3 cover elements 0-15, lanes 4-7 elements 16-31 */
static inline __m256 dot_i8(__m256i w, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

static inline __m256 dot_u4(__m128i packed, __m256i x) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), lo4), _mm_and_si128(packed, lo4));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
}

void qmatmul(const int8_t *qx, const float *dx, const float *sx, int64_t M, int64_t K,
             const uint8_t *w, const float *scale, const float *wmin, int kind, int G, int64_t N,
             float *y, int nt) {
    const int64_t nb = K / 32, ng = K / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *sc = scale + n * ng;
        const float *mn = wmin ? wmin + n * ng : 0;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xq = qx + m * K;
            const float *xd = dx + m * nb;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
                __m256 p;
                if (kind == 4)
                    p = dot_u4(_mm_loadu_si128((const __m128i *)(w + n * (K / 2) + b * 16)), xv);
                else
                    p = dot_i8(_mm256_loadu_si256((const __m256i *)(w + n * K + b * 32)), xv);
                __m256 s = G == 32 ? _mm256_set1_ps(sc[b] * xd[b])
                                   : _mm256_set_m128(_mm_set1_ps(sc[2 * b + 1] * xd[b]), _mm_set1_ps(sc[2 * b] * xd[b]));
                acc = _mm256_fmadd_ps(s, p, acc);
            }
            float r = hsum(acc);
            if (mn) {
                const float *xs = sx + m * (K / 16);
                if (G == 32)
                    for (int64_t g = 0; g < ng; g++) r += mn[g] * (xs[2 * g] + xs[2 * g + 1]);
                else
                    for (int64_t g = 0; g < ng; g++) r += mn[g] * xs[g];
            }
            y[m * N + n] = r;
        }
    }
}

/* quantize_x into the caller's buffers, then qmatmul: one call from Python per projection */
void qmatmul_x(const float *x, int8_t *qx, float *dx, float *sx, int64_t M, int64_t K,
               const uint8_t *w, const float *scale, const float *wmin, int kind, int G, int64_t N,
               float *y, int nt) {
    quantize_x(x, M, K, qx, dx, sx, nt);
    qmatmul(qx, dx, sx, M, K, w, scale, wmin, kind, G, N, y, nt);
}
