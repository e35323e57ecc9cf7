#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* The elementwise parts of a bf16 layer in one pass each, rounded where PyTorch's bf16 ops round:
   rms_norm:  y = bf16(w * bf16(x / rms(x)))        (x / rms in fp32, HF Llama's order)
   silu_mul:  y = bf16(bf16(silu(g)) * u)            (gate g, up u: the two halves of gate_up)
   Rows run in parallel; every row is independent. */

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 round_bf16(__m512 v) {   /* to bf16 and back: the rounding a bf16 tensor applies */
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
}

void recursa_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t dim,
                           float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *xr = x + r * dim;
        uint16_t *yr = y + r * dim;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            const __m512 v = load_bf16(xr + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 16) {
            __m512 v = round_bf16(_mm512_mul_ps(load_bf16(xr + i), inv));
            if (w) v = _mm512_mul_ps(v, load_bf16(w + i));
            _mm256_storeu_si256((__m256i *)(yr + i), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

static inline __m512 exp_ps(__m512 x) {   /* e^x to about 1 ulp: 2^n * (degree-6 Taylor of e^r), |r| <= ln2 / 2 */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

void recursa_silu_mul_bf16(const uint16_t *gate_up, uint16_t *y, int64_t rows, int64_t ffn, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *g = gate_up + 2 * r * ffn, *u = g + ffn;
        uint16_t *yr = y + r * ffn;
        for (int64_t i = 0; i < ffn; i += 16) {
            const __m512 v = load_bf16(g + i);
            const __m512 silu = round_bf16(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                          exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
            _mm256_storeu_si256((__m256i *)(yr + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, load_bf16(u + i))));
        }
    }
}
