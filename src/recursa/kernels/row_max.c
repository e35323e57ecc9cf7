#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* The maximum of each row of x [rows, n] (fp32, or bf16 with bf16 = 1) and the first index that
   holds it, as torch.max(x, dim=-1) gives them; a row holding a NaN gets NaN (the caller's sign of
   a row that cannot be sampled) and index 0. One pass for the maximum, one for its index. */
static inline __m512 load_row(const void *x, int64_t i, int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i))), 16));
    return _mm512_loadu_ps((const float *)x + i);
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
        __m512 m = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < body; i += 16) {
            const __m512 v = load_row(row, i, bf16);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        float top = _mm512_reduce_max_ps(m);
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
