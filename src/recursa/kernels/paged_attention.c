#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* Decode attention over a paged KV cache, read in place: one query token per request.

   q, out [B, H, D]; k_cache, v_cache [slots, Hkv, D] (fp32, or bf16 when bf16 != 0);
   slots [R, smax]: the cache slot of each request's position p (plus `offset`, the depth's cache
   layer); query b reads row rows[b] of it (rows NULL: row b, one query per request) and attends to
   that request's positions 0 .. lens[b] - 1 (several queries of one request: a short chunk, each
   query seeing the positions up to its own, written before the call). Scores, softmax and the weighted
   sum run in fp32; D % 16 == 0, D <= 256, H % Hkv == 0 and H / Hkv <= 16. One task per
   (request, kv head): the group's query heads share each key/value row read. */

#define MAXV 16   /* D / 16 vectors per row */
#define MAXG 16   /* query heads per kv head */

static inline v16 load16(const void *base, int64_t i, int bf16) {
    return bf16 ? v_load_bf16((const uint16_t *)base + i) : v_loadu((const float *)base + i);
}

static inline void store16(void *base, int64_t i, v16 v, int bf16) {
    if (bf16) v_store_bf16((uint16_t *)base + i, v);
    else v_storeu((float *)base + i, v);
}

/* e^x for x <= 0 (scores minus their maximum): 2^n e^r, |r| <= ln2 / 2, e^r by its Taylor series to
   r^7 (truncation below 1e-8 relative, under fp32's rounding), scaled by scalef (denormals too); 0 below -104 */
static inline v16 exp_nonpositive(v16 x) {
    const v16 n = v_round(v_mul(x, v_set1(1.44269504f)));
    v16 r = v_fnmadd(n, v_set1(0.693145751953125f), x);
    r = v_fnmadd(n, v_set1(1.428606765330187e-06f), r);
    v16 e = v_set1(1.f / 5040);
    e = v_fmadd(e, r, v_set1(1.f / 720));
    e = v_fmadd(e, r, v_set1(1.f / 120));
    e = v_fmadd(e, r, v_set1(1.f / 24));
    e = v_fmadd(e, r, v_set1(1.f / 6));
    e = v_fmadd(e, r, v_set1(0.5f));
    e = v_fmadd(e, r, v_set1(1.f));
    e = v_fmadd(e, r, v_set1(1.f));
    return v_zero_below(v_scalef(e, n), x, -104.f);
}

/* scores sc [G][n16] -> exp(s - max) in place (the padding's -inf gives 0), mx: each row's running
   maximum; inv: 1 / each row's sum */
static inline void softmax_rows(float *sc, const v16 *mx, int64_t G, int64_t n16, float *inv) {
    for (int64_t j = 0; j < G; ++j) {
        const v16 top = v_set1(v_reduce_max(mx[j]));
        v16 sum = v_zero();
        for (int64_t p0 = 0; p0 < n16; p0 += 16) {
            const v16 e = exp_nonpositive(v_sub(v_load(sc + j * n16 + p0), top));
            v_store(sc + j * n16 + p0, e);
            sum = v_add(sum, e);
        }
        inv[j] = 1.f / v_reduce_add(sum);
    }
}

static inline __attribute__((always_inline)) void attend_group(
        const void *q, const void *kc, const void *vc, const int64_t *slot_row, int64_t offset, int64_t n,
        void *out, int64_t b, int64_t g, int64_t H, int64_t Hkv, int64_t D, float scale, int bf16, float *sc) {
    const int64_t G = H / Hkv, nv = D / 16, n16 = (n + 15) & ~(int64_t)15;   /* sc rows hold n16 scores */
    v16 qv[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v)
            qv[j][v] = v_mul(load16(q, ((b * H) + g * G + j) * D + v * 16, bf16), v_set1(scale));
    v16 mx[MAXG];
    for (int64_t j = 0; j < G; ++j) mx[j] = v_set1(-INFINITY);
    for (int64_t p0 = 0; p0 < n; p0 += 16) {   /* scores of 16 positions at a time */
        const int64_t m = n - p0 < 16 ? n - p0 : 16;
        for (int64_t j = 0; j < G; ++j) {
            v16 acc[16];
            if (j == 0)   /* the next 16 positions' keys: the rows are scattered by the block table */
                for (int64_t i = p0 + 16; i < p0 + 32 && i < n; ++i) {
                    const char *r = (const char *)kc + (((slot_row[i] + offset) * Hkv + g) * D << (2 - bf16));
                    for (int64_t l = 0; l < (D << (2 - bf16)); l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
                }
            for (int64_t i = 0; i < 16; ++i) {
                if (i >= m) { acc[PERM[i]] = v_zero(); continue; }
                const int64_t row = ((slot_row[p0 + i] + offset) * Hkv + g) * D;
                v16 a = v_mul(qv[j][0], load16(kc, row, bf16));
                for (int64_t v = 1; v < nv; ++v) a = v_fmadd(qv[j][v], load16(kc, row + v * 16, bf16), a);
                acc[PERM[i]] = a;
            }
            const v16 s = v_first(v_sum16(acc), m, -INFINITY);
            v_store(sc + j * n16 + p0, s);
            mx[j] = v_max(mx[j], s);
        }
    }
    float inv[MAXG];
    softmax_rows(sc, mx, G, n16, inv);
    v16 acc[MAXG][MAXV];
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v) acc[j][v] = v_zero();
    for (int64_t p = 0; p < n; ++p) {
        const int64_t row = ((slot_row[p] + offset) * Hkv + g) * D;
        if (p + 8 < n) {   /* a value row 8 positions ahead */
            const char *r = (const char *)vc + (((slot_row[p + 8] + offset) * Hkv + g) * D << (2 - bf16));
            for (int64_t l = 0; l < (D << (2 - bf16)); l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
        }
        v16 vv[MAXV];
        for (int64_t v = 0; v < nv; ++v) vv[v] = load16(vc, row + v * 16, bf16);
        for (int64_t j = 0; j < G; ++j) {
            const v16 w = v_set1(sc[j * n16 + p]);
            for (int64_t v = 0; v < nv; ++v) acc[j][v] = v_fmadd(w, vv[v], acc[j][v]);
        }
    }
    for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < nv; ++v)
            store16(out, ((b * H) + g * G + j) * D + v * 16, v_mul(acc[j][v], v_set1(inv[j])), bf16);
}

#if defined(__AVX512BF16__)
/* The bf16 path for D % 32 == 0: scores by AVX512-BF16 dot products (vdpbf16ps: each key row is
   read as D / 32 registers of bf16 pairs, no widening; products exact in fp32, fp32 sums), and the
   weighted sum over values widened two lanes at a time: a register of 32 bf16 splits into its
   even and odd elements (shift / mask, one op each), accumulated apart and interleaved back at the
   end. Request b's query heads g0 .. g1 - 1 (groups of G); while the first group runs, the whole
   cache row of each next position (all kv heads) is prefetched, so the later groups read L1/L2. */
static void attend_request_bf16(const uint16_t *q, const uint16_t *kc, const uint16_t *vc, const int64_t *slot_row,
                                int64_t offset, int64_t n, uint16_t *out, int64_t b, int64_t g0, int64_t g1,
                                int64_t H, int64_t Hkv, int64_t D, float scale, float *sc) {
    const int64_t G = H / Hkv, nw = D / 32, n16 = (n + 15) & ~(int64_t)15, row_bytes = Hkv * D * 2;
    const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t g = g0; g < g1; ++g) {
        const int first = g == g0;
        __m512bh qv[MAXG][MAXV / 2];
        for (int64_t j = 0; j < G; ++j)
            for (int64_t w = 0; w < nw; ++w)
                qv[j][w] = (__m512bh)_mm512_loadu_si512(q + ((b * H) + g * G + j) * D + w * 32);
        __m512 mx[MAXG];
        for (int64_t j = 0; j < G; ++j) mx[j] = _mm512_set1_ps(-INFINITY);
        for (int64_t p0 = 0; p0 < n; p0 += 16) {
            const int64_t m = n - p0 < 16 ? n - p0 : 16;
            const __mmask16 valid = m == 16 ? 0xffff : (__mmask16)((1u << m) - 1);
            if (first)
                for (int64_t i = p0 + 16; i < p0 + 32 && i < n; ++i) {
                    const char *r = (const char *)(kc + (slot_row[i] + offset) * Hkv * D);
                    for (int64_t l = 0; l < row_bytes; l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
                }
            const uint16_t *rows[16];
            for (int64_t i = 0; i < m; ++i) rows[i] = kc + ((slot_row[p0 + i] + offset) * Hkv + g) * D;
            for (int64_t j = 0; j < G; ++j) {
                __m512 acc[16];
                for (int64_t i = 0; i < 16; ++i) {
                    if (i >= m) { acc[PERM[i]] = _mm512_setzero_ps(); continue; }
                    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[j][0], (__m512bh)_mm512_loadu_si512(rows[i]));
                    for (int64_t w = 1; w < nw; ++w)
                        a = _mm512_dpbf16_ps(a, qv[j][w], (__m512bh)_mm512_loadu_si512(rows[i] + w * 32));
                    acc[PERM[i]] = a;
                }
                const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                                    _mm512_mul_ps(v_sum16(acc), _mm512_set1_ps(scale)));
                _mm512_store_ps(sc + j * n16 + p0, s);
                mx[j] = _mm512_max_ps(mx[j], s);
            }
        }
        float inv[MAXG];
        softmax_rows(sc, mx, G, n16, inv);
        __m512 even[MAXG][MAXV / 2], odd[MAXG][MAXV / 2];
        for (int64_t j = 0; j < G; ++j)
            for (int64_t w = 0; w < nw; ++w) even[j][w] = odd[j][w] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; ++p) {
            if (first && p + 8 < n) {
                const char *r = (const char *)(vc + (slot_row[p + 8] + offset) * Hkv * D);
                for (int64_t l = 0; l < row_bytes; l += 64) _mm_prefetch(r + l, _MM_HINT_T0);
            }
            const uint16_t *row = vc + ((slot_row[p] + offset) * Hkv + g) * D;
            __m512 ve[MAXV / 2], vo[MAXV / 2];
            for (int64_t w = 0; w < nw; ++w) {
                const __m512i x = _mm512_loadu_si512(row + w * 32);
                ve[w] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                vo[w] = _mm512_castsi512_ps(_mm512_and_si512(x, odd_mask));
            }
            for (int64_t j = 0; j < G; ++j) {
                const __m512 wt = _mm512_set1_ps(sc[j * n16 + p]);
                for (int64_t w = 0; w < nw; ++w) {
                    even[j][w] = _mm512_fmadd_ps(wt, ve[w], even[j][w]);
                    odd[j][w] = _mm512_fmadd_ps(wt, vo[w], odd[j][w]);
                }
            }
        }
        for (int64_t j = 0; j < G; ++j) {
            const __m512 f = _mm512_set1_ps(inv[j]);
            for (int64_t w = 0; w < nw; ++w) {
                const __m512i e = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(even[j][w], f)));
                const __m512i o = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(odd[j][w], f)));
                _mm512_storeu_si512(out + ((b * H) + g * G + j) * D + w * 32, _mm512_or_si512(e, _mm512_slli_epi32(o, 16)));
            }
        }
    }
}
#endif

int recursa_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *slots,
                                   int64_t smax, int64_t offset, const int64_t *lens, const int64_t *rows, void *out,
                                   int64_t B, int64_t H,
                                   int64_t Hkv, int64_t D, float scale, int bf16, int threads) {
    if (D % 16 || D / 16 > MAXV || H % Hkv || H / Hkv > MAXG) return 1;
    int failed = 0;
#if defined(__AVX512BF16__)
    if (bf16 && D % 32 == 0) {
        /* one task per request when there are enough of them (each reads its rows whole and in
           order), else one per (request, kv head) so that a few requests still use every thread */
        const int64_t split = B < 2 * (int64_t)threads ? Hkv : 1, per = Hkv / split;
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t t = 0; t < B * split; ++t) {
            const int64_t b = t / split, g0 = (t % split) * per, n = lens[b];
            const size_t n16 = (size_t)((n + 15) & ~(int64_t)15);
            float *sc = aligned_alloc(64, sizeof(float) * (size_t)(H / Hkv) * (n16 > 0 ? n16 : 16));
            if (!sc) { failed = 1; continue; }
            attend_request_bf16(q, k_cache, v_cache, slots + (rows ? rows[b] : b) * smax, offset, n, out, b, g0, g0 + per, H, Hkv, D,
                                scale, sc);
            free(sc);
        }
        return failed ? 2 : 0;
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < B * Hkv; ++t) {
        const int64_t b = t / Hkv, g = t % Hkv, n = lens[b];
        const size_t n16 = (size_t)((n + 15) & ~(int64_t)15);
        float *sc = aligned_alloc(64, sizeof(float) * (size_t)(H / Hkv) * (n16 > 0 ? n16 : 16));
        if (!sc) { failed = 1; continue; }
        if (bf16)
            attend_group(q, k_cache, v_cache, slots + (rows ? rows[b] : b) * smax, offset, n, out, b, g, H, Hkv, D, scale, 1, sc);
        else
            attend_group(q, k_cache, v_cache, slots + (rows ? rows[b] : b) * smax, offset, n, out, b, g, H, Hkv, D, scale, 0, sc);
        free(sc);
    }
    return failed ? 2 : 0;
}
