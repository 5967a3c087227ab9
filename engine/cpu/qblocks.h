/* The packed block layouts and the integer kernels of y (M, N) = x (M, K) @ W^T, as inline code that each ISA variant
 * of the kernels includes after defining its integer primitives (below); engine/cpu/qmatmul.c has the AVX2 variant (the
 * reference), the dispatch between the variants and the code without variants (quantize_x, dequant).
 *
 * A row of W is K/32 blocks of 32 weights, BB bytes each, w = scale[g] * q + min[g] per group g of G (32 or 16):
 *   kind 8: BB 32, q int8.
 *   kind 4: BB 16, q = nibble in 0..15: byte j holds element j (low nibble) and element j + 16 (high) (GGUF's order).
 *   kind 5: BB 20, 16 bytes of nibbles as kind 4, then a 32-bit word of high bits; q = (nibble | hi << 4) - 16.
 *           The kernel multiplies the unsigned nibble | hi << 4 (no sign trick) and subtracts 16 * scale * sum(qx).
 *           Element e's high bit is bit 8 * (e % 4) + e / 4 of the word (one variable shift unpacks it).
 *   kind 6: BB 24, 16 bytes of nibbles, then a 64-bit word of 2-bit high parts; q = (nibble | hi2 << 4) - 32.
 *           Element e's two bits are bits 8 * (e % 8) + 2 * (e / 8) .. +1.
 * Scales (and optional mins, same encoding) per group, in one of two encodings:
 *   enc 1: fp16 per group (GGUF's own d / m for Q4_0, Q4_1, Q5_0, Q8_0).
 *   enc 2: int8 per group times an fp32 per 256 weights (K-quants: Q4_K's 6-bit sub-scales, Q6_K's int8 ones).
 * Both reproduce the file's scales exactly in fp32.
 *
 * Activations are quantised as llama.cpp does (its Q8_0 "vec_dot_type"): per 32 inputs x ~= dx * qx, qx int8,
 * dx = amax / 127; sx holds dx * sum(qx) per 32 inputs for the min terms. Block dot products are exact in integers,
 * scaled and summed in fp32 (the torch reference of the arithmetic: engine.cpu.kernels.qmatmul_ref). Signed weights
 * (kinds 8, 6 in qmm_rows / qmm_row1) go as |q| times qx with q's sign, unsigned bytes times signed ones. The nibble
 * kinds 4, 5, 6 take qmm_pair1 (one row of x) and qmm_pairs (2-8 rows): two blocks unpacked at once against the
 * activations reordered to match (pair_order), weights unsigned, one float step per pair of blocks; same integers,
 * another float summation order. qmm_rows / qmm_row1 serve kind 8 and each kernel's last nb % 8 blocks.
 *
 * What a variant defines before including this file (one 32-byte block fills one __m256i, as in llama.cpp's x86
 * kernels; engine/cpu/qmatmul.c's are the reference forms):
 *   __m256i dot_u8s8(u, s)             int32 lane j = sum_{i < 4} u[4j + i] * s[4j + i], u unsigned bytes (<= 128),
 *                                      s signed bytes (|s| <= 127)
 *   __m256i dot2_u8s8(u0, s0, u1, s1)  dot_u8s8(u0, s0) + dot_u8s8(u1, s1), for u0, u1 <= 31
 *   __m256i dot2_s16(a0, b0, a1, b1)   int32 lane j = sum over both pairs of a[2j] b[2j] + a[2j + 1] b[2j + 1] (int16)
 *   QMATMUL_NAME                       the name of the one function this file defines (qmatmul_<isa>)
 * Within those bounds every form is exact, so all variants compute the same integers and, the float code being this
 * file, the same outputs.
 */
#ifndef QMATMUL_NAME
#error "define the integer primitives and QMATMUL_NAME before including qblocks.h (see its header)"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "cpu_kernels.h"

/* --- layouts: unpacking, scales ---------------------------------------------------------------------------------- */
static inline int block_bytes(int kind) { return kind == 8 ? 32 : kind == 4 ? 16 : kind == 5 ? 20 : 24; }

#define UNSIGNED(kind) ((kind) == 4 || (kind) == 5)    /* unpacked as unsigned bytes: kind 4 0..15, kind 5 0..31 */

/* The 32 weights of one block as int8 lanes (byte e = element e); kinds 4 and 5 unsigned (kind 5 without its -16). */
static inline __m256i unpack_block(const uint8_t *p, int kind) {
    if (kind == 8) return _mm256_loadu_si256((const __m256i *)p);
    const __m128i packed = _mm_loadu_si128((const __m128i *)p), lo4 = _mm_set1_epi8(0x0F);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), lo4), _mm_and_si128(packed, lo4));
    if (kind == 5) {
        uint32_t hw;
        memcpy(&hw, p + 16, 4);
        __m256i h = _mm256_srlv_epi32(_mm256_set1_epi32((int)hw), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        h = _mm256_and_si256(_mm256_slli_epi16(h, 4), _mm256_set1_epi8(0x10));
        q = _mm256_or_si256(q, h);
    } else if (kind == 6) {
        uint64_t hw;
        memcpy(&hw, p + 16, 8);
        __m256i h = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)hw), _mm256_setr_epi64x(0, 2, 4, 6));
        h = _mm256_and_si256(_mm256_slli_epi16(h, 4), _mm256_set1_epi8(0x30));
        q = _mm256_sub_epi8(_mm256_or_si256(q, h), _mm256_set1_epi8(32));
    }
    return q;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Scale of group g in block b of one row: enc 1 fp16 s[g]; enc 2 int8 s[g] times the fp32 sd of its 256 weights. */
static inline __attribute__((always_inline)) float group_scale(const void *s, const float *sd, int enc, int64_t g, int64_t b) {
    return enc == 1 ? _cvtsh_ss(((const uint16_t *)s)[g]) : sd[b >> 3] * (float)((const int8_t *)s)[g];
}

/* Scales (or mins) of 8 consecutive groups g0 .. g0 + 7 in fp32 (enc 2: all in the 256 weights of sd[super]). */
static inline __attribute__((always_inline)) __m256 scales8(const void *s, const float *sd, int enc, int64_t g0, int64_t super) {
    if (enc == 1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + g0)));
    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)s + g0))));
    return _mm256_mul_ps(c, _mm256_set1_ps(sd[super]));
}

/* rmv + the per-block float terms of blocks b .. b + 7 (G 32 scales), one vector FMA each: the mins, min * dx *
 * sum(qx) = min * sx; kind 5's -16 offset, -16 * scale * sx. */
static inline __attribute__((always_inline)) __m256 offset_terms8(
        __m256 rmv, const void *scale, const float *sd, const int senc, const void *wmin, const float *md,
        const int menc, const int kind, const float *sx, int64_t b) {
    if (menc) rmv = _mm256_fmadd_ps(scales8(wmin, md, menc, b, b >> 3), _mm256_loadu_ps(sx + b), rmv);
    if (kind == 5)
        rmv = _mm256_fmadd_ps(_mm256_mul_ps(scales8(scale, sd, senc, b, b >> 3), _mm256_set1_ps(-16.f)),
                              _mm256_loadu_ps(sx + b), rmv);
    return rmv;
}

/* The low 16 weights (elements 0-15) of blocks b and b + 1 of a nibble layout (kinds 4, 5, 6) as one vector ("lo":
 * bytes 0-15 block b, 16-31 block b + 1), their high 16 as another ("hi"), all unsigned (kind 5 without its -16,
 * kind 6 without its -32). GGUF's nibble order makes this the cheap split: byte j of a block holds elements j and
 * j + 16, so two blocks' 32 bytes give lo with one AND and hi with one shift and AND. */
static inline __attribute__((always_inline)) void unpack_pair(const uint8_t *p, const int kind, __m256i *lo, __m256i *hi) {
    const int BB = block_bytes(kind);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v = kind == 4 ? _mm256_loadu_si256((const __m256i *)p)
                                : _mm256_loadu2_m128i((const __m128i *)(p + BB), (const __m128i *)p);
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (kind == 5) {                       /* element e's high bit: bit 8 * (e % 4) + e / 4 of the block's word */
        /* dwords 2 and 7 of the 32 bytes from p + 8 are block b's word h0 and b + 1's h1 (the pair is 40 bytes):
         * one load and one permute give h0 in lo's and hi's bytes 0-15, h1 in 16-31. Byte k of dword i needs bit
         * 8 k + i (lo: element 4 i + k; hi: 16 + 4 i + k, bit 8 k + 4 + i) at bit 4. */
        const __m256i h = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(p + 8)),
                                                      _mm256_setr_epi32(2, 2, 2, 2, 7, 7, 7, 7));
        const __m256i m = _mm256_set1_epi8(0x10);
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_sllv_epi32(h, _mm256_setr_epi32(4, 3, 2, 1, 4, 3, 2, 1)), m));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3)), m));
    } else if (kind == 6) {                /* element e's two bits: bits 8 * (e % 8) + 2 * (e / 8) .. +1 */
        /* the 32 bytes from p + 16 are block b's word, 16 nibble bytes of b + 1, b + 1's word: one load and one
         * permute give (h0, h0, h1, h1), the qwords of lo's and hi's bytes 0-7, 8-15, 16-23, 24-31. Byte k of qword
         * j needs bits 2j .. 2j + 1 of byte k (lo: elements k + 8j; hi: k + 8j + 16, bits 4 + 2j ..) at bits 4-5. */
        const __m256i h = _mm256_permute4x64_epi64(_mm256_loadu_si256((const __m256i *)(p + 16)), 0xF0);
        const __m256i m = _mm256_set1_epi8(0x30);
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 2, 4, 2)), m));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 2, 0, 2)), m));
    }
}

/* The layouts engine/cpu/packed.py writes, as (kind, G, scale encoding, min encoding or 0): Q8_0 and requantised weights
 * (8, 32, 1, 0), Q4_0 / Q4_1 (4, 32, 1, 1), Q4_K (4, 32, 2, 2), Q5_0 (5, 32, 1, 0), Q6_K (6, 16, 2, 0). */
static int layout_id(int kind, int G, int senc, int menc) {
    if (kind == 8 && G == 32 && senc == 1 && !menc) return 0;
    if (kind == 4 && G == 32 && senc == 1 && menc == 1) return 1;
    if (kind == 4 && G == 32 && senc == 2 && menc == 2) return 2;
    if (kind == 5 && G == 32 && senc == 1 && !menc) return 3;
    if (kind == 6 && G == 16 && senc == 2 && !menc) return 4;
    return -1;
}

#define LAYOUT_SWITCH(CALL)                                                                                        \
    switch (layout) {                                                                                              \
        case 0: CALL(8, 32, 1, 0); break;                                                                          \
        case 1: CALL(4, 32, 1, 1); break;                                                                          \
        case 2: CALL(4, 32, 2, 2); break;                                                                          \
        case 3: CALL(5, 32, 1, 0); break;                                                                          \
        case 4: CALL(6, 16, 2, 0); break;                                                                          \
    }


/* --- the integer kernels (the variant's primitives) --------------------------------------------------------------- */
/* One block's contribution to one row of x: acc += scale * dx * (q . qx) (per 16 for G 16); rm += min * sx, and for
 * kind 5 rm -= 16 * scale * sx (its offset). Products are int32 lanes: lanes 0-3 elements 0-15, lanes 4-7 16-31. */
static inline __attribute__((always_inline)) void block_step(
        __m256i wq, __m256i wa, float s0, float s1, float mb, const int8_t *xq, float d, float sxb,
        const int kind, const int G, const int menc, __m256 *acc, float *rm) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    if (!UNSIGNED(kind)) xv = _mm256_sign_epi8(xv, wq);                             /* signed: |w| . sign(x, w) */
    const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wa, xv));
    const __m256 sv = G == 32 ? _mm256_set1_ps(s0 * d) : _mm256_set_m128(_mm_set1_ps(s1 * d), _mm_set1_ps(s0 * d));
    *acc = _mm256_fmadd_ps(sv, p, *acc);
    if (menc) *rm += mb * sxb;
    if (kind == 5) *rm += -16.f * s0 * sxb;
}

/* The weights and scales of block b of one row. */
#define BLOCK_PREP(b)                                                                                              \
    const __m256i wq = unpack_block(wr + (b) * BB, kind), wa = UNSIGNED(kind) ? wq : _mm256_sign_epi8(wq, wq);    \
    const float s0 = group_scale(scale, sd, senc, G == 32 ? (b) : 2 * (b), b);                                    \
    const float s1 = G == 32 ? 0.f : group_scale(scale, sd, senc, 2 * (b) + 1, b);                                \
    const float mb = menc ? group_scale(wmin, md, menc, b, b) : 0.f;

/* The multi-row kernels' end: blocks b .. nb - 1 one at a time (block_step) for each of the MM rows, then
 * y[i * ldy] = the row's accumulator and scalar terms. */
static inline __attribute__((always_inline)) void rows_finish(
        const int8_t *qx, const float *dx, const float *sx, const int MM, int64_t K, int64_t b, const uint8_t *wr,
        const void *scale, const float *sd, const int senc, const void *wmin, const float *md, const int menc,
        const int kind, const int G, __m256 *acc, float *rm, float *y, int64_t ldy) {
    const int64_t nb = K / 32, BB = block_bytes(kind);
    for (; b < nb; b++) {
        BLOCK_PREP(b)
#pragma GCC unroll 8
        for (int i = 0; i < MM; i++)
            block_step(wq, wa, s0, s1, mb, qx + i * K + b * 32, dx[i * nb + b], sx[i * nb + b], kind, G, menc, &acc[i], &rm[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MM; i++) y[i * ldy] = hsum(acc[i]) + rm[i];
}

/* A multi-row kernel call with its row count MM a constant in each branch (2 <= mm <= 8): CALL(MM) is the call. */
#define ROWS_SWITCH(mm, CALL)                                                                                      \
    switch (mm) {                                                                                                  \
        case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; case 5: CALL(5); break;           \
        case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break;                                  \
    }

/* One row of W against MM rows of x (2 <= MM <= 8, a constant at each call site: qmm_rows_n's switch, so that the
 * per-row accumulators and scale vectors stay in registers). Blocks go 8 at a time as in qmm_row1: the weight row's
 * 8 (G 16: 16) group scales are one vector, times each row's dx as one vector per row; the mins and kind 5's offset
 * are one vector FMA per row into that row's accumulator; each block is unpacked once for all MM rows and its scale
 * is a lane of the row's vector. The last nb % 8 blocks go one at a time (block_step). */
static inline __attribute__((always_inline)) void qmm_rows(
        const int8_t *qx, const float *dx, const float *sx, const int MM, int64_t K, const uint8_t *wr,
        const void *scale, const float *sd, const int senc, const void *wmin, const float *md, const int menc,
        const int kind, const int G, float *y, int64_t ldy) {
    const int64_t nb = K / 32, BB = block_bytes(kind);
    __m256 acc[8];
    float rm[8];
#pragma GCC unroll 8
    for (int i = 0; i < MM; i++) acc[i] = _mm256_setzero_ps(), rm[i] = 0.f;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 sa[8], sb[8];                                 /* G 32: sa lane j = block b + j; G 16 as qmm_row1 */
        const __m256 wa8 = scales8(scale, sd, senc, G == 32 ? b : 2 * b, b >> 3);
        const __m256 wb8 = G == 32 ? _mm256_setzero_ps() : scales8(scale, sd, senc, 2 * b + 8, b >> 3);
#pragma GCC unroll 8
        for (int i = 0; i < MM; i++) {
            const __m256 xd8 = _mm256_loadu_ps(dx + i * nb + b);
            if (G == 32) {
                sa[i] = _mm256_mul_ps(wa8, xd8);
            } else {
                sa[i] = _mm256_mul_ps(wa8, _mm256_permutevar8x32_ps(xd8, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
                sb[i] = _mm256_mul_ps(wb8, _mm256_permutevar8x32_ps(xd8, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
            }
            acc[i] = offset_terms8(acc[i], scale, sd, senc, wmin, md, menc, kind, sx + i * nb, b);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i wq = unpack_block(wr + (b + j) * BB, kind), wa = UNSIGNED(kind) ? wq : _mm256_sign_epi8(wq, wq);
            const __m256i lane = G == 32 ? _mm256_set1_epi32(j)
                                         : _mm256_setr_epi32(2 * (j & 3), 2 * (j & 3), 2 * (j & 3), 2 * (j & 3),
                                                             2 * (j & 3) + 1, 2 * (j & 3) + 1, 2 * (j & 3) + 1, 2 * (j & 3) + 1);
#pragma GCC unroll 8
            for (int i = 0; i < MM; i++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + i * K + (b + j) * 32));
                if (!UNSIGNED(kind)) xv = _mm256_sign_epi8(xv, wq);
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wa, xv));
                const __m256 sv = _mm256_permutevar8x32_ps(G == 32 || j < 4 ? sa[i] : sb[i], lane);
                acc[i] = _mm256_fmadd_ps(sv, p, acc[i]);
            }
        }
    }
    rows_finish(qx, dx, sx, MM, K, b, wr, scale, sd, senc, wmin, md, menc, kind, G, acc, rm, y, ldy);
}

/* qmm_rows with MM a constant in each branch (2 <= mm <= 8). */
static inline __attribute__((always_inline)) void qmm_rows_n(
        const int8_t *qx, const float *dx, const float *sx, const int mm, int64_t K, const uint8_t *wr,
        const void *scale, const float *sd, const int senc, const void *wmin, const float *md, const int menc,
        const int kind, const int G, float *y, int64_t ldy) {
#define QMM_ROWS(MM) qmm_rows(qx, dx, sx, MM, K, wr, scale, sd, senc, wmin, md, menc, kind, G, y, ldy)
    ROWS_SWITCH(mm, QMM_ROWS)
#undef QMM_ROWS
}

/* One row of W against one row of x (decode). Blocks go 8 at a time: their scales (times dx) and mins are computed
 * as one vector each, and each block's scale is a lane broadcast; two accumulators; a scalar tail. */
static inline __attribute__((always_inline)) float qmm_row1(
        const int8_t *qx, const float *dx, const float *sx, int64_t K, const uint8_t *wr, const void *scale,
        const float *sd, const int senc, const void *wmin, const float *md, const int menc, const int kind, const int G) {
    const int64_t nb = K / 32, BB = block_bytes(kind);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, rmv = _mm256_setzero_ps();
    float r = 0.f;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const __m256 xd8 = _mm256_loadu_ps(dx + b);
        __m256 sa, sb = _mm256_setzero_ps();                 /* G 32: sa lane j = block b + j; G 16: see below */
        if (G == 32) {
            sa = _mm256_mul_ps(scales8(scale, sd, senc, b, b >> 3), xd8);
        } else {                                             /* 16 groups: sa blocks b..b+3, sb blocks b+4..b+7 */
            sa = _mm256_mul_ps(scales8(scale, sd, senc, 2 * b, b >> 3),
                               _mm256_permutevar8x32_ps(xd8, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
            sb = _mm256_mul_ps(scales8(scale, sd, senc, 2 * b + 8, b >> 3),
                               _mm256_permutevar8x32_ps(xd8, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
        }
        rmv = offset_terms8(rmv, scale, sd, senc, wmin, md, menc, kind, sx, b);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i wq = unpack_block(wr + (b + j) * BB, kind), wa = UNSIGNED(kind) ? wq : _mm256_sign_epi8(wq, wq);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(qx + (b + j) * 32));
            if (!UNSIGNED(kind)) xv = _mm256_sign_epi8(xv, wq);
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wa, xv));
            __m256 sv;
            if (G == 32) sv = _mm256_permutevar8x32_ps(sa, _mm256_set1_epi32(j));
            else {
                const int i = 2 * (j & 3);
                sv = _mm256_permutevar8x32_ps(j < 4 ? sa : sb, _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1));
            }
            acc[j & 1] = _mm256_fmadd_ps(sv, p, acc[j & 1]);
        }
    }
    for (; b < nb; b++) {
        BLOCK_PREP(b)
        block_step(wq, wa, s0, s1, mb, qx + b * 32, dx[b], sx[b], kind, G, menc, &acc[b & 1], &r);
    }
    return hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(rmv) + r;
}

/* G 16 (kind 6): the 16 int16 group scales of 8 blocks as c16[0] (groups 0-7, both 128-bit halves) and c16[1]
 * (8-15); g16_scales(c16, p, hi) picks pair p's for its lo (hi = 0: groups 4p + {0, 2} of the 8 blocks' relative
 * groups, one per 128-bit half) or its hi vector (4p + {1, 3}), each repeated over the half's 8 int16 lanes. */
static inline __attribute__((always_inline)) __m256i g16_scales(const __m256i c16[2], const int p, const int hi) {
    const char a = (char)(8 * (p & 1) + 2 * hi), b = (char)(a + 4);   /* byte offsets of the two int16 scales */
    const __m256i sel = _mm256_setr_epi8(a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1,
                                         b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1);
    return _mm256_shuffle_epi8(c16[p >> 1], sel);
}

/* The activations of one row in unpack_pair's order, for the decode kernel below: per 64 inputs (blocks b, b + 1),
 * elements 0-15 of b, 0-15 of b + 1, 16-31 of b, 16-31 of b + 1 (an odd last block stays as it is). sx16[g] =
 * dx * sum(qx) over inputs 16 g .. 16 g + 15 (kind 6's -32 offset). */
static void pair_order(const int8_t *qx, const float *dx, int64_t K, int8_t *qxp, float *sx16) {
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        memcpy(qxp + k, qx + k, 16), memcpy(qxp + k + 16, qx + k + 32, 16);
        memcpy(qxp + k + 32, qx + k + 16, 16), memcpy(qxp + k + 48, qx + k + 48, 16);
    }
    memcpy(qxp + k, qx + k, (size_t)(K - k));
    if (sx16)
        for (int64_t g = 0; g < K / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += qx[g * 16 + j];
            sx16[g] = dx[g >> 1] * (float)s;
        }
}

/* One row of W against one row of x (decode) for the nibble layouts: as qmm_row1, but blocks are unpacked in pairs
 * (unpack_pair) against qxp (pair_order), all weights unsigned. G 32: the lo and hi products of a pair (dot2_u8s8) give
 * one int32 per 4 lanes of each block, scaled by scale * dx. G 16 (kind 6): lo and hi hold different groups, so
 * their int16 pair sums (maddubs: at most 2 * 63 * 127 = 16002) are multiplied by their int8 group scales in
 * integers (dot2_s16: at most 2 * 16002 * 128 per lane), then scaled by the 256 weights' fp32 d times dx; the -32
 * offset is -32 * d * scale * sx16 per group, a vector FMA per 8 groups. The last nb % 8 blocks go as qmm_row1's
 * tail. */
static inline __attribute__((always_inline)) float qmm_pair1(
        const int8_t *qx, const int8_t *qxp, const float *dx, const float *sx, const float *sx16, int64_t K,
        const uint8_t *wr, const void *scale, const float *sd, const int senc, const void *wmin, const float *md,
        const int menc, const int kind, const int G) {
    const int64_t nb = K / 32, BB = block_bytes(kind);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, rmv = _mm256_setzero_ps();
    float r = 0.f;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const __m256 xd8 = _mm256_loadu_ps(dx + b);
        __m256 sa;                                           /* lane j: the float factor of block b + j */
        __m256i c16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        if (G == 32) {
            sa = _mm256_mul_ps(scales8(scale, sd, senc, b, b >> 3), xd8);
        } else {                                             /* the 16 group scales as int16: 0-7 (c16[0]), 8-15 */
            const int8_t *s8 = (const int8_t *)scale + 2 * b;
            const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)s8));
            c16[0] = _mm256_permute2x128_si256(c, c, 0x00), c16[1] = _mm256_permute2x128_si256(c, c, 0x11);
            const __m256 d = _mm256_set1_ps(sd[b >> 3]), off = _mm256_mul_ps(d, _mm256_set1_ps(-32.f));
            sa = _mm256_mul_ps(d, xd8);
            rmv = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)s8))), off),
                                  _mm256_loadu_ps(sx16 + 2 * b), rmv);
            rmv = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s8 + 8)))), off),
                                  _mm256_loadu_ps(sx16 + 2 * b + 8), rmv);
        }
        rmv = offset_terms8(rmv, scale, sd, senc, wmin, md, menc, kind, sx, b);
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            __m256i lo, hi;
            unpack_pair(wr + (b + 2 * p) * BB, kind, &lo, &hi);
            const int8_t *xp = qxp + (b + 2 * p) * 32;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xp);
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xp + 32));
            __m256i s32;
            if (G == 32) s32 = dot2_u8s8(lo, x0, hi, x1);
            else s32 = dot2_s16(_mm256_maddubs_epi16(lo, x0), g16_scales(c16, p, 0),
                                _mm256_maddubs_epi16(hi, x1), g16_scales(c16, p, 1));
            const __m256 sv = _mm256_permutevar8x32_ps(sa, _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p,
                                                                             2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1));
            acc[p & 1] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(s32), acc[p & 1]);
        }
    }
    for (; b < nb; b++) {
        BLOCK_PREP(b)
        block_step(wq, wa, s0, s1, mb, qx + b * 32, dx[b], sx[b], kind, G, menc, &acc[b & 1], &r);
    }
    return hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(rmv) + r;
}

/* MM rows of x (2 <= MM <= 8, a constant at each call site) against one row of W for the nibble layouts: qmm_pair1's
 * arithmetic (same integers, same float steps per row) with each block pair unpacked, and for G 16 its group scales
 * picked, once for all MM rows. Row i's activations: qx + i K, pair-ordered qxp + i K, dx / sx + i nb, sx16 + i K / 16;
 * y[i * ldy]. Against qmm_rows it takes one float step (convert, scale, FMA) per pair of blocks and row, not per
 * block. */
static inline __attribute__((always_inline)) void qmm_pairs(
        const int8_t *qx, const int8_t *qxp, const float *dx, const float *sx, const float *sx16, const int MM,
        int64_t K, const uint8_t *wr, const void *scale, const float *sd, const int senc, const void *wmin,
        const float *md, const int menc, const int kind, const int G, float *y, int64_t ldy) {
    const int64_t nb = K / 32, BB = block_bytes(kind);
    __m256 acc[8];
    float rm[8];
#pragma GCC unroll 8
    for (int i = 0; i < MM; i++) acc[i] = _mm256_setzero_ps(), rm[i] = 0.f;
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 sa[8];                                        /* row i, lane j: the float factor of block b + j */
        __m256i c16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        __m256 ws = _mm256_setzero_ps(), off0 = ws, off1 = ws;
        if (G == 32) {
            ws = scales8(scale, sd, senc, b, b >> 3);
        } else {
            const int8_t *s8 = (const int8_t *)scale + 2 * b;
            const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)s8));
            c16[0] = _mm256_permute2x128_si256(c, c, 0x00), c16[1] = _mm256_permute2x128_si256(c, c, 0x11);
            ws = _mm256_set1_ps(sd[b >> 3]);
            const __m256 off = _mm256_mul_ps(ws, _mm256_set1_ps(-32.f));
            off0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)s8))), off);
            off1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s8 + 8)))), off);
        }
#pragma GCC unroll 8
        for (int i = 0; i < MM; i++) {
            sa[i] = _mm256_mul_ps(ws, _mm256_loadu_ps(dx + i * nb + b));
            if (G == 16) {
                const float *s16 = sx16 + i * (K / 16) + 2 * b;
                acc[i] = _mm256_fmadd_ps(off0, _mm256_loadu_ps(s16), acc[i]);
                acc[i] = _mm256_fmadd_ps(off1, _mm256_loadu_ps(s16 + 8), acc[i]);
            }
            acc[i] = offset_terms8(acc[i], scale, sd, senc, wmin, md, menc, kind, sx + i * nb, b);
        }
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            __m256i lo, hi, slo = _mm256_setzero_si256(), shi = slo;
            unpack_pair(wr + (b + 2 * p) * BB, kind, &lo, &hi);
            if (G == 16) slo = g16_scales(c16, p, 0), shi = g16_scales(c16, p, 1);
            const __m256i lane = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
#pragma GCC unroll 8
            for (int i = 0; i < MM; i++) {
                const int8_t *xp = qxp + i * K + (b + 2 * p) * 32;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xp);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xp + 32));
                const __m256i s32 = G == 32 ? dot2_u8s8(lo, x0, hi, x1)
                                            : dot2_s16(_mm256_maddubs_epi16(lo, x0), slo, _mm256_maddubs_epi16(hi, x1), shi);
                acc[i] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sa[i], lane), _mm256_cvtepi32_ps(s32), acc[i]);
            }
        }
    }
    rows_finish(qx, dx, sx, MM, K, b, wr, scale, sd, senc, wmin, md, menc, kind, G, acc, rm, y, ldy);
}

/* qmm_pairs with MM a constant in each branch (2 <= mm <= 8). */
static inline __attribute__((always_inline)) void qmm_pairs_n(
        const int8_t *qx, const int8_t *qxp, const float *dx, const float *sx, const float *sx16, const int mm,
        int64_t K, const uint8_t *wr, const void *scale, const float *sd, const int senc, const void *wmin,
        const float *md, const int menc, const int kind, const int G, float *y, int64_t ldy) {
#define QMM_PAIRS(MM) qmm_pairs(qx, qxp, dx, sx, sx16, MM, K, wr, scale, sd, senc, wmin, md, menc, kind, G, y, ldy)
    ROWS_SWITCH(mm, QMM_PAIRS)
#undef QMM_PAIRS
}

/* Row n of W: its blocks, its scales (and sd), its mins (and md). */
#define ROW_POINTERS(n)                                                                                            \
    const int64_t nb = K / 32, ng = K / G, BB = block_bytes(kind), ssz = senc == 1 ? 2 : 1, msz = menc == 1 ? 2 : 1; \
    const uint8_t *wr = w + (n) * nb * BB;                                                                         \
    const void *sc = (const char *)scale + (n) * ng * ssz, *mn = menc ? (const char *)wmin + (n) * nb * msz : 0;   \
    const float *sdn = sd ? sd + (n) * (K / 256) : 0, *mdn = md ? md + (n) * (K / 256) : 0;                         \
    (void)nb;

/* Row n of W against the one row of x (decode); kind, G, senc, menc are constants at each call site (qmatmul's
 * switch, inside the parallel loop: OpenMP outlines the loop body, so a constant passed into it would no longer be
 * one). Decode and batches have separate parallel loops, so that the small decode loop is compiled on its own. */
static inline __attribute__((always_inline)) float qmm_one(
        const int8_t *qx, const int8_t *qxp, const float *sx16, const float *dx, const float *sx, int64_t K,
        const uint8_t *w, const void *scale, const float *sd, const void *wmin, const float *md, int64_t n,
        const int kind, const int G, const int senc, const int menc) {
    ROW_POINTERS(n)
    if (kind != 8 && qxp) return qmm_pair1(qx, qxp, dx, sx, sx16, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G);
    return qmm_row1(qx, dx, sx, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G);
}

/* Row n of W against rows 0 .. M - 1 of x (M >= 2), 8 rows at a time: the nibble layouts by qmm_pairs_n on the
 * pair-ordered rows qxp (sx16 for kind 6), the others by qmm_rows_n; a last single row as decode does. */
static inline __attribute__((always_inline)) void qmm_many(
        const int8_t *qx, const int8_t *qxp, const float *sx16, const float *dx, const float *sx, int64_t M, int64_t K,
        const uint8_t *w, const void *scale, const float *sd, const void *wmin, const float *md, int64_t n, float *y,
        int64_t ldy, const int kind, const int G, const int senc, const int menc) {
    ROW_POINTERS(n)
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int mm = M - m0 < 8 ? (int)(M - m0) : 8;
        const int8_t *q = qx + m0 * K, *qp = qxp ? qxp + m0 * K : 0;
        const float *d = dx + m0 * nb, *s = sx + m0 * nb, *s16 = sx16 ? sx16 + m0 * (K / 16) : 0;
        float *yo = y + m0 * ldy + n;
        if (kind != 8 && qp) {
            if (mm == 1) *yo = qmm_pair1(q, qp, d, s, s16, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G);
            else qmm_pairs_n(q, qp, d, s, s16, mm, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G, yo, ldy);
        } else if (mm == 1) {
            *yo = qmm_row1(q, d, s, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G);
        } else {
            qmm_rows_n(q, d, s, mm, K, wr, sc, sdn, senc, mn, mdn, menc, kind, G, yo, ldy);
        }
    }
}

/* y[m * ldy + n] = sum_k x[m, k] W[n, k] for the pre-quantised x (quantize_x); -1 for a layout it lacks. */
int QMATMUL_NAME(const int8_t *qx, const float *dx, const float *sx, int64_t M, int64_t K,
                 const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md,
                 int menc, int kind, int G, int64_t N, float *y, int64_t ldy, int nt) {
    const int layout = layout_id(kind, G, senc, wmin ? menc : 0);
    if (layout < 0 || K % 32 || (senc == 2 && K % 256) || (wmin && menc == 2 && K % 256)) return -1;
    int8_t *qxp = 0;                           /* nibble layouts: the rows pair-ordered for qmm_pair1 / qmm_pairs */
    float *sx16 = 0;
    const size_t xbytes = (size_t)(M * K);
    if (kind != 8 && (qxp = malloc(xbytes + (kind == 6 ? xbytes / 16 * sizeof(float) : 0) + 32))) {
        if (kind == 6) sx16 = (float *)(((uintptr_t)(qxp + xbytes) + 31) & ~(uintptr_t)31);
        for (int64_t m = 0; m < M; m++)
            pair_order(qx + m * K, dx + m * (K / 32), K, qxp + m * K, sx16 ? sx16 + m * (K / 16) : 0);
    }
#define QMM_ONE(k, g, se, me) y[n] = qmm_one(qx, qxp, sx16, dx, sx, K, w, scale, sd, wmin, md, n, k, g, se, me)
#define QMM_MANY(k, g, se, me) qmm_many(qx, qxp, sx16, dx, sx, M, K, w, scale, sd, wmin, md, n, y, ldy, k, g, se, me)
    if (M == 1) {
#pragma omp parallel for num_threads(nt) schedule(static) if (N * K > 32768)
        for (int64_t n = 0; n < N; n++) {
            LAYOUT_SWITCH(QMM_ONE)
        }
    } else {
#pragma omp parallel for num_threads(nt) schedule(static) if (N * K > 32768)
        for (int64_t n = 0; n < N; n++) {
            LAYOUT_SWITCH(QMM_MANY)
        }
    }
#undef QMM_ONE
#undef QMM_MANY
    free(qxp);
    return 0;
}
