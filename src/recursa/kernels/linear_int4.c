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
   group's affine once: scale * (sum((128 + q) x) - 136 sum(x)) + zero * sum(x). Up to 4 rows of x
   share each unpacked pair of weight bytes (their accumulators in registers). A thread owns whole
   blocks of 64 output rows and streams their bytes once per 4 rows of x.
   Why not torch's `_weight_int4pack_mm_for_cpu`: ~14 GB/s over SmolLM2's int4 bytes at one row,
   and C cannot call it (decode_span.c chains this one). bf16 out, rounded to nearest even. */

#ifndef PREFETCH
#define PREFETCH 2048   /* bytes ahead in a block's weight stream */
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static const int first_row[4] = {0, 8, 32, 40};   /* accumulator i holds rows r..r+7, r+16..r+23 */

/* rows 0 .. mr-1 of x (row stride K) against block b's 64 output rows; xs: each row's group sums
   (row stride ng). Inlined per mr so that the mr x 4 accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_rows(
        const uint16_t *x, const float *xs, int64_t ng, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t K,
        int64_t N, int64_t Np, int64_t G, int64_t b, const int mr) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i bias = _mm512_set1_epi16(0x4300);   /* bf16 bits of 128 + q, exact for q in 0..15 */
    const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
    const uint8_t *wb = w + b * K * 32;
    __m512 acc[4][4];
    for (int m = 0; m < mr; ++m)
        for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        /* sum over the group of (128 + q) x: bf16 pair dot products, k and k + 1 in one lane */
        __m512 a[4][4];
        for (int m = 0; m < mr; ++m)
            for (int i = 0; i < 4; ++i) a[m][i] = _mm512_setzero_ps();
        if (g + 1 < ng) {   /* the next group's scales: a row of sz Np * 4 bytes away, not streamed */
            const char *nxt = (const char *)(sz + ((g + 1) * Np + 64 * b) * 2);
            for (int l = 0; l < 256; l += 64) _mm_prefetch(nxt + l, _MM_HINT_T0);
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
            _mm_prefetch((const char *)(wb + k * 32 + PREFETCH), _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wb + k * 32));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wb + k * 32 + 32));
            const __m256i pl = _mm256_unpacklo_epi8(v0, v1), ph = _mm256_unpackhi_epi8(v0, v1);
            const __m512bh q[4] = {
                (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(pl, low4)), bias),
                (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(ph, low4)), bias),
                (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(pl, 4), low4)), bias),
                (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(ph, 4), low4)), bias)};
            for (int m = 0; m < mr; ++m) {
                const __m512bh xp = (__m512bh)_mm512_set1_epi32(
                    (int)((uint32_t)x[m * K + k] | ((uint32_t)x[m * K + k + 1] << 16)));
                for (int i = 0; i < 4; ++i) a[m][i] = _mm512_dpbf16_ps(a[m][i], q[i], xp);
            }
        }
        const uint16_t *s = sz + (g * Np + 64 * b) * 2;   /* (scale, zero) of the block's 64 rows */
        for (int i = 0; i < 4; ++i) {
            const uint16_t *r = s + 2 * first_row[i];
            const __m512i pair = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r)),
                                                    _mm256_loadu_si256((const __m256i *)(r + 32)), 1);
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, odd_mask));
            for (int m = 0; m < mr; ++m) {
                const __m512 sum = _mm512_set1_ps(xs[m * ng + g]), off = _mm512_set1_ps(136.f * xs[m * ng + g]);
                acc[m][i] = _mm512_fmadd_ps(scale, _mm512_sub_ps(a[m][i], off), _mm512_fmadd_ps(zero, sum, acc[m][i]));
            }
        }
    }
    for (int m = 0; m < mr; ++m)
        for (int i = 0; i < 4; ++i) {   /* rows r..r+7 and r+16..r+23 of the block, those below N */
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(acc[m][i]);
            for (int half = 0; half < 2; ++half) {
                const int64_t n0 = 64 * b + first_row[i] + 16 * half;
                if (n0 >= N) continue;
                const __mmask8 keep = N - n0 >= 8 ? 0xff : (__mmask8)((1u << (N - n0)) - 1);
                _mm_mask_storeu_epi16(y + m * N + n0, keep, half ? _mm256_extracti128_si256(h, 1)
                                                                 : _mm256_castsi256_si128(h));
            }
        }
}

void recursa_linear_int4(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int64_t M, int64_t K,
                         int64_t N, int group, int threads) {
    const int64_t Np = (N + 63) / 64 * 64, blocks = Np / 64, G = group, ng = K / G;
    float *xf = malloc(sizeof(float) * (size_t)(M * ng));   /* each row's sum of x per group */
    if (!xf) return;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < ng; ++g) {
            float s = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) s += bf16_to_f32(x[m * K + k]);
            xf[m * ng + g] = s;
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {   /* up to 4 rows share each unpacked weight pair */
            const int64_t mr = M - m0 < 4 ? M - m0 : 4;
            switch (mr) {
            case 1: block_rows(x + m0 * K, xf + m0 * ng, ng, w, sz, y + m0 * N, K, N, Np, G, b, 1); break;
            case 2: block_rows(x + m0 * K, xf + m0 * ng, ng, w, sz, y + m0 * N, K, N, Np, G, b, 2); break;
            case 3: block_rows(x + m0 * K, xf + m0 * ng, ng, w, sz, y + m0 * N, K, N, Np, G, b, 3); break;
            default: block_rows(x + m0 * K, xf + m0 * ng, ng, w, sz, y + m0 * N, K, N, Np, G, b, 4); break;
            }
        }
    }
    free(xf);
}
