#include <immintrin.h>
#include <stdint.h>

/* y[m, n] = sum_k x[m, k] w[n, k]; bf16 in, fp32 accumulation (vdpbf16ps), bf16 out (round to nearest even).
   x [M, K], w [N, K], y [M, N], all row-major and contiguous; K % 32 == 0. */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((v.u >> 16) | 0x40);   /* NaN stays NaN */
    v.u += 0x7fff + ((v.u >> 16) & 1);
    return (uint16_t)(v.u >> 16);
}

void recursa_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t K, int64_t N,
                         int threads) {
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n = 4 * b, rows = N - n < 4 ? N - n : 4;
        const uint16_t *w0 = w + n * K;
        const uint16_t *w1 = w0 + (rows > 1 ? K : 0), *w2 = w0 + (rows > 2 ? 2 * K : 0), *w3 = w0 + (rows > 3 ? 3 * K : 0);
        for (int64_t m = 0; m < M; ++m) {
            const uint16_t *xm = x + m * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + k);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), xv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), xv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), xv);
            }
            uint16_t *ym = y + m * N + n;
            float s[4] = { _mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                           _mm512_reduce_add_ps(a3) };
            for (int64_t r = 0; r < rows; ++r) ym[r] = to_bf16(s[r]);
        }
    }
}
