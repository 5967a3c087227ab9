/* The one definition of the CPU library's interface: every function it exports, the structs it reads, and their
 * version. Every C file includes it (the ISA variants through engine/cpu/qblocks.h); engine/cpu/library.py mirrors it in
 * ctypes (argtypes, ctypes.Structure) and at load compares the library's mcl_abi_version() and mcl_layout() table
 * with its mirror, refusing the library on any difference. Changing a prototype or a struct: change the mirror too
 * and bump MCL_CPU_ABI (tests/test_cpu_library.py also checks every prototype here against the mirror's argtypes).
 */
#ifndef MCL_CPU_KERNELS_H
#define MCL_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define MCL_CPU_ABI 2

typedef struct {                 /* one packed weight: engine.cpu.kernels.weight_args */
    const uint8_t *w;
    const void *scale;
    const float *sd;
    const void *wmin;
    const float *md;
    int64_t senc, menc, kind, G, N;
} QWeight;

typedef struct {                 /* one projection's stacked adapters; A == NULL: none */
    const float *A, *B, *scales;
    int64_t R;
} LoraW;

typedef struct {                 /* one decoder layer for decode_layer: engine/cpu/decode_step.py fills it */
    const float *norm1, *norm2, *bq, *bk, *bv;      /* biases may be NULL */
    double eps;
    QWeight qkv[3], o, gu[2], down;                 /* qkv: 1 fused or 3 parts; gu: 1 fused or 2 */
    int64_t n_qkv, n_gu;
    LoraW lq, lk, lv, lo, lg, lu, ld;
    int64_t dim, nh, nkv, hd, inter;
} DecodeLayer;

/* Every field of the structs above, in order (mcl_layout reports each one's offset and size, and each struct's). */
#define MCL_FIELDS(X)                                                                                              \
    X(QWeight, w) X(QWeight, scale) X(QWeight, sd) X(QWeight, wmin) X(QWeight, md) X(QWeight, senc)                \
    X(QWeight, menc) X(QWeight, kind) X(QWeight, G) X(QWeight, N)                                                  \
    X(LoraW, A) X(LoraW, B) X(LoraW, scales) X(LoraW, R)                                                           \
    X(DecodeLayer, norm1) X(DecodeLayer, norm2) X(DecodeLayer, bq) X(DecodeLayer, bk) X(DecodeLayer, bv)           \
    X(DecodeLayer, eps) X(DecodeLayer, qkv) X(DecodeLayer, o) X(DecodeLayer, gu) X(DecodeLayer, down)              \
    X(DecodeLayer, n_qkv) X(DecodeLayer, n_gu) X(DecodeLayer, lq) X(DecodeLayer, lk) X(DecodeLayer, lv)            \
    X(DecodeLayer, lo) X(DecodeLayer, lg) X(DecodeLayer, lu) X(DecodeLayer, ld) X(DecodeLayer, dim)                \
    X(DecodeLayer, nh) X(DecodeLayer, nkv) X(DecodeLayer, hd) X(DecodeLayer, inter)

/* --- engine/cpu/qmatmul.c: block-quantised matmul ----------------------------------------------------------------- */
void quantize_x(const float *x, int64_t M, int64_t K, int8_t *qx, float *dx, float *sx, int nt);
int qmatmul(const int8_t *qx, const float *dx, const float *sx, int64_t M, int64_t K,
            const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md, int menc,
            int kind, int G, int64_t N, float *y, int64_t ldy, int nt);
int mcl_isa(int i, const char **name);          /* variant i: its name; 1 built, 0 not, -1 past the end */
int mcl_set_isa(int i);                         /* qmatmul runs variant i from now on; -1 when it is not built */
/* qmatmul's ISA variants (engine/cpu/qblocks.h's kernels; engine/cpu/qmatmul.c, engine/cpu/qmatmul_<isa>.c), in
 * mcl_isa's order */
__typeof__(qmatmul) qmatmul_avx2, qmatmul_avxvnni, qmatmul_avx512vnni;
int dequant(const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md, int menc,
            int kind, int G, int64_t K, const int64_t *rows, int64_t row0, int64_t nrows, float *out, int nt);
int dequant_bf16(const uint8_t *w, const void *scale, const float *sd, int senc, const void *wmin, const float *md,
                 int menc, int kind, int G, int64_t K, const int64_t *rows, int64_t row0, int64_t nrows, uint16_t *out,
                 int nt);

/* --- engine/cpu/cpu_ops.c: the rest of a decode step -------------------------------------------------------------- */
int decode_attention(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t L,
                     const int64_t *slots, const int64_t *pos, int64_t B, int64_t nh, int64_t nkv, int64_t hd,
                     float *out, int nt);
void rmsnorm(const float *x, const float *w, int64_t R, int64_t D, float eps, float *out);
void swiglu(const float *gu, int64_t B, int64_t I, float *h, int nt);
int lora_apply(const float *x, int64_t ldx, float *y, int64_t ldy, int64_t T, int64_t in, int64_t out,
               const float *A, const float *B, const float *scales, int64_t R, const int64_t *ids, int nt);
int decode_layer(const DecodeLayer *ly, float *x, int64_t B, const float *cos, const float *sin, float *kc, float *vc,
                 int64_t L, const int64_t *slots, const int64_t *pos, const int64_t *ids, int nt);

/* --- engine/cpu/cpu_ops.c: the interface check -------------------------------------------------------------------- */
int mcl_abi_version(void);
int64_t mcl_layout(int64_t i, const char **name, int64_t *size);

#endif
