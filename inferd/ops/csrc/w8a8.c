// The two memory-bound halves of a W8A8 linear layer (int8 weights per output channel, int8 activations per row
// with a zero point), around an s8·s8→s32 GEMM that torch._int_mm runs (oneDNN: VNNI where the CPU has it).
// Used by inferd/quant/w8a8.py for the encoder's linears. Plain C that the compiler vectorises for each tier;
// one pass over the input and one over the output, instead of the ~8 elementwise torch ops they replace.
#include "kernels.h"

// Erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), plain arithmetic so the loop vectorises.
static inline float erf_as(float x) {
    const float ax = fabsf(x);
    const float t = 1.f / (1.f + 0.3275911f * ax);
    const float p = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                     0.254829592f) * t;
    const float r = 1.f - p * exp_neg(-ax * ax);
    return x < 0.f ? -r : r;
}

// x (M, K) fp32 or bf16, times inv (K) when given (SmoothQuant's per-channel divisor, folded into the weights)
// → xq (M, K) int8 with x·inv ≈ sx[g, m] (xq − zx[g, m]) per group g of `group` channels: the group's range
// [min(0, lo), max(0, hi)] onto [-128, 127] (asymmetric: GELU outputs and skewed LayerNorm outputs keep every
// level). sx, zx: (K / group, M).
int quantize_rows_asym(const void *x, int M, int K, int group, int is_bf16, const float *inv, int8_t *xq,
                       float *sx, int32_t *zx) {
    if (M <= 0 || K <= 0 || group <= 0 || K % group || group > Q4_MAXK)
        return -1;
    const int G = K / group;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        float buf[Q4_MAXK];
        for (int g = 0; g < G; g++) {
            const int64_t off = (int64_t)m * K + (int64_t)g * group;
            const float *iv = inv ? inv + g * group : NULL;
            float lo = 0.f, hi = 0.f;
            for (int k = 0; k < group; k++) {
                const float v = LOADF(x, off + k) * (iv ? iv[k] : 1.f);
                buf[k] = v;
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
            }
            const float s = (hi - lo) / 255.f;
            const float is = s > 0.f ? 1.f / s : 0.f;
            const float z = s > 0.f ? nearbyintf(-lo * is) - 128.f : 0.f;
            int8_t *q = xq + off;
            for (int k = 0; k < group; k++) {
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

// y (M, N) = Σ_g sx[g, m] · sw[n] · (acc[g, m, n] − zx[g, m] · wsum[g, n]) + bias[n], then act (0 none, 1 GELU
// erf, 2 GELU tanh); y fp32 or bf16. wsum[g, n] = Σ_{k in g} wq[n, k] (the zero point's share of each output).
int dequant_rows(const int32_t *acc, int G, int M, int N, const float *sx, const int32_t *zx, const int32_t *wsum,
                 const float *sw, const float *bias, void *y, int is_bf16, int act) {
    if (G <= 0 || M <= 0 || N <= 0)
        return -1;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        float *yf = is_bf16 ? NULL : (float *)y + (int64_t)m * N;
        uint16_t *yb = is_bf16 ? (uint16_t *)y + (int64_t)m * N : NULL;
        for (int n = 0; n < N; n++) {
            float v = 0.f;
            for (int g = 0; g < G; g++) {
                const int64_t r = (int64_t)g * M + m;
                v += sx[r] * (float)(acc[r * N + n] - zx[r] * wsum[(int64_t)g * N + n]);
            }
            v = v * sw[n] + (bias ? bias[n] : 0.f);
            if (act == 1)
                v = 0.5f * v * (1.f + erf_as(v * 0.70710678118654752f));
            else if (act == 2)
                v = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
            if (is_bf16)
                yb[n] = f32_to_bf16(v);
            else
                yf[n] = v;
        }
    }
    return 0;
}
