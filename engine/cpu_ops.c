/* Decode-step attention for CPU inference: RoPE, the KV-cache write and attention of one new token per row, in one
 * call (eager torch spends ~25 small ops on it per layer, each costing more than its arithmetic at batch 1).
 *
 * Built with engine/qmatmul.c into one library by engine/cpu_kernels.py; the torch reference is the eager path of
 * engine/model.py's Attention (apply_rope, KVCache.update / read, _small_q_attention), which tests/test_quant.py
 * compares it with.
 *
 * Row b of q (nh heads), k and v (nkv heads each; head_dim hd) is the token at position pos[b] of cache slot
 * slots[b]. The cache tensors of one layer are (n_slots, nkv, L, hd) fp32 contiguous. RoPE is the rotate-half
 * convention with the caller's cos / sin rows (B, hd). Query head h reads KV head h / (nh / nkv) over keys
 * 0 .. pos[b]; out (B, nh * hd).
 */
#include <math.h>
#include <stdint.h>
#include <immintrin.h>
#include <omp.h>

static inline void rope(const float *x, const float *c, const float *s, int64_t hd, float *out) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) out[i] = x[i] * c[i] - x[i + h] * s[i];
    for (int64_t i = h; i < hd; i++) out[i] = x[i] * c[i] + x[i - h] * s[i];
}

int decode_attention(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t L,
                     const int64_t *slots, const int64_t *pos, int64_t B, int64_t nh, int64_t nkv, int64_t hd,
                     float *out, int nt) {
    if (hd > 512 || nh % nkv) return -1;
    for (int64_t b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= L) return -2;
    const int64_t group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t b = 0; b < B; b++)                                      /* the new keys and values into the cache */
        for (int64_t g = 0; g < nkv; g++) {
            const int64_t at = ((slots[b] * nkv + g) * L + pos[b]) * hd;
            rope(k + b * ldk + g * hd, cos + b * hd, sin + b * hd, hd, kc + at);
            for (int64_t i = 0; i < hd; i++) vc[at + i] = v[b * ldv + g * hd + i];
        }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) collapse(2) if (B * nh > 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nh; h++) {
            const int64_t n = pos[b] + 1, base = (slots[b] * nkv + h / group) * L * hd;
            float qr[512], acc[512], sc[n];
            rope(q + b * ldq + h * hd, cos + b * hd, sin + b * hd, hd, qr);
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const float *kj = kc + base + j * hd;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (int64_t i = 0; i < hd; i++) d += qr[i] * kj[i];
                sc[j] = d * scale;
                mx = fmaxf(mx, sc[j]);
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                sc[j] = expf(sc[j] - mx);
                sum += sc[j];
            }
            for (int64_t i = 0; i < hd; i++) acc[i] = 0.f;
            for (int64_t j = 0; j < n; j++) {
                const float *vj = vc + base + j * hd, p = sc[j] / sum;
#pragma omp simd
                for (int64_t i = 0; i < hd; i++) acc[i] += p * vj[i];
            }
            for (int64_t i = 0; i < hd; i++) out[(b * nh + h) * hd + i] = acc[i];
        }
    return 0;
}

/* RMSNorm of R rows of D (fp32): out = w * x / sqrt(mean(x^2) + eps), the torch reference being engine/model.py's
 * RMSNorm (one call instead of six ops). */
void rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[r * D + i] = w[i] * (xr[i] * inv);
    }
}

/* The adapters' delta for inference, added into y: y[t] += s[a] * B[a] (A[a] x[t]) for every row t whose adapter
 * ids[t] = a is >= 0 (-1: base only). A (N, R, in), B (N, out, R) fp32 contiguous (ranks below R zero-padded, as
 * engine/lora.py stacks them), R <= 256 and a multiple of 8; x rows ldx apart, y rows ldy apart; T <= 64 rows. The torch
 * reference is kernels.multi_lora.multi_lora_torch (one call instead of ~8 ops per projection). */
static inline float dot8(const float *a, const float *b, int64_t n) {            /* n % 8 == 0 */
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i < n) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

int lora_apply(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t T, int64_t in, int64_t out,
               const float *A, const float *B, const float *scales, int64_t R, const int64_t *ids, int nt) {
    if (R > 256 || R % 8 || in % 8 || T > 64) return -1;
    float mid[64 * 256];                                                       /* s[a] A[a] x[t], (T, R) */
#pragma omp parallel num_threads(nt) if (T * (in + out) * R > 65536)
    {
#pragma omp for schedule(static) collapse(2)
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = 0; r < R; r++)
                mid[t * R + r] = ids[t] < 0 ? 0.f : dot8(A + (ids[t] * R + r) * in, x + t * ldx, in) * scales[ids[t]];
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++)
            for (int64_t t = 0; t < T; t++)
                if (ids[t] >= 0) y[t * ldy + o] += dot8(B + (ids[t] * out + o) * R, mid + t * R, R);
    }
    return 0;
}
