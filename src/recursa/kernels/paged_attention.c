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

/* 16 vectors -> one whose lane l is the sum of vector PERM[l] (shuffles and adds, no horizontal
   reduction per vector); feeding vector i in slot PERM[i] puts sum i in lane i (PERM is its own inverse) */
static const int PERM[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
static inline __m512 reduce16(const __m512 *v) {
    __m512 u[8], w[4], x[2];
    for (int i = 0; i < 8; ++i)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[i], u[i + 4], 0x88), _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD));
    for (int i = 0; i < 2; ++i)
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[i], w[i + 2], 0x44), _mm512_shuffle_ps(w[i], w[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
}

/* e^x for x <= 0 (scores minus their maximum): 2^n e^r, |r| <= ln2 / 2, e^r by its Taylor series to
   r^7 (truncation below 1e-8 relative, under fp32's rounding), scaled by scalef (denormals too); 0 below -104 */
static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 e = _mm512_set1_ps(1.f / 5040);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 720));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.f), _CMP_GE_OQ);
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(e, n));
}

static inline __attribute__((always_inline)) void attend_group(
        const void *q, const void *kc, const void *vc, const int64_t *slot_row, int64_t offset, int64_t n,
        void *out, int64_t b, int64_t g, int64_t H, int64_t Hkv, int64_t D, float scale, int bf16, float *sc) {
    const int64_t G = H / Hkv, nv = D / 16, n16 = (n + 15) & ~(int64_t)15;   /* sc rows hold n16 scores */
    __m512 qv[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v)
            qv[j][v] = _mm512_mul_ps(load16(q, ((b * H) + g * G + j) * D + v * 16, bf16), _mm512_set1_ps(scale));
    __m512 mx[MAXG];
    for (int64_t j = 0; j < G; ++j) mx[j] = _mm512_set1_ps(-INFINITY);
    for (int64_t p0 = 0; p0 < n; p0 += 16) {   /* scores of 16 positions at a time */
        const int64_t m = n - p0 < 16 ? n - p0 : 16;
        const __mmask16 valid = m == 16 ? 0xffff : (__mmask16)((1u << m) - 1);
        for (int64_t j = 0; j < G; ++j) {
            __m512 acc[16];
            if (j == 0)   /* the next 16 positions' keys: the rows are scattered by the block table */
                for (int64_t i = p0 + 16; i < p0 + 32 && i < n; ++i) {
                    const char *r = (const char *)kc + (((slot_row[i] + offset) * Hkv + g) * D << (2 - bf16));
                    for (int64_t l = 0; l < (D << (2 - bf16)); l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
                }
            for (int64_t i = 0; i < 16; ++i) {
                if (i >= m) { acc[PERM[i]] = _mm512_setzero_ps(); continue; }
                const int64_t row = ((slot_row[p0 + i] + offset) * Hkv + g) * D;
                __m512 a = _mm512_mul_ps(qv[j][0], load16(kc, row, bf16));
                for (int64_t v = 1; v < nv; ++v) a = _mm512_fmadd_ps(qv[j][v], load16(kc, row + v * 16, bf16), a);
                acc[PERM[i]] = a;
            }
            const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, reduce16(acc));
            _mm512_store_ps(sc + j * n16 + p0, s);
            mx[j] = _mm512_max_ps(mx[j], s);
        }
    }
    float inv[MAXG];
    for (int64_t j = 0; j < G; ++j) {   /* exp(s - max) in place; the padding's -inf gives 0 */
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx[j]));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t p0 = 0; p0 < n16; p0 += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(sc + j * n16 + p0), top));
            _mm512_store_ps(sc + j * n16 + p0, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[j] = 1.f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
        const int64_t row = ((slot_row[p] + offset) * Hkv + g) * D;
        if (p + 8 < n) {   /* a value row 8 positions ahead */
            const char *r = (const char *)vc + (((slot_row[p + 8] + offset) * Hkv + g) * D << (2 - bf16));
            for (int64_t l = 0; l < (D << (2 - bf16)); l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
        }
        __m512 vv[MAXV];
        for (int64_t v = 0; v < nv; ++v) vv[v] = load16(vc, row + v * 16, bf16);
        for (int64_t j = 0; j < G; ++j) {
            const __m512 w = _mm512_set1_ps(sc[j * n16 + p]);
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
        const size_t n16 = (size_t)((n + 15) & ~(int64_t)15);
        float *sc = aligned_alloc(64, sizeof(float) * (size_t)(H / Hkv) * (n16 > 0 ? n16 : 16));
        if (!sc) { failed = 1; continue; }
        if (bf16)
            attend_group(q, k_cache, v_cache, slots + b * smax, offset, n, out, b, g, H, Hkv, D, scale, 1, sc);
        else
            attend_group(q, k_cache, v_cache, slots + b * smax, offset, n, out, b, g, H, Hkv, D, scale, 0, sc);
        free(sc);
    }
    return failed ? 2 : 0;
}
