#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

/* y[m, n] = sum_k x[m, k] w[n, k] on AMX tiles: bf16 in, fp32 accumulation (TDPBF16PS), bf16 out
   (round to nearest even). x [M, K] row-major, K % 32 == 0; y [M, N] row-major.

   wp is w packed for the tiles (recursa.kernels.pack_amx): for each block of 32 output columns
   (N padded to a multiple of 32 with zero rows) and each block of 32 k, two 16x16 tiles of bf16
   pairs, 2 KiB contiguous: element [nb][kb][t][i][j][e] = w[32 nb + 16 t + j][32 kb + 2 i + e].
   A thread owns whole column blocks, so it streams its part of wp once, and for many rows keeps
   each block (at most a few hundred KiB) in its L2 cache across row chunks of 32. */

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

void recursa_linear_amx(const uint16_t *x, const uint16_t *wp, uint16_t *y, int64_t M, int64_t K, int64_t N,
                        int threads) {
    const int64_t KB = K / 32, NB = (N + 31) / 32, lda = 2 * K;
    #pragma omp parallel num_threads(threads)
    {
        float c[4][256] __attribute__((aligned(64)));
        int configured = -1;
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; ++nb) {
            const uint16_t *wb = wp + nb * KB * 1024;
            const int64_t n0 = 32 * nb, left = N - n0;
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const int mr = M - m0 < 32 ? (int)(M - m0) : 32, r0 = mr < 16 ? mr : 16, r1 = mr - r0;
                if (configured != mr) { configure(r0, r1); configured = mr; }
                const uint16_t *x0 = x + m0 * K, *x1 = x0 + 16 * K;
                _tile_zero(0); _tile_zero(1);
                if (r1) {
                    _tile_zero(2); _tile_zero(3);
                    for (int64_t kb = 0; kb < KB; ++kb) {
                        const uint16_t *b = wb + kb * 1024;
                        PREFETCH(b + PREFETCH_AHEAD);
                        _tile_loadd(4, x0 + 32 * kb, lda);
                        _tile_loadd(5, x1 + 32 * kb, lda);
                        _tile_loadd(6, b, 64);
                        _tile_loadd(7, b + 512, 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                    }
                } else {
                    for (int64_t kb = 0; kb < KB; ++kb) {
                        const uint16_t *b = wb + kb * 1024;
                        PREFETCH(b + PREFETCH_AHEAD);
                        _tile_loadd(4, x0 + 32 * kb, lda);
                        _tile_loadd(6, b, 64);
                        _tile_loadd(7, b + 512, 64);
                        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
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
        if (configured != -1) _tile_release();
    }
}
