#include <math.h>
#include <stdint.h>

#include "simd.h"

/* The maximum of each row of x [rows, n] (fp32, or bf16 with bf16 = 1) and the first index that
   holds it, as torch.max(x, dim=-1) gives them; a row holding a NaN gets NaN (the caller's sign of
   a row that cannot be sampled) and index 0. One pass for the maximum, one for its index. */
static inline v16 load_row(const void *x, int64_t i, int bf16) {
    return bf16 ? v_load_bf16((const uint16_t *)x + i) : v_loadu((const float *)x + i);
}

static inline float value_at(const void *x, int64_t i, int bf16) {
    if (!bf16) return ((const float *)x)[i];
    union { uint32_t u; float f; } v = { (uint32_t)((const uint16_t *)x)[i] << 16 };
    return v.f;
}

void recursa_row_max(const void *x, float *best, int64_t *index, int64_t rows, int64_t n, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const void *row = bf16 ? (const void *)((const uint16_t *)x + r * n) : (const void *)((const float *)x + r * n);
        const int64_t body = n - n % 16;
        v16 m = v_set1(-INFINITY);
        int nan = 0;
        for (int64_t i = 0; i < body; i += 16) {
            const v16 v = load_row(row, i, bf16);
            nan |= v_any_nan(v);
            m = v_max(m, v);
        }
        float top = v_reduce_max(m);
        int has_nan = nan != 0;
        for (int64_t i = body; i < n; ++i) {
            const float v = value_at(row, i, bf16);
            if (v != v) has_nan = 1;
            else if (v > top) top = v;
        }
        if (has_nan) { best[r] = NAN; index[r] = 0; continue; }
        int64_t at = 0;
        for (int64_t i = 0; i < n; ++i)
            if (value_at(row, i, bf16) == top) { at = i; break; }
        best[r] = top;
        index[r] = at;
    }
}
