// Shared by every kernel file: bf16 conversion, a polynomial exp, the size limits, and a vector type `vf`
// (16 fp32 lanes with AVX-512, 8 with AVX2+FMA) with the few operations the row-wise kernels need, so one
// source serves both tiers. Built once per ISA tier (ops/kernels.py picks the flags); kernels that have no
// vector version for the tier fall back to scalar loops or return -1 (the caller then uses torch).
#ifndef INFERD_COMMON_H
#define INFERD_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_H 64    // query heads per sequence (decode / prefill attention)
#define MAX_D 256   // head dim
#define MAX_BS 64   // tokens per KV block
#define Q4_MAXK 16384  // K of the quantized GEMMs

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return 0x7FC0;  // NaN: a quiet NaN (rounding could carry it into the sign)
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
    return (uint16_t)(u >> 16);
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) split into integer and fraction,
// the fraction by a degree-6 polynomial (relative error ~2e-7). Plain arithmetic, so loops vectorize.
static inline float exp_neg(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504089f;
    const float fi = floorf(t);
    const float f = t - fi;
    float p = 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    const int32_t e = ((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
}

#define LOADF(p, i) (is_bf16 ? bf16_to_f32(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])

// 8-lane fp32 load/store of fp32 or bf16 memory: the AVX2 bodies use these on every tier that has AVX2
#if defined(__AVX2__)
static inline __m256 v8_load(const void *p, int64_t off, const int is_bf16) {
    if (is_bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)p + off);
}
static inline __m256 v8_round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                             _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline void v8_store(void *p, int64_t off, __m256 v, const int is_bf16) {
    if (!is_bf16) {
        _mm256_storeu_ps((float *)p + off, v);
        return;
    }
    const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v8_round_bf16(v)), 16);  // each lane <= 0xFFFF
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + off), h);
}
#endif

// ---- vf: the widest fp32 vector of the tier ----
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vf_load(const void *p, int64_t off, const int is_bf16) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + off);
}
static inline vf vf_round_bf16(vf v) {  // round to nearest even bf16 (as f32_to_bf16, NaN too), kept as fp32
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}
static inline void vf_store(void *p, int64_t off, vf v, const int is_bf16) {
    if (!is_bf16) {
        _mm512_storeu_ps((float *)p + off, v);
        return;
    }
    const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(vf_round_bf16(v)), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + off), _mm512_cvtepi32_epi16(u));
}
#define vf_zero _mm512_setzero_ps
#define vf_set1 _mm512_set1_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vf_mul _mm512_mul_ps
#define vf_div _mm512_div_ps
#define vf_fma _mm512_fmadd_ps
#define vf_hsum _mm512_reduce_add_ps
#define vf_max _mm512_max_ps
#define vf_abs _mm512_abs_ps
#define vf_floor(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define vf_scale2(p, fi) _mm512_scalef_ps(p, fi)  // p · 2^fi
static inline vf vf_select_ge0(vf g, vf if_ge, vf if_lt) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), if_lt, if_ge);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
#define vf_load v8_load
#define vf_round_bf16 v8_round_bf16
#define vf_store v8_store
#define vf_zero _mm256_setzero_ps
#define vf_set1 _mm256_set1_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vf_mul _mm256_mul_ps
#define vf_div _mm256_div_ps
#define vf_fma _mm256_fmadd_ps
#define vf_max _mm256_max_ps
static inline float vf_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf vf_abs(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
#define vf_floor _mm256_floor_ps
static inline vf vf_scale2(vf p, vf fi) {  // p · 2^fi for integer-valued fi in [-126, 0]
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vf_select_ge0(vf g, vf if_ge, vf if_lt) {
    return _mm256_blendv_ps(if_lt, if_ge, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
}
#endif

#ifdef VW
static inline vf vf_exp_neg(vf x) {  // exp_neg, VW lanes (same polynomial, same rounding steps)
    x = vf_max(x, vf_set1(-87.f));
    const vf t = vf_mul(x, vf_set1(1.44269504089f));
    const vf fi = vf_floor(t);
    const vf f = vf_sub(t, fi);
    vf p = vf_set1(1.5403530393381606e-4f);
    p = vf_fma(p, f, vf_set1(1.3333558146428443e-3f));
    p = vf_fma(p, f, vf_set1(9.6181291076284772e-3f));
    p = vf_fma(p, f, vf_set1(5.5504108664821580e-2f));
    p = vf_fma(p, f, vf_set1(2.4022650695910071e-1f));
    p = vf_fma(p, f, vf_set1(6.9314718055994531e-1f));
    p = vf_fma(p, f, vf_set1(1.0f));
    return vf_scale2(p, fi);
}
#endif
#endif
