#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* y[m, n] = sum_k x[m, k] w[n, k] for a few rows of bf16 x over int4 weights in torch's CPU int4
   layout (recursa.model.quant_linear): w uint8 [N' / 64][K][32], byte (b, k, j) holding row 64b + j
   in its low nibble and row 64b + j + 32 in its high one; sz bf16 [K / G][N'][2] = (scale, zero),
   w[n, k] = (q - 8) * scale + zero for k's group of G. N' = N rounded up to 64.

   Per group the kernel sums (128 + q) * x by AVX512-BF16 pair dot products (a nibble or-ed into the
   bf16 bits of 128 is 128 + q exactly; k and k + 1 of a row share a lane, so the weight bytes of two
   k are interleaved, and the rows of an accumulator come out in 128-bit-lane order) and applies the
   group's affine once: scale * (sum((128 + q) x) - 136 sum(x)) + zero * sum(x). A thread owns whole blocks
   of 64 output rows and streams their bytes once (each further row of x finds them in L1/L2).
   Why not torch's `_weight_int4pack_mm_for_cpu`: ~14 GB/s over SmolLM2's int4 bytes at one row,
   and C cannot call it (decode_span.c chains this one). bf16 out, rounded to nearest even. */

#ifndef PREFETCH
#define PREFETCH 1024   /* bytes ahead in a block's weight stream */
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

void recursa_linear_int4(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t K,
                         int64_t N, int group, int threads) {
    const int64_t Np = (N + 63) / 64 * 64, blocks = Np / 64, G = group, ng = K / G;
    float *xf = malloc(sizeof(float) * (size_t)(M * (K + ng)));   /* x in fp32, then each group's sum */
    if (!xf) return;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf16_to_f32(x[m * K + k]);
        for (int64_t g = 0; g < ng; ++g) {
            float s = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xf[m * K + k];
            xf[M * K + m * ng + g] = s;
        }
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i bias = _mm512_set1_epi16(0x4300);   /* bf16 bits of 128 + q, exact for q in 0..15 */
    const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
    static const int first_row[4] = {0, 8, 32, 40};   /* accumulator i holds rows r..r+7, r+16..r+23 */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t *wb = w + b * K * 32;
        for (int64_t m = 0; m < M; ++m) {
            const uint16_t *xm = x + m * K;
            const float *xs = xf + M * K + m * ng;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t g = 0; g < ng; ++g) {
                /* sum over the group of (128 + q) x: bf16 pair dot products, k and k + 1 in one lane */
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                if (g + 1 < ng) {   /* the next group's scales: a row of sz Np * 4 bytes away, not streamed */
                    const char *nxt = (const char *)(sz + ((g + 1) * Np + 64 * b) * 2);
                    for (int l = 0; l < 256; l += 64) _mm_prefetch(nxt + l, _MM_HINT_T0);
                }
                for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
                    _mm_prefetch((const char *)(wb + k * 32 + PREFETCH), _MM_HINT_T0);
                    const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wb + k * 32));
                    const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wb + k * 32 + 32));
                    const __m256i pl = _mm256_unpacklo_epi8(v0, v1), ph = _mm256_unpackhi_epi8(v0, v1);
                    const __m512bh xp = (__m512bh)_mm512_set1_epi32((int)((uint32_t)xm[k] | ((uint32_t)xm[k + 1] << 16)));
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(pl, low4)), bias), xp);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(ph, low4)), bias), xp);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_or_si512(
                        _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(pl, 4), low4)), bias), xp);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_or_si512(
                        _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(ph, 4), low4)), bias), xp);
                }
                const __m512 a[4] = {a0, a1, a2, a3};
                const __m512 sum = _mm512_set1_ps(xs[g]), off = _mm512_set1_ps(136.f * xs[g]);
                const uint16_t *s = sz + (g * Np + 64 * b) * 2;   /* (scale, zero) of the block's 64 rows */
                for (int i = 0; i < 4; ++i) {
                    const uint16_t *r = s + 2 * first_row[i];
                    const __m512i pair = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r)),
                                                            _mm256_loadu_si256((const __m256i *)(r + 32)), 1);
                    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
                    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, odd_mask));
                    acc[i] = _mm512_fmadd_ps(scale, _mm512_sub_ps(a[i], off), _mm512_fmadd_ps(zero, sum, acc[i]));
                }
            }
            for (int i = 0; i < 4; ++i) {   /* rows r..r+7 and r+16..r+23 of the block, those below N */
                const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[i]);
                for (int half = 0; half < 2; ++half) {
                    const int64_t n0 = 64 * b + first_row[i] + 16 * half;
                    if (n0 >= N) continue;
                    const __mmask8 keep = N - n0 >= 8 ? 0xff : (__mmask8)((1u << (N - n0)) - 1);
                    _mm_mask_storeu_epi16(y + m * N + n0, keep, half ? _mm256_extracti128_si256(h, 1)
                                                                     : _mm256_castsi256_si128(h));
                }
            }
        }
    }
    free(xf);
}
