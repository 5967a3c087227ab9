/* Block-quantised matmul for the CPU (OpenMP): the AVX2 variant of the integer kernels, which is the reference every
 * other variant is checked against; the dispatch to the variant chosen at load; and the code without variants.
 *
 *   qmatmul             y = x @ W^T for int8 activations (quantize_x) and a packed W (layouts and kernels:
 *                       engine/cpu/qblocks.h), run by the variant mcl_set_isa chose (AVX2 until then); engine/cpu/cpu_ops.c's
 *                       decode_layer calls it too.
 *   qmatmul_avx2        this file's variant: u8 x s8 block dots by _mm256_maddubs_epi16 + _mm256_madd_epi16.
 *   qmatmul_avxvnni     engine/cpu/qmatmul_avxvnni.c; qmatmul_avx512vnni: engine/cpu/qmatmul_avx512vnni.c (VNNI's dpbusd).
 *   quantize_x          activations to int8 per 32 inputs, as llama.cpp quantises them.
 *   dequant             the fp32 weights the kernels multiply by (large batches: dequantise a tile, then SGEMM);
 *   dequant_bf16        the same rounded to bf16, where the GEMM of large batches runs in bf16.
 *
 * Built by engine/cpu/library.py, which holds each variant's gcc flags, picks the variant from the CPU's features
 * (MCL_CPU_ISA=avx2|avxvnni|avx512vnni forces one) and checks it against this one the first time it runs on a CPU.
 * A variant this gcc could not build is absent: its symbol is weak here, NULL, and mcl_isa reports it missing.
 */
#include <immintrin.h>
#include <math.h>

/* The integer primitives of engine/cpu/qblocks.h, AVX2 forms. maddubs sums adjacent u8 x s8 products into int16 with
 * saturation, which the bounds never reach: u <= 128 and |s| <= 127 give |pair| <= 32512; dot2_u8s8's u <= 31 give
 * |both pairs| <= 2 * 2 * 31 * 127 = 15748, added in int16 before the one madd. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

static inline __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                             _mm256_set1_epi16(1));
}

static inline __m256i dot2_s16(__m256i a0, __m256i b0, __m256i a1, __m256i b1) {
    return _mm256_add_epi32(_mm256_madd_epi16(a0, b0), _mm256_madd_epi16(a1, b1));
}

#define QMATMUL_NAME qmatmul_avx2
#include "qblocks.h"

/* --- the variant chosen at load (engine/cpu/library.py) ----------------------------------------------------------- */
#pragma weak qmatmul_avxvnni
#pragma weak qmatmul_avx512vnni

typedef __typeof__(qmatmul_avx2) qmatmul_fn;
static const struct { const char *name; qmatmul_fn *fn; } VARIANTS[] = {
    {"avx2", qmatmul_avx2}, {"avxvnni", qmatmul_avxvnni}, {"avx512vnni", qmatmul_avx512vnni},
};
static qmatmul_fn *chosen = qmatmul_avx2;

/* Variant i's name in *name; 1 when the library has it, 0 when it was not built, -1 past the end. */
int mcl_isa(int i, const char **name) {
    if (i < 0 || i >= (int)(sizeof VARIANTS / sizeof VARIANTS[0])) return -1;
    *name = VARIANTS[i].name;
    return VARIANTS[i].fn != 0;
}

/* Variant i runs every qmatmul call from now on, process-wide (set while no kernel runs); -1 when it is missing. */
int mcl_set_isa(int i) {
    const char *name;
    if (mcl_isa(i, &name) != 1) return -1;
    chosen = VARIANTS[i].fn;
    return 0;
}

/* y[m * ldy + n] = sum_k x[m, k] W[n, k] for the pre-quantised x (quantize_x); -1 for a layout it lacks. */
int qmatmul(const int8_t *qx, const float *dx, const float *sx, int64_t M, int64_t K,
            const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md, int menc,
            int kind, int G, int64_t N, float *y, int64_t ldy, int nt) {
    return chosen(qx, dx, sx, M, K, w, scale, sd, senc, wmin, md, menc, kind, G, N, y, ldy, nt);
}

/* --- without variants ------------------------------------------------------------------------------------------- */
/* qx (M, K) int8, dx and sx (M, K / 32) of x (M, K) fp32: per 32 inputs dx = amax / 127, qx = round(x / dx),
 * sx = dx * sum(qx) (torch reference: engine.cpu.kernels.quantize_x_ref). */
void quantize_x(const float *x, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx, int nt) {
    int64_t nb = M * K / 32;
#pragma omp parallel for num_threads(nt) schedule(static) if (nb > 256)
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) {                 /* not fmaxf: without -ffast-math gcc calls libm for it */
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int s = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            qx[b * 32 + j] = (int8_t)q;
            s += q;
        }
        dx[b] = d;
        sx[b] = d * (float)s;
    }
}

/* 8 fp32 values -> bf16 at o, rounded to nearest even as torch's .to(torch.bfloat16) (finite values; weights are). */
static inline __attribute__((always_inline)) void store8_bf16(uint16_t *o, __m256 f) {
    const __m256i b = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);     /* 16-bit halves 0-3, 4-7 */
    _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(p));
}

/* Row n of W into o (K values): scale * q, then + min (two roundings, as the gguf package's dequantisation), stored
 * as fp32, or (bf16 = 1) rounded once more to bf16. */
static inline __attribute__((always_inline)) void dequant_row(
        const uint8_t *w, const void *scale, const float *sd, const void *wmin, const float *md, int64_t K, int64_t n,
        void *o, const int kind, const int G, const int senc, const int menc, const int bf16) {
    const int64_t nb = K / 32, ng = K / G, BB = block_bytes(kind), ssz = senc == 1 ? 2 : 1, msz = menc == 1 ? 2 : 1;
    const uint8_t *wr = w + n * nb * BB;
    const void *sc = (const char *)scale + n * ng * ssz, *mn = menc ? (const char *)wmin + n * nb * msz : 0;
    const float *sdn = sd ? sd + n * (K / 256) : 0, *mdn = md ? md + n * (K / 256) : 0;
    for (int64_t b = 0; b < nb; b++) {
        const __m256i q = unpack_block(wr + b * BB, kind);
        const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        __m256i v[4];
        if (UNSIGNED(kind)) {
            v[0] = _mm256_cvtepu8_epi32(lo), v[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
            v[2] = _mm256_cvtepu8_epi32(hi), v[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
            if (kind == 5)
                for (int c = 0; c < 4; c++) v[c] = _mm256_sub_epi32(v[c], _mm256_set1_epi32(16));
        } else {
            v[0] = _mm256_cvtepi8_epi32(lo), v[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
            v[2] = _mm256_cvtepi8_epi32(hi), v[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
        }
        const float s0 = group_scale(sc, sdn, senc, G == 32 ? b : 2 * b, b);
        const float s1 = G == 32 ? s0 : group_scale(sc, sdn, senc, 2 * b + 1, b);
        const __m256 m = _mm256_set1_ps(menc ? group_scale(mn, mdn, menc, b, b) : 0.f);
        for (int c = 0; c < 4; c++) {
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v[c]), _mm256_set1_ps(c < 2 ? s0 : s1));
            if (menc) f = _mm256_add_ps(f, m);
            if (bf16) store8_bf16((uint16_t *)o + b * 32 + c * 8, f);
            else _mm256_storeu_ps((float *)o + b * 32 + c * 8, f);
        }
    }
}

/* The weights of rows (rows[i], or row0 + i when rows is NULL), i < nrows, into out (nrows, K): fp32 (dequant) or
 * bf16 (dequant_bf16: the same values rounded to nearest even; the input of a bf16 GEMM, with no fp32 tile between). */
static inline __attribute__((always_inline)) int dequant_any(
        const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md, int menc,
        int kind, int G, int64_t K, const int64_t *rows, int64_t row0, int64_t nrows, void *out, int nt, const int bf16) {
    const int layout = layout_id(kind, G, senc, wmin ? menc : 0);
    if (layout < 0 || K % 32 || (senc == 2 && K % 256) || (wmin && menc == 2 && K % 256)) return -1;
    const int64_t esz = bf16 ? 2 : 4;
#define DQ_ROW(k, g, se, me) dequant_row(w, scale, sd, wmin, md, K, rows ? rows[i] : row0 + i, \
                                         (char *)out + i * K * esz, k, g, se, me, bf16)
#pragma omp parallel for num_threads(nt) schedule(static) if (nrows * K > 65536)
    for (int64_t i = 0; i < nrows; i++) {
        LAYOUT_SWITCH(DQ_ROW)
    }
#undef DQ_ROW
    return 0;
}

int dequant(const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md, int menc,
            int kind, int G, int64_t K, const int64_t *rows, int64_t row0, int64_t nrows, float *out, int nt) {
    return dequant_any(w, scale, sd, senc, wmin, md, menc, kind, G, K, rows, row0, nrows, out, nt, 0);
}

int dequant_bf16(const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md,
                 int menc, int kind, int G, int64_t K, const int64_t *rows, int64_t row0, int64_t nrows, uint16_t *out,
                 int nt) {
    return dequant_any(w, scale, sd, senc, wmin, md, menc, kind, G, K, rows, row0, nrows, out, nt, 1);
}
