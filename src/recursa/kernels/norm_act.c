#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* The elementwise parts of a layer in one pass each, bf16 (bf16 1) rounded where PyTorch's bf16 ops
   round, or fp32 (bf16 0: equal to PyTorch's to rounding, another summation order and exp):
   rms_norm:  y = bf16(w * bf16(x / rms(x)))        (x / rms in fp32, HF Llama's order)
   silu_mul:  y = bf16(bf16(silu(g)) * u)            (gate g, up u: the two halves of gate_up)
   Rows run in parallel; every row is independent. */

static inline v16 load_any(const void *p, int64_t i, int bf16) {
    return bf16 ? v_load_bf16((const uint16_t *)p + i) : v_loadu((const float *)p + i);
}

static inline v16 rounded(v16 v, int bf16) { return bf16 ? v_round_bf16(v) : v; }

static inline void store_any(void *p, int64_t i, v16 v, int bf16) {
    if (bf16) v_store_bf16((uint16_t *)p + i, v);
    else v_storeu((float *)p + i, v);
}

void recursa_rms_norm(const void *x, const void *w, void *y, int64_t rows, int64_t dim, float eps, int bf16,
                      int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        v16 ss = v_zero();
        for (int64_t i = 0; i < dim; i += 16) {
            const v16 v = load_any(x, r * dim + i, bf16);
            ss = v_fmadd(v, v, ss);
        }
        const v16 inv = v_set1(1.0f / sqrtf(v_reduce_add(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            v16 v = rounded(v_mul(load_any(x, r * dim + i, bf16), inv), bf16);
            if (w) v = v_mul(v, load_any(w, i, bf16));
            store_any(y, r * dim + i, v, bf16);
        }
    }
}

static inline v16 exp_ps(v16 x) {   /* e^x to about 1 ulp: 2^n * (degree-6 Taylor of e^r), |r| <= ln2 / 2 */
    x = v_min(v_max(x, v_set1(-87.0f)), v_set1(88.0f));
    const v16 n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    v16 r = v_fnmadd(n, v_set1(0.693359375f), x);
    r = v_fnmadd(n, v_set1(-2.12194440e-4f), r);
    v16 p = v_set1(1.0f / 720);
    p = v_fmadd(p, r, v_set1(1.0f / 120));
    p = v_fmadd(p, r, v_set1(1.0f / 24));
    p = v_fmadd(p, r, v_set1(1.0f / 6));
    p = v_fmadd(p, r, v_set1(0.5f));
    p = v_fmadd(p, r, v_set1(1.0f));
    p = v_fmadd(p, r, v_set1(1.0f));
    return v_scalef(p, n);
}

void recursa_silu_mul(const void *gate_up, void *y, int64_t rows, int64_t ffn, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = 2 * r * ffn, u = g + ffn;
        for (int64_t i = 0; i < ffn; i += 16) {
            const v16 v = load_any(gate_up, g + i, bf16);
            const v16 silu = rounded(v_div(v, v_add(v_set1(1.0f),
                                                                       exp_ps(v_sub(v_zero(), v)))), bf16);
            store_any(y, r * ffn + i, v_mul(silu, load_any(gate_up, u + i, bf16)), bf16);
        }
    }
}

/* rope on the query and key heads of a fused q/k/v projection: qkv [N, heads_total, hd] -> out
   [heads, N, hd] (the first `heads` heads: queries then keys), cos / sin [N, hd] with equal
   halves; out = x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as
   PyTorch's ops round them (bf16 1) or computed in fp32 op by op (bf16 0: the same bits). */
void recursa_rope_qk(const void *qkv, const void *cos, const void *sin, void *out, int64_t n, int64_t heads_total,
                     int64_t heads, int64_t hd, int bf16, int threads) {
    const int64_t half = hd / 2;
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * heads > 64)
    for (int64_t j = 0; j < n * heads; ++j) {
        const int64_t h = j / n, t = j % n, src = (t * heads_total + h) * hd, dst = (h * n + t) * hd;
        for (int64_t i = 0; i < half; i += 16) {
            const v16 x1 = load_any(qkv, src + i, bf16), x2 = load_any(qkv, src + half + i, bf16);
            const v16 c1 = load_any(cos, t * hd + i, bf16), c2 = load_any(cos, t * hd + half + i, bf16);
            const v16 s1 = load_any(sin, t * hd + i, bf16), s2 = load_any(sin, t * hd + half + i, bf16);
            const v16 lo = v_add(rounded(v_mul(x1, c1), bf16),
                                            rounded(v_mul(v_negate(x2), s1), bf16));
            const v16 hi = v_add(rounded(v_mul(x2, c2), bf16), rounded(v_mul(x1, s2), bf16));
            store_any(out, dst + i, lo, bf16);
            store_any(out, dst + half + i, hi, bf16);
        }
    }
}

/* keys and values of n new tokens into their cache slots: k, v [n, heads, hd] at any strides (in
   elements; each head's hd values contiguous), caches [num_slots, heads, hd] contiguous, elem
   bytes an element. Returns 1, writing nothing, if a slot is out of range. */
int recursa_kv_write(void *k_cache, void *v_cache, int64_t num_slots, const int64_t *slots, const void *k,
                     const void *v, int64_t n, int64_t heads, int64_t hd, int64_t k_stride_n, int64_t k_stride_h,
                     int64_t v_stride_n, int64_t v_stride_h, int64_t elem) {
    const int64_t row = heads * hd * elem, bytes = hd * elem;
    for (int64_t t = 0; t < n; ++t)
        if (slots[t] < 0 || slots[t] >= num_slots) return 1;
    for (int64_t t = 0; t < n; ++t) {
        char *kd = (char *)k_cache + slots[t] * row, *vd = (char *)v_cache + slots[t] * row;
        for (int64_t h = 0; h < heads; ++h) {
            memcpy(kd + h * bytes, (const char *)k + (t * k_stride_n + h * k_stride_h) * elem, bytes);
            memcpy(vd + h * bytes, (const char *)v + (t * v_stride_n + h * v_stride_h) * elem, bytes);
        }
    }
    return 0;
}
