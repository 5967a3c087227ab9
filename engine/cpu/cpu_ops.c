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
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < I; i++) {
            const float g = gu[b * 2 * I + i];
            h[b * I + i] = g / (1.0f + expf(-g)) * gu[b * 2 * I + I + i];
        }
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
