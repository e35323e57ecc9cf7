#include <stdint.h>
#include <string.h>

#include "simd.h"

/* y[m, n] = sum_k x[m, k] w[n, k] in fp32 with FMAs (AVX-512, or AVX2 through simd.h), over a weight packed once
   (recursa.kernels.pack_f32): per panel of 32 output columns (N padded to a multiple of 32 with
   zeros), K rows of 32 floats, element [p][k][j] = w[32 p + j][k]. x [M, K], y [M, N] row-major.

   A thread owns whole panels, so it streams its part of the packed weight once. A panel is run
   in chunks of KC k: every row block of up to MR rows goes over the chunk while it sits in L1,
   its 2 x MR accumulators in registers (loaded from and stored to a per-thread fp32 buffer
   between chunks, which is exact). Every iteration of every row block also prefetches a slice of
   the next panel into L2, so the memory stream runs during the compute instead of before it (at 32
   rows that took the kernel from ~175 to ~215 GFLOP/s on 2 threads). Each output is one fused
   multiply-add chain in k order, whatever M and the row blocking are: a row's result does not
   depend on the batch it is in. */

#ifndef MR
#if defined(__AVX512F__)
#define MR 12    /* rows per register block: 2 x 12 accumulators + 2 weight vectors + a broadcast */
#else
#define MR 3     /* AVX2 has 16 registers: 2 x 2 x 3 accumulator halves + the weight's 4 + a broadcast */
#endif
#endif
#define NV 2     /* vectors of 16 columns per panel (8x3 and 6x4 blocks measured slower) */
#define PW (16 * NV)
#define KC 256   /* k per chunk: 12 rows x 256 floats of x and 256 x 32 of the panel stay in L1 */
#define PREFETCH_AHEAD 2048   /* floats: 8 KiB ahead in the first row block's weight stream */

static inline __attribute__((always_inline)) void
row_block(const float *x, int64_t ldx, const float *wp, int64_t k0, int64_t k1, float *c, int mr, int first,
          int fetch, const char *next, int64_t step) {
    v16 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            if (i < mr) acc[i][v] = first ? v_zero() : v_load(c + PW * i + 16 * v);
    for (int64_t k = k0; k < k1; ++k) {
        v16 w[NV];
        for (int v = 0; v < NV; ++v) w[v] = v_load(wp + PW * k + 16 * v);
        if (fetch)   /* the first row block reads the chunk from L2 or memory; the others find it in L1 */
            for (int v = 0; v < NV; ++v) _mm_prefetch((const char *)(wp + PW * k + PREFETCH_AHEAD + 16 * v), _MM_HINT_T0);
        _mm_prefetch(next + (k - k0) * step, _MM_HINT_T1);
        for (int i = 0; i < MR; ++i) {
            if (i < mr) {
                const v16 b = v_set1(x[i * ldx + k]);
                for (int v = 0; v < NV; ++v) acc[i][v] = v_fmadd(b, w[v], acc[i][v]);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            if (i < mr) v_store(c + PW * i + 16 * v, acc[i][v]);
}

/* one row_block per row count, so each has its accumulators in registers */
#define ROWS(n) case n: row_block(x, ldx, wp, k0, k1, c, n, first, 0, next, step); break;
#define ROWS_FETCH(n) case n: row_block(x, ldx, wp, k0, k1, c, n, first, 1, next, step); break;
static void run_rows(const float *x, int64_t ldx, const float *wp, int64_t k0, int64_t k1, float *c, int mr,
                     int first, int fetch, const char *next, int64_t step) {
    if (fetch) switch (mr) {
        ROWS_FETCH(1) ROWS_FETCH(2) ROWS_FETCH(3) ROWS_FETCH(4) ROWS_FETCH(5) ROWS_FETCH(6) ROWS_FETCH(7)
        ROWS_FETCH(8) ROWS_FETCH(9) ROWS_FETCH(10) ROWS_FETCH(11) ROWS_FETCH(12)
        default: break;
    } else switch (mr) {
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11) ROWS(12)
        default: break;
    }
}

/* one row: each panel's two fp32 FMA chains in k order (the same sums as the row blocks, so a
   row's result still does not depend on its batch), its stream prefetched 16 KiB ahead into L2:
   over SmolLM2's matrices, 2 threads, 19.7-20.0 ms a pass against 21.0-21.3 for MKL's GEMV and
   22-23 for the row-block loop at one row in a bare ctypes loop; 20.8 against F.linear's 20.4
   through the Python wrappers (benchmarks/cpu_kernels.py --formats fp32 --rows 1): level with
   MKL, and callable from decode_span.c, which MKL's GEMV is not */
static void gemv_panel(const float *x, const float *wp, float *y, int64_t K, int64_t cols) {
    v16 a0 = v_zero(), a1 = v_zero();
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch((const char *)(wp + PW * k + 4096), _MM_HINT_T1);
        _mm_prefetch((const char *)(wp + PW * k + 4096 + 16), _MM_HINT_T1);
        const v16 b = v_set1(x[k]);
        a0 = v_fmadd(b, v_load(wp + PW * k), a0);
        a1 = v_fmadd(b, v_load(wp + PW * k + 16), a1);
    }
    float c[PW] __attribute__((aligned(64)));
    v_store(c, a0);
    v_store(c + 16, a1);
    memcpy(y, c, (size_t)cols * sizeof(float));
}

void recursa_linear_f32(const float *x, const float *wp, float *y, int64_t M, int64_t K, int64_t N, int threads) {
    const int64_t panels = (N + PW - 1) / PW;
    const int64_t rows_per_pass = 32 * MR;   /* a buffer of at most this many rows x PW columns per thread */
    if (M == 1) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < panels; ++p)
            gemv_panel(x, wp + p * K * PW, y + PW * p, K, N - PW * p < PW ? N - PW * p : PW);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        float c[32 * MR * PW] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const float *wp_p = wp + p * K * PW;
            const int64_t n0 = PW * p, cols = N - n0 < PW ? N - n0 : PW;
            for (int64_t m0 = 0; m0 < M; m0 += rows_per_pass) {
                const int64_t rows = M - m0 < rows_per_pass ? M - m0 : rows_per_pass;
                /* spread prefetches of the next panel into L2 evenly over this panel's iterations */
                const int64_t blocks = (rows + MR - 1) / MR, step = (PW * 4 + blocks - 1) / blocks;
                const char *next = (const char *)(wp_p + K * PW);
                for (int64_t k0 = 0; k0 < K; k0 += KC) {
                    const int64_t k1 = K - k0 < KC ? K : k0 + KC;
                    for (int64_t r = 0; r < rows; r += MR) {
                        const int mr = rows - r < MR ? (int)(rows - r) : MR;
                        run_rows(x + (m0 + r) * K, K, wp_p, k0, k1, c + PW * r, mr, k0 == 0, r == 0, next, step);
                        next += (k1 - k0) * step;
                    }
                }
                for (int64_t r = 0; r < rows; ++r)
                    memcpy(y + (m0 + r) * N + n0, c + PW * r, (size_t)cols * sizeof(float));
            }
        }
    }
}
