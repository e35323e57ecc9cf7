#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* y[m, n] = sum_k x[m, k] w[n, k] on AMX tiles: bf16 in, fp32 accumulation (TDPBF16PS), bf16 out
   (round to nearest even). x [M, K] row-major, K % 32 == 0; y [M, N] row-major.

   wp is w packed for the tiles (recursa.kernels.pack_amx): for each block of 32 output columns
   (N padded to a multiple of 32 with zero rows) and each block of 32 k, two 16x16 tiles of bf16
   pairs, 2 KiB contiguous: element [nb][kb][t][i][j][e] = w[32 nb + 16 t + j][32 kb + 2 i + e].
   A thread owns whole column blocks, so it streams its part of wp once, and for many rows keeps
   each block (at most a few hundred KiB) in its L2 cache across row chunks of 32.

   recursa_linear_amx_int reads int4 or int8 weights instead, w = scale * q + minimum per group of
   32 k (one k block), and widens each tile to bf16 in L1 just before the tile load: per k block
   and 16-column tile, 16 rows (the tile's bf16 pairs) of 16 bytes for int4 (byte b: element b in
   its low nibble, element b + 16 in its high one) or 32 signed bytes for int8; and in `sm`, per
   tile, the 16 columns' scales and then minimums (bf16, 64 B). */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int recursa_amx_init(void) {   /* Linux grants a process the AMX tile state only on request */
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static void configure(int r0, int r1) {   /* C: tiles 0-3, A: 4-5, B: 6-7 */
    tile_config c = {0};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64;
    c.rows[0] = c.rows[1] = c.rows[4] = (uint8_t)r0;
    c.rows[2] = c.rows[3] = c.rows[5] = (uint8_t)r1;
    if (r1 == 0) c.colsb[2] = c.colsb[3] = c.colsb[5] = 0;
    c.rows[6] = c.rows[7] = 16;
    _tile_loadconfig(&c);
}

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096   /* bf16 elements: 8 KiB ahead of the tiles being read */
#endif
/* the next 2 KiB of the stream (32 cache lines) into L1: tile loads alone leave the prefetchers idle */
#define PREFETCH(p) do { const char *q_ = (const char *)(p); \
    for (int l_ = 0; l_ < 2048; l_ += 64) _mm_prefetch(q_ + l_, _MM_HINT_T0); } while (0)

static inline void store_rows(const float *c, int rows, uint16_t *y, int64_t ldy, int64_t cols) {
    const __mmask16 mask = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    for (int r = 0; r < rows; ++r) {
        __m256bh b = _mm512_cvtneps_pbh(_mm512_load_ps(c + 16 * r));
        _mm256_mask_storeu_epi16(y + r * ldy, mask, (__m256i)b);
    }
}

/* one 16 x 32 bf16 tile (16 k-pairs x 16 columns) from its integer rows, scales and minimums:
   int4 rows of 16 bytes (element b low nibble, element b + 16 high) or int8 rows of 32 bytes */
static inline void widen_tile(const uint8_t *q, const uint16_t *sm, uint16_t *out, int bits) {
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)sm)), 16));
    const __m512 m = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sm + 16))), 16));
    const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i pairs_hi = _mm512_add_epi32(pairs, _mm512_set1_epi32(8));
    const __m512 s_lo = _mm512_permutexvar_ps(pairs, s), s_hi = _mm512_permutexvar_ps(pairs_hi, s);
    const __m512 m_lo = _mm512_permutexvar_ps(pairs, m), m_hi = _mm512_permutexvar_ps(pairs_hi, m);
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int i = 0; i < 16; ++i) {
        __m512i lo_q, hi_q;
        if (bits == 4) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * i)));
            lo_q = _mm512_and_si512(v, nibble);
            hi_q = _mm512_srli_epi32(v, 4);
        } else {
            lo_q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * i)));
            hi_q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 32 * i + 16)));
        }
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_q), s_lo, m_lo);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi_q), s_hi, m_hi);
        _mm512_store_si512(out + 32 * i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* y[:, 32 nb : 32 nb + 32] for all M rows: bf16 tiles from wb, or (wb NULL) widened from the
   `bits`-bit integer tiles qb with their scales and minimums smb */
static inline void column_block(const uint16_t *x, const uint16_t *wb, const uint8_t *qb, const uint16_t *smb,
                                int bits, uint16_t *y, int64_t M, int64_t K, int64_t N, int64_t nb, int *configured) {
    const int64_t tile = 64 * bits;   /* bytes of one integer tile: 16 rows of 32 elements */
    uint16_t widened[1024] __attribute__((aligned(64)));
    float c[4][256] __attribute__((aligned(64)));
    const int64_t KB = K / 32, lda = 2 * K, n0 = 32 * nb, left = N - n0;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int mr = M - m0 < 32 ? (int)(M - m0) : 32, r0 = mr < 16 ? mr : 16, r1 = mr - r0;
        if (*configured != mr) { configure(r0, r1); *configured = mr; }
        const uint16_t *x0 = x + m0 * K, *x1 = x0 + 16 * K;
        _tile_zero(0); _tile_zero(1);
        if (r1) { _tile_zero(2); _tile_zero(3); }
        for (int64_t kb = 0; kb < KB; ++kb) {
            const uint16_t *b = widened;
            if (wb) {
                b = wb + kb * 1024;
                PREFETCH(b + PREFETCH_AHEAD);
            } else {
                for (int64_t l = 0; l < 2 * tile; l += 64) _mm_prefetch((const char *)(qb + (kb + 8) * 2 * tile + l), _MM_HINT_T0);
                widen_tile(qb + kb * 2 * tile, smb + kb * 64, widened, bits);
                widen_tile(qb + kb * 2 * tile + tile, smb + kb * 64 + 32, widened + 512, bits);
            }
            _tile_loadd(4, x0 + 32 * kb, lda);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 512, 64);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            if (r1) {
                _tile_loadd(5, x1 + 32 * kb, lda);
                _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
        uint16_t *ym = y + m0 * N + n0;
        store_rows(c[0], r0, ym, N, left);
        if (left > 16) store_rows(c[1], r0, ym + 16, N, left - 16);
        if (r1) {
            _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
            store_rows(c[2], r1, ym + 16 * N, N, left);
            if (left > 16) store_rows(c[3], r1, ym + 16 * N + 16, N, left - 16);
        }
    }
}

void recursa_linear_amx(const uint16_t *x, const uint16_t *wp, uint16_t *y, int64_t M, int64_t K, int64_t N,
                        int threads) {
    const int64_t NB = (N + 31) / 32;
    #pragma omp parallel num_threads(threads)
    {
        int configured = -1;
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; ++nb)
            column_block(x, wp + nb * (K / 32) * 1024, 0, 0, 16, y, M, K, N, nb, &configured);
        if (configured != -1) _tile_release();
    }
}

/* int4 (bits 4) or int8 (bits 8) tiles, see the top of the file */
void recursa_linear_amx_int(const uint16_t *x, const uint8_t *wq, const uint16_t *sm, uint16_t *y, int64_t M,
                            int64_t K, int64_t N, int bits, int threads) {
    const int64_t NB = (N + 31) / 32, KB = K / 32, tile = 64 * bits;
    #pragma omp parallel num_threads(threads)
    {
        int configured = -1;
        /* more than one row chunk: widen a column block once into L2, then run it as bf16 tiles */
        uint16_t *block = M > 32 ? aligned_alloc(64, KB * 2048) : 0;
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; ++nb) {
            const uint8_t *qb = wq + nb * KB * 2 * tile;
            const uint16_t *smb = sm + nb * KB * 64;
            if (block) {
                for (int64_t kb = 0; kb < KB; ++kb) {
                    widen_tile(qb + kb * 2 * tile, smb + kb * 64, block + kb * 1024, bits);
                    widen_tile(qb + kb * 2 * tile + tile, smb + kb * 64 + 32, block + kb * 1024 + 512, bits);
                }
                column_block(x, block, 0, 0, 16, y, M, K, N, nb, &configured);
            } else {
                column_block(x, 0, qb, smb, bits, y, M, K, N, nb, &configured);
            }
        }
        free(block);
        if (configured != -1) _tile_release();
    }
}
