/* 16 fp32 lanes, whatever the CPU: one AVX-512 register, or two AVX2 registers (lo: lanes 0-7).

   The kernels that need no bf16 arithmetic (norm_act, paged_attention's general path, linear_f32,
   row_max, decode_span) are written once against these and built twice (kernels/build.py):
   -mavx512f... where the CPU has AVX512-BF16, -mavx2 -mfma elsewhere. Under AVX-512 each
   function is the one intrinsic it names, so those builds are the instructions they always were.
   Under AVX2 each is the same per-lane operation on two halves (FMA for FMA, one rounding each);
   what differs is the order of horizontal sums (v_reduce_add, v_sum16) and bf16 rounding, which
   follows PyTorch's (round to nearest even, NaN kept quiet, no flush of denormals). */
#ifndef RECURSA_SIMD_H
#define RECURSA_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#define SI static inline __attribute__((always_inline))

#if defined(__AVX512F__)
typedef __m512 v16;
SI v16 v_zero(void) { return _mm512_setzero_ps(); }
SI v16 v_set1(float a) { return _mm512_set1_ps(a); }
SI v16 v_load(const float *p) { return _mm512_load_ps(p); }
SI v16 v_loadu(const float *p) { return _mm512_loadu_ps(p); }
SI void v_store(float *p, v16 a) { _mm512_store_ps(p, a); }
SI void v_storeu(float *p, v16 a) { _mm512_storeu_ps(p, a); }
SI v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
SI v16 v_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
SI v16 v_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
SI v16 v_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
SI v16 v_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
SI v16 v_min(v16 a, v16 b) { return _mm512_min_ps(a, b); }
SI v16 v_fmadd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }     /* a b + c */
SI v16 v_fnmadd(v16 a, v16 b, v16 c) { return _mm512_fnmadd_ps(a, b, c); }   /* c - a b */
SI float v_reduce_add(v16 a) { return _mm512_reduce_add_ps(a); }
SI float v_reduce_max(v16 a) { return _mm512_reduce_max_ps(a); }
SI v16 v_round(v16 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SI v16 v_scalef(v16 a, v16 n) { return _mm512_scalef_ps(a, n); }              /* a 2^n, n integral */
SI v16 v_negate(v16 a) {   /* -a, signed zeros included */
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000)));
}
SI v16 v_first(v16 a, int64_t m, float fill) {   /* lanes 0 .. m - 1 of a, the rest fill */
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), (__mmask16)((1u << m) - 1), a);
}
SI v16 v_zero_below(v16 a, v16 x, float t) {   /* a where x >= t, else 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GE_OQ), a);
}
SI int v_any_nan(v16 a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
SI v16 v_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
SI void v_store_bf16(uint16_t *p, v16 a) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(a)); }
SI v16 v_round_bf16(v16 a) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(a)); }

/* 16 vectors -> one whose lane l is the sum of vector PERM[l] (shuffles and adds, no horizontal
   reduction per vector); feeding vector i in slot PERM[i] puts sum i in lane i (PERM is its own inverse) */
static const int PERM[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
SI v16 v_sum16(const v16 *v) {
    __m512 u[8], w[4], x[2];
    for (int i = 0; i < 8; ++i)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
    for (int i = 0; i < 4; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[i], u[i + 4], 0x88), _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD));
    for (int i = 0; i < 2; ++i)
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[i], w[i + 2], 0x44), _mm512_shuffle_ps(w[i], w[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
}

#else   /* AVX2 + FMA */
typedef struct { __m256 lo, hi; } v16;
#define V2(expr_lo, expr_hi) ((v16){expr_lo, expr_hi})
SI v16 v_zero(void) { return V2(_mm256_setzero_ps(), _mm256_setzero_ps()); }
SI v16 v_set1(float a) { return V2(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
SI v16 v_load(const float *p) { return V2(_mm256_load_ps(p), _mm256_load_ps(p + 8)); }
SI v16 v_loadu(const float *p) { return V2(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
SI void v_store(float *p, v16 a) { _mm256_store_ps(p, a.lo); _mm256_store_ps(p + 8, a.hi); }
SI void v_storeu(float *p, v16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
SI v16 v_add(v16 a, v16 b) { return V2(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
SI v16 v_sub(v16 a, v16 b) { return V2(_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)); }
SI v16 v_mul(v16 a, v16 b) { return V2(_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)); }
SI v16 v_div(v16 a, v16 b) { return V2(_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)); }
SI v16 v_max(v16 a, v16 b) { return V2(_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)); }
SI v16 v_min(v16 a, v16 b) { return V2(_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)); }
SI v16 v_fmadd(v16 a, v16 b, v16 c) { return V2(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)); }
SI v16 v_fnmadd(v16 a, v16 b, v16 c) { return V2(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)); }
SI __m128 half_sum(__m256 a) { return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); }
SI float v_reduce_add(v16 a) {
    __m128 s = _mm_add_ps(half_sum(a.lo), half_sum(a.hi));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
SI float v_reduce_max(v16 a) {
    const __m256 m8 = _mm256_max_ps(a.lo, a.hi);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
SI v16 v_round(v16 a) {
    return V2(_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
              _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
SI __m256 pow2(__m256 n) {   /* 2^n for integral n in [-126, 127] (exponent bits) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
SI __m256 scalef8(__m256 a, __m256 n) {
    /* a 2^n as two exact power-of-two products (a within [0.5, 2] stays normal after the first,
       so only the second rounds, as scalef rounds once); n clamped to [-252, 254] (0 or inf beyond) */
    n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-252.f)), _mm256_set1_ps(254.f));
    const __m256 n1 = _mm256_round_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    return _mm256_mul_ps(_mm256_mul_ps(a, pow2(n1)), pow2(_mm256_sub_ps(n, n1)));
}
SI v16 v_scalef(v16 a, v16 n) { return V2(scalef8(a.lo, n.lo), scalef8(a.hi, n.hi)); }
SI v16 v_negate(v16 a) {
    const __m256 s = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000));
    return V2(_mm256_xor_ps(a.lo, s), _mm256_xor_ps(a.hi, s));
}
SI v16 v_first(v16 a, int64_t m, float fill) {
    const __m256 lane_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), lane_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256 mm = _mm256_set1_ps((float)m), f = _mm256_set1_ps(fill);
    return V2(_mm256_blendv_ps(f, a.lo, _mm256_cmp_ps(lane_lo, mm, _CMP_LT_OQ)),
              _mm256_blendv_ps(f, a.hi, _mm256_cmp_ps(lane_hi, mm, _CMP_LT_OQ)));
}
SI v16 v_zero_below(v16 a, v16 x, float t) {
    const __m256 tt = _mm256_set1_ps(t);
    return V2(_mm256_and_ps(a.lo, _mm256_cmp_ps(x.lo, tt, _CMP_GE_OQ)), _mm256_and_ps(a.hi, _mm256_cmp_ps(x.hi, tt, _CMP_GE_OQ)));
}
SI int v_any_nan(v16 a) {
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q))) != 0;
}
SI __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
SI v16 v_load_bf16(const uint16_t *p) {
    return V2(widen_bf16(_mm_loadu_si128((const __m128i *)p)), widen_bf16(_mm_loadu_si128((const __m128i *)(p + 8))));
}
SI __m256i rounded_bits(__m256 a) {   /* fp32 bits rounded to the nearest even bf16 (low half left to clear), NaN quiet */
    const __m256i u = _mm256_castps_si256(a);
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                       _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), nan);   /* PyTorch's NaN: 0x7fc0 */
}
SI void v_store_bf16(uint16_t *p, v16 a) {
    const __m256i lo = _mm256_srli_epi32(rounded_bits(a.lo), 16), hi = _mm256_srli_epi32(rounded_bits(a.hi), 16);
    _mm256_storeu_si256((__m256i *)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
}
SI v16 v_round_bf16(v16 a) {
    const __m256i keep = _mm256_set1_epi32((int)0xffff0000u);
    return V2(_mm256_castsi256_ps(_mm256_and_si256(rounded_bits(a.lo), keep)),
              _mm256_castsi256_ps(_mm256_and_si256(rounded_bits(a.hi), keep)));
}

static const int PERM[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
SI __m256 sum8(const __m256 *w) {   /* lane l: the sum of w[l] */
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(w[0], w[1]), _mm256_hadd_ps(w[2], w[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(w[4], w[5]), _mm256_hadd_ps(w[6], w[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
SI v16 v_sum16(const v16 *v) {   /* the AVX-512 contract: lane l is the sum of v[PERM[l]] */
    __m256 w[16];
    for (int l = 0; l < 16; ++l) w[l] = _mm256_add_ps(v[PERM[l]].lo, v[PERM[l]].hi);
    return V2(sum8(w), sum8(w + 8));
}
#endif
#endif
