#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

/* A span of Llama layers for decode tokens (or short chunks), in one call: the same kernels the
   eager layer calls (rms_norm, the q/k/v matmul, rope_qk, kv_write, paged decode attention, the
   o matmul, residual add, rms_norm, the gate/up matmul, silu_mul, the down matmul, residual add),
   in the same order on the same buffers, so the result has the same bits; what goes is the Python
   between them (about a dozen calls per layer, each with its tensor allocations and checks).

   The kernels come in as function pointers (fn, in the order of enum K below) from the libraries
   recursa already loaded, so nothing is compiled twice. layers [L, LAYER_WORDS] int64 per depth:
   attention-norm and MLP-norm weights, the depth's slot offset, then four projections (q/k/v, o,
   gate/up, down) of PROJ_WORDS each: kind, weight, scales (int kinds), output size, bits (int4 GEMV:
   its group size).
   x [M, D] (M tokens: one per request at decode, or a few per request: rows[t] is token t's request,
   NULL for one each) is updated in place (D % 16 == 0); cos/sin [M, hd]; lens [M]: positions each sees.
   Slots, two ways: table_index NULL: slots [M, smax] and new_slots [M] at cache layer 0, plus each
   depth's slot offset (a dense cache, every request at the same depth); else layer l reads the
   tables slots + table_index[l] * slot_stride ([M, smax]) and new_slots + table_index[l] * new_stride
   ([M]) as they are (recursion-wise caching's per-layer tables).
   capture [M, D] (NULL: none) receives x after layer capture_after of the span (a router reads the
   hidden state at a depth inside the span: Mixture-of-Recursions' shared-block entry).
   Returns 0, -1 (no memory for the scratch buffers), or 10 * layer + 1 (a slot out of range: that
   layer writes nothing, earlier ones have) or + 2 (attention failed). */

enum K { RMS_NORM, SILU_MUL, ROPE_QK, KV_WRITE, ATTENTION, LINEAR_AMX, LINEAR_AMX_INT, LINEAR_F32, LINEAR_BF16,
         LINEAR_INT4, NK };
enum { PROJ_AMX = 1, PROJ_AMX_INT = 2, PROJ_F32 = 3, PROJ_BF16 = 4, PROJ_INT4 = 5 };
#define PROJ_WORDS 5
#define LAYER_WORDS 24

typedef void (*rms_norm_t)(const void *, const void *, void *, int64_t, int64_t, float, int, int);
typedef void (*silu_mul_t)(const void *, void *, int64_t, int64_t, int, int);
typedef void (*rope_qk_t)(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, int64_t, int, int);
typedef int (*kv_write_t)(void *, void *, int64_t, const int64_t *, const void *, const void *, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
typedef int (*attention_t)(const void *, const void *, const void *, const int64_t *, int64_t, int64_t,
                           const int64_t *, const int64_t *, void *, int64_t, int64_t, int64_t, int64_t, float, int,
                           int);
typedef void (*linear_t)(const void *, const void *, void *, int64_t, int64_t, int64_t, int);
typedef void (*linear_int_t)(const void *, const void *, const void *, void *, int64_t, int64_t, int64_t, int, int);

static void project(void *const *fn, const int64_t *p, const void *x, void *y, int64_t M, int64_t K, int threads) {
    const void *w = (const void *)p[1], *sm = (const void *)p[2];
    switch (p[0]) {
    case PROJ_AMX: ((linear_t)fn[LINEAR_AMX])(x, w, y, M, K, p[3], threads); break;
    case PROJ_AMX_INT: ((linear_int_t)fn[LINEAR_AMX_INT])(x, w, sm, y, M, K, p[3], (int)p[4], threads); break;
    case PROJ_F32: ((linear_t)fn[LINEAR_F32])(x, w, y, M, K, p[3], threads); break;
    case PROJ_INT4: ((linear_int_t)fn[LINEAR_INT4])(x, w, sm, y, M, K, p[3], (int)p[4], threads); break;   /* p[4]: group */
    default: ((linear_t)fn[LINEAR_BF16])(x, w, y, M, K, p[3], threads); break;
    }
}

/* x += y (n a multiple of 16), rounded to bf16 as a bf16 tensor add rounds (fp32: IEEE adds) */
static void add_into(void *x, const void *y, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *a = x;
        const uint16_t *b = y;
        for (int64_t i = 0; i < n; i += 16) v_store_bf16(a + i, v_add(v_load_bf16(a + i), v_load_bf16(b + i)));
    } else {
        float *a = x;
        const float *b = y;
        for (int64_t i = 0; i < n; ++i) a[i] += b[i];
    }
}

int recursa_decode_span(void *const *fn, const int64_t *layers, int64_t L, void *x, const void *cos, const void *sin,
                        void *k_cache, void *v_cache, int64_t num_slots, const int64_t *slots, int64_t smax,
                        const int64_t *new_slots, const int64_t *table_index, int64_t slot_stride, int64_t new_stride,
                        const int64_t *lens, const int64_t *rows, int64_t M, int64_t D, int64_t H, int64_t Hkv,
                        int64_t hd, int64_t F, float eps, float scale, int bf16, int threads, void *capture,
                        int64_t capture_after) {
    const int64_t e = bf16 ? 2 : 4, Nqkv = (H + 2 * Hkv) * hd, Hq = H * hd;
    /* scratch: h [M, D], qkv [M, Nqkv], qk [H + Hkv, M, hd], q [M, H, hd], attn [M, Hq], o [M, D],
       gate_up [M, 2F], act [M, F]; one allocation, each part on a cache line */
    const int64_t sizes[8] = {M * D, M * Nqkv, (H + Hkv) * M * hd, M * Hq, M * Hq, M * D, 2 * M * F, M * F};
    int64_t total = 0, at[8];
    for (int i = 0; i < 8; ++i) { at[i] = total; total += (sizes[i] * e + 63) & ~(int64_t)63; }
    char *scratch = aligned_alloc(64, (size_t)(total + 64 + ((M * 8 + 63) & ~(int64_t)63)));
    if (!scratch) return -1;
    void *h = scratch + at[0], *qkv = scratch + at[1], *qk = scratch + at[2], *q = scratch + at[3];
    void *attn = scratch + at[4], *o = scratch + at[5], *gu = scratch + at[6], *act = scratch + at[7];
    int64_t *shifted = (int64_t *)(scratch + total + 64);
    int status = 0;
    for (int64_t l = 0; l < L && !status; ++l) {
        const int64_t *lw = layers + l * LAYER_WORDS, offset = table_index ? 0 : lw[2];
        const int64_t *sl = table_index ? slots + table_index[l] * slot_stride : slots;
        const int64_t *ns = table_index ? new_slots + table_index[l] * new_stride : new_slots;
        ((rms_norm_t)fn[RMS_NORM])(x, (const void *)lw[0], h, M, D, eps, bf16, threads);
        project(fn, lw + 3, h, qkv, M, D, threads);
        ((rope_qk_t)fn[ROPE_QK])(qkv, cos, sin, qk, M, H + 2 * Hkv, H + Hkv, hd, bf16, threads);
        for (int64_t t = 0; t < M; ++t) shifted[t] = ns[t] + offset;
        /* keys: the rotated heads H.. of qk [heads, M, hd]; values: qkv's last Hkv heads, unrotated */
        if (((kv_write_t)fn[KV_WRITE])(k_cache, v_cache, num_slots, shifted, (char *)qk + H * M * hd * e,
                                       (char *)qkv + (H + Hkv) * hd * e, M, Hkv, hd, hd, M * hd, Nqkv, hd, e)) {
            status = 10 * l + 1;
            break;
        }
        for (int64_t t = 0; t < M; ++t)   /* queries [H, M, hd] -> [M, H, hd] */
            for (int64_t i = 0; i < H; ++i)
                memcpy((char *)q + (t * H + i) * hd * e, (char *)qk + (i * M + t) * hd * e, hd * e);
        const int s = ((attention_t)fn[ATTENTION])(q, k_cache, v_cache, sl, smax, offset, lens, rows, attn, M, H, Hkv, hd,
                                                   scale, bf16, threads);
        if (s) { status = 10 * l + 2; break; }
        project(fn, lw + 3 + PROJ_WORDS, attn, o, M, Hq, threads);
        add_into(x, o, M * D, bf16);
        ((rms_norm_t)fn[RMS_NORM])(x, (const void *)lw[1], h, M, D, eps, bf16, threads);
        project(fn, lw + 3 + 2 * PROJ_WORDS, h, gu, M, D, threads);
        ((silu_mul_t)fn[SILU_MUL])(gu, act, M, F, bf16, threads);
        project(fn, lw + 3 + 3 * PROJ_WORDS, act, o, M, F, threads);
        add_into(x, o, M * D, bf16);
        if (capture && l == capture_after) memcpy(capture, x, (size_t)(M * D * e));
    }
    free(scratch);
    return status;
}
