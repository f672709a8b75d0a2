// The two memory-bound halves of a W8A8 linear layer (int8 weights per output channel, int8 activations per row
// with a zero point), around an s8·s8→s32 GEMM that torch._int_mm runs (oneDNN: VNNI where the CPU has it).
// Used by inferd/quant/w8a8.py for the encoder's linears. Plain C that the compiler vectorises for each tier;
// one pass over the input and one over the output, instead of the ~8 elementwise torch ops they replace.
#include "kernels.h"

#define DQ_ROWS 8

// Erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), plain arithmetic so the loop vectorises.
static inline float erf_as(float x) {
    const float ax = fabsf(x);
    const float t = 1.f / (1.f + 0.3275911f * ax);
    const float p = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                     0.254829592f) * t;
    const float r = 1.f - p * exp_neg(-ax * ax);
    return x < 0.f ? -r : r;
}

// tanh-GELU's tanh through exp_neg: tanh(u) = sign(u) (1 − e) / (1 + e), e = exp(−2|u|)
static inline float tanh_en(float u) {
    const float e = exp_neg(-2.f * fabsf(u));
    const float r = (1.f - e) / (1.f + e);
    return u < 0.f ? -r : r;
}

static inline float gelu_act(float v, int act) {
    if (act == 1)
        return 0.5f * v * (1.f + erf_as(v * 0.70710678118654752f));
    if (act == 2)
        return 0.5f * v * (1.f + tanh_en(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return v;
}

#ifdef VW
#if VW == 16
#define vf_min _mm512_min_ps
#define vf_hmin _mm512_reduce_min_ps
#define vf_hmax _mm512_reduce_max_ps
#define vf_rint(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
typedef __m512i vi;
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_set1 _mm512_set1_epi32
#define vi_sub _mm512_sub_epi32
#define vi_mul _mm512_mullo_epi32
#define vi_to_f _mm512_cvtepi32_ps
static inline void store_i8(int8_t *q, vf v) { _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v))); }
#else
#define vf_min _mm256_min_ps
// horizontal min / max of the 8 lanes, in the shape of common.h's vf_hsum
#define V8_HREDUCE(name, op)                                                      \
    static inline float name(vf v) {                                              \
        __m128 s = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));    \
        s = op(s, _mm_movehl_ps(s, s));                                           \
        s = op(s, _mm_movehdup_ps(s));                                            \
        return _mm_cvtss_f32(s);                                                  \
    }
V8_HREDUCE(vf_hmin, _mm_min_ps)
V8_HREDUCE(vf_hmax, _mm_max_ps)
#define vf_rint(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
typedef __m256i vi;
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_set1 _mm256_set1_epi32
#define vi_sub _mm256_sub_epi32
#define vi_mul _mm256_mullo_epi32
#define vi_to_f _mm256_cvtepi32_ps
static inline void store_i8(int8_t *q, vf v) {
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(w, w));
}
#endif
// The vector GELU (same formulas as gelu_act).
static inline vf vf_gelu(vf v, int act) {
    if (act == 1) {
        const vf x = vf_mul(v, vf_set1(0.70710678118654752f)), ax = vf_abs(x);
        const vf t = vf_div(vf_set1(1.f), vf_fma(vf_set1(0.3275911f), ax, vf_set1(1.f)));
        vf p = vf_fma(vf_set1(1.061405429f), t, vf_set1(-1.453152027f));
        p = vf_fma(p, t, vf_set1(1.421413741f));
        p = vf_fma(p, t, vf_set1(-0.284496736f));
        p = vf_fma(p, t, vf_set1(0.254829592f));
        p = vf_mul(p, t);
        const vf r = vf_sub(vf_set1(1.f), vf_mul(p, vf_exp_neg(vf_mul(vf_sub(vf_zero(), ax), ax))));
        const vf erf = vf_select_ge0(x, r, vf_sub(vf_zero(), r));
        return vf_mul(vf_mul(vf_set1(0.5f), v), vf_add(vf_set1(1.f), erf));
    }
    if (act == 2) {
        const vf u = vf_mul(vf_set1(0.7978845608028654f), vf_fma(vf_mul(vf_set1(0.044715f), v), vf_mul(v, v), v));
        const vf e = vf_exp_neg(vf_mul(vf_set1(-2.f), vf_abs(u)));
        const vf r = vf_div(vf_sub(vf_set1(1.f), e), vf_add(vf_set1(1.f), e));
        const vf th = vf_select_ge0(u, r, vf_sub(vf_zero(), r));
        return vf_mul(vf_mul(vf_set1(0.5f), v), vf_add(vf_set1(1.f), th));
    }
    return v;
}
#endif

// x (M, K) fp32 or bf16, times inv (K) when given (SmoothQuant's per-channel divisor, folded into the weights)
// → xq (M, K) int8 with x·inv ≈ sx[g, m] (xq − zx[g, m]) per group g of `group` channels: the group's range
// [min(0, lo), max(0, hi)] onto [-128, 127] (asymmetric: GELU outputs and skewed LayerNorm outputs keep every
// level). sx, zx: (K / group, M). The nkeep outlier channels keep[] (their inv is 0, so they are out of the
// int8 range) are copied unscaled to xo (M, nkeep) fp32 for the epilogue's fp32 product.
int quantize_rows_asym(const void *x, int M, int K, int group, int is_bf16, const float *inv, int8_t *xq,
                       float *sx, int32_t *zx, int nkeep, const int32_t *keep, float *xo) {
    if (M <= 0 || K <= 0 || group <= 0 || K % group || group > Q4_MAXK || nkeep < 0 || (nkeep && (!keep || !xo)))
        return -1;
    for (int j = 0; j < nkeep; j++)
        if (keep[j] < 0 || keep[j] >= K)
            return -1;
    const int G = K / group;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        float buf[Q4_MAXK];
        for (int j = 0; j < nkeep; j++)
            xo[(int64_t)m * nkeep + j] = LOADF(x, (int64_t)m * K + keep[j]);
        for (int g = 0; g < G; g++) {
            const int64_t off = (int64_t)m * K + (int64_t)g * group;
            const float *iv = inv ? inv + g * group : NULL;
            float lo = 0.f, hi = 0.f;
            int k0 = 0;
#ifdef VW
            vf vlo = vf_zero(), vhi = vf_zero();
            for (; k0 + VW <= group; k0 += VW) {
                vf v = vf_load(x, off + k0, is_bf16);
                if (iv)
                    v = vf_mul(v, vf_load(iv, k0, 0));
                vf_store(buf, k0, v, 0);
                vlo = vf_min(vlo, v);
                vhi = vf_max(vhi, v);
            }
            lo = vf_hmin(vlo);
            hi = vf_hmax(vhi);
#endif
            // two loops, not one: gcc 12 for aarch64 (Debian 12's) crashes vectorising the fused one (an ICE in
            // vect_transform_reduction), which left ARM64 without C kernels
            for (int k = k0; k < group; k++)
                buf[k] = LOADF(x, off + k) * (iv ? iv[k] : 1.f);
            for (int k = k0; k < group; k++) {
                lo = fminf(lo, buf[k]);
                hi = fmaxf(hi, buf[k]);
            }
            const float s = (hi - lo) / 255.f;
            const float is = s > 0.f ? 1.f / s : 0.f;
            const float z = s > 0.f ? nearbyintf(-lo * is) - 128.f : 0.f;
            int8_t *q = xq + off;
            k0 = 0;
#ifdef VW
            for (; k0 + VW <= group; k0 += VW) {
                vf v = vf_add(vf_rint(vf_mul(vf_load(buf, k0, 0), vf_set1(is))), vf_set1(z));
                v = vf_min(vf_max(v, vf_set1(-128.f)), vf_set1(127.f));
                store_i8(q + k0, v);
            }
#endif
            for (int k = k0; k < group; k++) {
                float v = nearbyintf(buf[k] * is) + z;
                v = v > 127.f ? 127.f : (v < -128.f ? -128.f : v);
                q[k] = (int8_t)(int32_t)v;
            }
            sx[(int64_t)g * M + m] = s;
            zx[(int64_t)g * M + m] = (int32_t)z;
        }
    }
    return 0;
}

// The outlier channels' fp32 product for `rows` (≤ DQ_ROWS) consecutive rows: o (rows, N) = xo (rows, nkeep) ·
// wo (nkeep, N). Each loaded vector of wo serves every row of the tile: one row at a time (a load per FMA) took
// 4.5x the epilogue's time without outliers, tiles of 8 rows 2.6x (M 4000, N 1152, 8 channels, 1 thread).
static void outlier_tile(const float *xo, const float *wo, int nkeep, int N, int rows, float *o) {
    int n0 = 0;
#ifdef VW
    for (; n0 + VW <= N; n0 += VW) {
        vf a[DQ_ROWS];
        for (int r = 0; r < DQ_ROWS; r++)
            a[r] = vf_zero();
        for (int j = 0; j < nkeep; j++) {
            const vf w = vf_load(wo, (int64_t)j * N + n0, 0);
            for (int r = 0; r < DQ_ROWS; r++)
                a[r] = vf_fma(vf_set1(xo[(r < rows ? r : 0) * nkeep + j]), w, a[r]);
        }
        for (int r = 0; r < rows; r++)
            vf_store(o, (int64_t)r * N + n0, a[r], 0);
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int n = n0; n < N; n++) {
            float v = 0.f;
            for (int j = 0; j < nkeep; j++)
                v += xo[r * nkeep + j] * wo[(int64_t)j * N + n];
            o[(int64_t)r * N + n] = v;
        }
}

// y (M, N) = Σ_g sx[g, m] · sw[n] · (acc[g, m, n] − zx[g, m] · wsum[g, n]) + Σ_j xo[m, j] · wo[j, n] + bias[n],
// then act (0 none, 1 GELU erf, 2 GELU tanh); y fp32 or bf16. wsum[g, n] = Σ_{k in g} wq[n, k] (the zero point's
// share of each output); xo (M, nkeep) · wo (nkeep, N): the outlier channels' product in fp32.
int dequant_rows(const int32_t *acc, int G, int M, int N, const float *sx, const int32_t *zx, const int32_t *wsum,
                 const float *sw, const float *bias, void *y, int is_bf16, int act, int nkeep, const float *xo,
                 const float *wo) {
    if (G <= 0 || M <= 0 || N <= 0 || nkeep < 0 || (nkeep && (!xo || !wo)))
        return -1;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int mb = 0; mb < M; mb += DQ_ROWS) {
        const int rows = M - mb < DQ_ROWS ? M - mb : DQ_ROWS;
        // the block's outlier product, rows × N floats on the heap (any N; a stack array would overflow)
        float *obuf = nkeep ? malloc(sizeof(float) * (size_t)rows * (size_t)N) : NULL;
        if (nkeep && !obuf) {
            failed = 1;
            continue;
        }
        if (nkeep)
            outlier_tile(xo + (int64_t)mb * nkeep, wo, nkeep, N, rows, obuf);
        for (int m = mb; m < mb + rows; m++) {
            float *yf = is_bf16 ? NULL : (float *)y + (int64_t)m * N;
            uint16_t *yb = is_bf16 ? (uint16_t *)y + (int64_t)m * N : NULL;
            const float *ob = nkeep ? obuf + (int64_t)(m - mb) * N : NULL;
            int n0 = 0;
#ifdef VW
            for (; n0 + VW <= N; n0 += VW) {
                vf v = vf_zero();
                for (int g = 0; g < G; g++) {
                    const int64_t r = (int64_t)g * M + m;
                    const vi a = vi_sub(vi_load(acc + r * N + n0),
                                        vi_mul(vi_set1(zx[r]), vi_load(wsum + (int64_t)g * N + n0)));
                    v = vf_fma(vf_set1(sx[r]), vi_to_f(a), v);
                }
                v = vf_mul(v, vf_load(sw, n0, 0));
                if (nkeep)
                    v = vf_add(v, vf_load(ob, n0, 0));
                if (bias)
                    v = vf_add(v, vf_load(bias, n0, 0));
                vf_store(y, (int64_t)m * N + n0, vf_gelu(v, act), is_bf16);
            }
#endif
            for (int n = n0; n < N; n++) {
                float v = 0.f;
                for (int g = 0; g < G; g++) {
                    const int64_t r = (int64_t)g * M + m;
                    v += sx[r] * (float)(acc[r * N + n] - zx[r] * wsum[(int64_t)g * N + n]);
                }
                v = gelu_act(v * sw[n] + (nkeep ? ob[n] : 0.f) + (bias ? bias[n] : 0.f), act);
                if (is_bf16)
                    yb[n] = f32_to_bf16(v);
                else
                    yf[n] = v;
            }
        }
        free(obuf);
    }
    return failed ? -1 : 0;
}
