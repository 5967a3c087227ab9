/* Decode-step attention for CPU inference: RoPE, the KV-cache write and attention of one new token per row, in one
 * call (eager torch spends ~25 small ops on it per layer, each costing more than its arithmetic at batch 1).
 *
 * Built with engine/cpu/qmatmul.c and its ISA variants into one library by engine/cpu/library.py (the interface:
 * engine/cpu/cpu_kernels.h); the torch reference is the eager path of engine/model.py's Attention (apply_rope, KVCache.update / read,
 * _small_q_attention), which tests/test_quant.py compares it with.
 *
 * Row b of q (nh heads), k and v (nkv heads each; head_dim hd) is the token at position pos[b] of cache slot
 * slots[b]. The cache tensors of one layer are (n_slots, nkv, L, hd) fp32 contiguous. RoPE is the rotate-half
 * convention with the caller's cos / sin rows (B, hd). Query head h reads KV head h / (nh / nkv) over keys
 * 0 .. pos[b]; out (B, nh * hd).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#include <omp.h>

#include "cpu_kernels.h"

static inline void rope(const float *x, const float *c, const float *s, int64_t hd, float *out) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) out[i] = x[i] * c[i] - x[i + h] * s[i];
    for (int64_t i = h; i < hd; i++) out[i] = x[i] * c[i] + x[i - h] * s[i];
}

/* exp of 8 floats as Cephes' expf computes it (about 1 ulp), x clamped to [-87.3, 88]: x = n ln2 + r with |r| <=
 * ln2 / 2 (ln2 in two parts, Cody-Waite), exp(r) = 1 + r + r^2 P(r) with Cephes' degree-5 minimax P, times 2^n built
 * in the exponent bits. glibc's expf is scalar (~25 cycles an element): a 1.5B decode step at 2,000 tokens of
 * context takes 28 x 12 x 2,000 of them in the softmax below and 28 x 8,960 in the SwiGLU. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.3365478515625f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* G query heads of one row that share a KV head (q: G x hd, before RoPE; k, v: that head's cache rows) over
 * keys 0 .. n - 1 into out (G x hd): each key and value row is read once for the G heads. Per head: scores
 * q . k_j / sqrt(hd), their maximum in a pass of its own (kept across the score loop it was a store and a load per
 * key: one row at 2,000 keys ran ~1.6x slower), softmax (exp8, max subtracted), the probabilities times the values.
 * -3 when out of memory. */
static int attend(const float *q, const float *c, const float *s, const float *k, const float *v, int64_t n,
                  int64_t G, int64_t hd, float scale, float *out) {
    float *sc = (float *)malloc(sizeof(float) * (size_t)(G * n + 2 * G * hd)), *qr = sc + G * n, *acc = qr + G * hd;
    if (!sc) return -3;
    float mx[G], sum[G];
    for (int64_t h = 0; h < G; h++) rope(q + h * hd, c, s, hd, qr + h * hd), sum[h] = 0.f;
    for (int64_t j = 0; j < n; j++) {
        const float *kj = k + j * hd;
        for (int64_t h = 0; h < G; h++) {
            const float *qh = qr + h * hd;
            float d = 0.f;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < hd; i++) d += qh[i] * kj[i];
            sc[h * n + j] = d * scale;
        }
    }
    for (int64_t h = 0; h < G; h++) {
        float *sh = sc + h * n, m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < n; j++) m = sh[j] > m ? sh[j] : m;
        mx[h] = m;
    }
    for (int64_t h = 0; h < G; h++) {
        float *sh = sc + h * n;
        int64_t j = 0;
        __m256 s8 = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), _mm256_set1_ps(mx[h])));
            _mm256_storeu_ps(sh + j, e);
            s8 = _mm256_add_ps(s8, e);
        }
        for (; j < n; j++) {
            sh[j] = expf(sh[j] - mx[h]);
            sum[h] += sh[j];
        }
        float l8[8];
        _mm256_storeu_ps(l8, s8);
        for (int i = 0; i < 8; i++) sum[h] += l8[i];
    }
    for (int64_t i = 0; i < G * hd; i++) acc[i] = 0.f;
    for (int64_t j = 0; j < n; j++) {
        const float *vj = v + j * hd;
        for (int64_t h = 0; h < G; h++) {
            float *ah = acc + h * hd;
            const float p = sc[h * n + j] / sum[h];
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) ah[i] += p * vj[i];
        }
    }
    for (int64_t i = 0; i < G * hd; i++) out[i] = acc[i];
    free(sc);
    return 0;
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
    /* Work items: (row, KV head, part), a part being `group / parts` query heads of that KV head; whole groups read
     * each key once for all their heads, one head per item balances the threads when there are few groups. */
    const int64_t parts = B * nkv >= 4 * nt ? 1 : group, hp = group / parts;
    int rc = 0;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) collapse(3) if (B * nh > 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < nkv; g++)
            for (int64_t part = 0; part < parts; part++) {
                const int64_t h0 = g * group + part * hp;
                if (attend(q + b * ldq + h0 * hd, cos + b * hd, sin + b * hd, kc + (slots[b] * nkv + g) * L * hd,
                           vc + (slots[b] * nkv + g) * L * hd, pos[b] + 1, hp, hd, scale, out + (b * nh + h0) * hd))
                    rc = -3;
            }
    return rc;
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

/* h (B, I) = silu(g) * u for gu (B, 2 I) = [g | u] per row: g / (1 + exp(-g)) * u (torch reference: F.silu(g) * u),
 * 8 at a time with exp8, the last I % 8 with glibc's expf; split over the threads when large. */
void swiglu(const float *gu, int64_t B, int64_t I, float *h, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2) if (B * I >= 8192)
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < (I + 511) / 512; c++) {
            const float *g = gu + b * 2 * I, *u = g + I;
            float *o = h + b * I;
            const int64_t end = (c + 1) * 512 < I ? (c + 1) * 512 : I;
            int64_t i = c * 512;
            for (; i + 8 <= end; i += 8) {
                const __m256 gv = _mm256_loadu_ps(g + i);
                const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
                _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
            }
            for (; i < end; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
}

/* --- one decoder layer of a decode step in one call ------------------------------------------------------------
 * The eager path (engine/model.py's Block with packed projections) does RMSNorm, the fused QKV call, bias, adapters,
 * attention, o_proj, residual, RMSNorm, gate|up, SiLU * up, down_proj, residual as ~40 Python-level calls per layer,
 * which at batch 1 cost more than the arithmetic of a small model. decode_layer runs the same sequence of this
 * library's kernels from one call; engine/cpu/decode_step.py builds the DecodeLayer once per model, and
 * engine/cpu/modules.py's set_decode_kernel(model, False) keeps the eager path, which tests/test_quant.py compares it
 * with. */
/* The packed projections of one layer through qmatmul: the ISA variant chosen at load, as every other call. */
static int proj(const QWeight *p, int n, const int8_t *qx, const float *dx, const float *sx, int64_t M, int64_t K,
                float *y, int64_t ldy, int nt) {
    int rc = 0;
    for (int i = 0; i < n; y += p[i].N, i++)
        rc |= qmatmul(qx, dx, sx, M, K, p[i].w, p[i].scale, p[i].sd, (int)p[i].senc, p[i].wmin, p[i].md, (int)p[i].menc,
                      (int)p[i].kind, (int)p[i].G, p[i].N, y, ldy, nt);
    return rc;
}

static int lora(const LoraW *l, const float *x, int64_t ldx, float *y, int64_t ldy, int64_t T, int64_t in, int64_t out,
                const int64_t *ids, int nt) {
    return ids && l->A ? lora_apply(x, ldx, y, ldy, T, in, out, l->A, l->B, l->scales, l->R, ids, nt) : 0;
}

/* x (B, dim) fp32 is updated in place: x += attn(norm1(x)); x += mlp(norm2(x)). ids (B,) adapter per row or NULL;
 * kc / vc this layer's cache (n_slots, nkv, L, hd). 0 on success. */
int decode_layer(const DecodeLayer *ly, float *x, int64_t B, const float *cos, const float *sin, float *kc, float *vc,
                 int64_t L, const int64_t *slots, const int64_t *pos, const int64_t *ids, int nt) {
    const int64_t D = ly->dim, nq = ly->nh * ly->hd, nk = ly->nkv * ly->hd, NQKV = nq + 2 * nk, I = ly->inter;
    const int64_t KM = D > I ? (D > nq ? D : nq) : (I > nq ? I : nq);
    float *buf = (float *)malloc(sizeof(float) * (size_t)(B * (D + NQKV + nq + D + 2 * I + I + 2 * (KM / 32))));
    int8_t *qx = (int8_t *)malloc((size_t)(B * KM));
    if (!buf || !qx) { free(buf); free(qx); return -3; }
    float *xn = buf, *qkv = xn + B * D, *att = qkv + B * NQKV, *ob = att + B * nq, *gu = ob + B * D, *h = gu + B * 2 * I;
    float *dx = h + B * I, *sx = dx + B * (KM / 32);
    int rc = 0;
    const float eps = (float)ly->eps;

    rmsnorm(x, ly->norm1, B, D, eps, xn);
    quantize_x(xn, B, D, qx, dx, sx, nt);
    rc |= proj(ly->qkv, (int)ly->n_qkv, qx, dx, sx, B, D, qkv, NQKV, nt);
    for (int64_t b = 0; b < B; b++) {
        float *r = qkv + b * NQKV;
        if (ly->bq) for (int64_t i = 0; i < nq; i++) r[i] += ly->bq[i];
        if (ly->bk) for (int64_t i = 0; i < nk; i++) r[nq + i] += ly->bk[i];
        if (ly->bv) for (int64_t i = 0; i < nk; i++) r[nq + nk + i] += ly->bv[i];
    }
    rc |= lora(&ly->lq, xn, D, qkv, NQKV, B, D, nq, ids, nt);
    rc |= lora(&ly->lk, xn, D, qkv + nq, NQKV, B, D, nk, ids, nt);
    rc |= lora(&ly->lv, xn, D, qkv + nq + nk, NQKV, B, D, nk, ids, nt);
    rc |= decode_attention(qkv, NQKV, qkv + nq, NQKV, qkv + nq + nk, NQKV, cos, sin, kc, vc, L, slots, pos, B, ly->nh,
                           ly->nkv, ly->hd, att, nt);
    quantize_x(att, B, nq, qx, dx, sx, nt);
    rc |= proj(&ly->o, 1, qx, dx, sx, B, nq, ob, D, nt);
    rc |= lora(&ly->lo, att, nq, ob, D, B, nq, D, ids, nt);
    for (int64_t i = 0; i < B * D; i++) x[i] += ob[i];

    rmsnorm(x, ly->norm2, B, D, eps, xn);
    quantize_x(xn, B, D, qx, dx, sx, nt);
    rc |= proj(ly->gu, (int)ly->n_gu, qx, dx, sx, B, D, gu, 2 * I, nt);
    rc |= lora(&ly->lg, xn, D, gu, 2 * I, B, D, I, ids, nt);
    rc |= lora(&ly->lu, xn, D, gu + I, 2 * I, B, D, I, ids, nt);
    swiglu(gu, B, I, h, nt);
    quantize_x(h, B, I, qx, dx, sx, nt);
    rc |= proj(&ly->down, 1, qx, dx, sx, B, I, ob, D, nt);
    rc |= lora(&ly->ld, h, I, ob, D, B, I, D, ids, nt);
    for (int64_t i = 0; i < B * D; i++) x[i] += ob[i];
    free(buf);
    free(qx);
    return rc;
}

/* --- the interface check: engine/cpu/library.py compares these with its ctypes mirror at load ------------------ */
int mcl_abi_version(void) { return MCL_CPU_ABI; }

/* Entry i of the struct layout table: each field's offset ("Struct.field"), then each struct's size ("Struct") as
 * the value; *name, and *size the bytes of the field or struct; -1 past the end. */
int64_t mcl_layout(int64_t i, const char **name, int64_t *size) {
#define MCL_FIELD(S, f) {#S "." #f, offsetof(S, f), sizeof(((S *)0)->f)},
    static const struct { const char *name; size_t value, size; } T[] = {
        MCL_FIELDS(MCL_FIELD)
        {"QWeight", sizeof(QWeight), sizeof(QWeight)}, {"LoraW", sizeof(LoraW), sizeof(LoraW)},
        {"DecodeLayer", sizeof(DecodeLayer), sizeof(DecodeLayer)},
    };
#undef MCL_FIELD
    if (i < 0 || i >= (int64_t)(sizeof T / sizeof T[0])) return -1;
    *name = T[i].name;
    *size = (int64_t)T[i].size;
    return (int64_t)T[i].value;
}
