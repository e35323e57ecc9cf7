#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Decode attention over a paged KV cache, read in place: one query token per request.

   q, out [B, H, D]; k_cache, v_cache [slots, Hkv, D] (fp32, or bf16 when bf16 != 0);
   slots [B, smax]: the cache slot of each request's position p (plus `offset`, the depth's cache
   layer); request b attends to its positions 0 .. lens[b] - 1. Scores, softmax and the weighted
   sum run in fp32; D % 16 == 0, D <= 256, H % Hkv == 0 and H / Hkv <= 16. One task per
   (request, kv head): the group's query heads share each key/value row read. */

#define MAXV 16   /* D / 16 vectors per row */
#define MAXG 16   /* query heads per kv head */

static inline __m512 load16(const void *base, int64_t i, int bf16) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

static inline void store16(void *base, int64_t i, __m512 v, int bf16) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)base + i), (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)base + i, v);
}

static inline __attribute__((always_inline)) void attend_group(
        const void *q, const void *kc, const void *vc, const int64_t *slot_row, int64_t offset, int64_t n,
        void *out, int64_t b, int64_t g, int64_t H, int64_t Hkv, int64_t D, float scale, int bf16, float *sc) {
    const int64_t G = H / Hkv, nv = D / 16;
    __m512 qv[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v)
            qv[j][v] = _mm512_mul_ps(load16(q, ((b * H) + g * G + j) * D + v * 16, bf16), _mm512_set1_ps(scale));
    float mx[MAXG];
    for (int64_t j = 0; j < G; ++j) mx[j] = -INFINITY;
    for (int64_t p = 0; p < n; ++p) {
        const int64_t row = ((slot_row[p] + offset) * Hkv + g) * D;
        __m512 kv[MAXV];
        for (int64_t v = 0; v < nv; ++v) kv[v] = load16(kc, row + v * 16, bf16);
        for (int64_t j = 0; j < G; ++j) {
            __m512 acc = _mm512_mul_ps(qv[j][0], kv[0]);
            for (int64_t v = 1; v < nv; ++v) acc = _mm512_fmadd_ps(qv[j][v], kv[v], acc);
            const float s = _mm512_reduce_add_ps(acc);
            sc[j * n + p] = s;
            if (s > mx[j]) mx[j] = s;
        }
    }
    float inv[MAXG];
    for (int64_t j = 0; j < G; ++j) {
        float sum = 0.f;
        for (int64_t p = 0; p < n; ++p) {
            const float e = expf(sc[j * n + p] - mx[j]);
            sc[j * n + p] = e;
            sum += e;
        }
        inv[j] = 1.f / sum;
    }
    __m512 acc[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
        const int64_t row = ((slot_row[p] + offset) * Hkv + g) * D;
        __m512 vv[MAXV];
        for (int64_t v = 0; v < nv; ++v) vv[v] = load16(vc, row + v * 16, bf16);
        for (int64_t j = 0; j < G; ++j) {
            const __m512 w = _mm512_set1_ps(sc[j * n + p]);
            for (int64_t v = 0; v < nv; ++v) acc[j][v] = _mm512_fmadd_ps(w, vv[v], acc[j][v]);
        }
    }
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v)
            store16(out, ((b * H) + g * G + j) * D + v * 16, _mm512_mul_ps(acc[j][v], _mm512_set1_ps(inv[j])), bf16);
}

int recursa_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                                   int64_t smax, int64_t offset, const int64_t *lens, void *out, int64_t B, int64_t H,
                                   int64_t Hkv, int64_t D, float scale, int bf16, int threads) {
    if (D % 16 || D / 16 > MAXV || H % Hkv || H / Hkv > MAXG) return 1;
    int failed = 0;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < B * Hkv; ++t) {
        const int64_t b = t / Hkv, g = t % Hkv, n = lens[b];
        float *sc = malloc(sizeof(float) * (size_t)(H / Hkv) * (size_t)(n > 0 ? n : 1));
        if (!sc) { failed = 1; continue; }
        if (bf16)
            attend_group(q, k_cache, v_cache, slots + b * smax, offset, n, out, b, g, H, Hkv, D, scale, 1, sc);
        else
            attend_group(q, k_cache, v_cache, slots + b * smax, offset, n, out, b, g, H, Hkv, D, scale, 0, sc);
        free(sc);
    }
    return failed ? 2 : 0;
}
