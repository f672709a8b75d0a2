// Row-wise kernels: RMSNorm (with the residual add fused), SiLU·mul / GELU·mul of the gate/up projection,
// rotary.
// Same rounding as torch's separate ops in the model's dtype (tests compare them).
#include "kernels.h"

#ifdef VW
// Σ v² of one row of dim values (dim % VW == 0).
static inline float vf_sumsq(const void *x, int64_t base, int dim, int is_bf16) {
    vf acc = vf_zero();
    for (int d = 0; d < dim; d += VW) {
        const vf v = vf_load(x, base + d, is_bf16);
        acc = vf_fma(v, v, acc);
    }
    return vf_hsum(acc);
}
// out[r] = (round(x · inv) · w) for one row: the scaling half of RMSNorm (dim % VW == 0).
static inline void vf_scale_row(const void *x, int64_t xbase, const void *w, void *out, int64_t obase, int dim,
                                float inv, int is_bf16) {
    const vf vi = vf_set1(inv);
    for (int d = 0; d < dim; d += VW) {
        vf v = vf_mul(vf_load(x, xbase + d, is_bf16), vi);
        if (is_bf16) v = vf_round_bf16(v);
        vf_store(out, obase + d, vf_mul(v, vf_load(w, d, is_bf16)), is_bf16);
    }
}
#endif


// RMSNorm of `rows` rows of `dim`, computed in fp32: out = x / rms(x) * w. x and out may have row strides.
int rms_norm(const void *x, const void *w, void *out, int rows, int dim, int64_t x_stride, float eps,
             int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
#ifdef VW
        if (dim % VW == 0) {
            const float inv = 1.f / sqrtf(vf_sumsq(x, r * x_stride, dim, is_bf16) / dim + eps);
            vf_scale_row(x, r * x_stride, w, out, (int64_t)r * dim, dim, inv, is_bf16);
            continue;
        }
#endif
        float ss = 0.f;
        for (int d = 0; d < dim; d++) {
            const float v = LOADF(x, r * x_stride + d);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / dim + eps);
        for (int d = 0; d < dim; d++) {
            const float v = LOADF(x, r * x_stride + d) * inv;
            if (is_bf16) {  // as HF: normalise in fp32, round, then scale by the bf16 weight
                const float wv = bf16_to_f32(((const uint16_t *)w)[d]);
                ((uint16_t *)out)[(int64_t)r * dim + d] = f32_to_bf16(bf16_to_f32(f32_to_bf16(v)) * wv);
            } else {
                ((float *)out)[(int64_t)r * dim + d] = v * ((const float *)w)[d];
            }
        }
    }
    return 0;
}

// Rotate-half rotary embedding, in place, on `heads` heads of each of T rows (row stride in elements),
// rotating the first rot_dim features of each head; cos/sin tables are fp32 (max_pos, rot_dim / 2).
int rope_inplace(void *x, int T, int heads, int head_dim, int64_t row_stride, int rot_dim, const float *cos_t,
                 const float *sin_t, const int64_t *positions, int is_bf16) {
    const int half = rot_dim / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos_t + positions[t] * half, *s = sin_t + positions[t] * half;
        for (int h = 0; h < heads; h++) {
            const int64_t base = t * row_stride + (int64_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const float x1 = LOADF(x, base + i), x2 = LOADF(x, base + i + half);
                const float y1 = x1 * c[i] - x2 * s[i], y2 = x2 * c[i] + x1 * s[i];
                if (is_bf16) {
                    ((uint16_t *)x)[base + i] = f32_to_bf16(y1);
                    ((uint16_t *)x)[base + i + half] = f32_to_bf16(y2);
                } else {
                    ((float *)x)[base + i] = y1;
                    ((float *)x)[base + i + half] = y2;
                }
            }
        }
    }
    return 0;
}

// residual += x (rounded to the residual's dtype, as a separate add would), then out = RMSNorm(residual) * w.
int add_rms_norm(const void *x, void *residual, const void *w, void *out, int rows, int dim, float eps,
                 int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const int64_t base = (int64_t)r * dim;
#ifdef VW
        if (dim % VW == 0) {
            for (int d = 0; d < dim; d += VW) {  // residual += x, rounded to the residual's dtype
                const vf v = vf_add(vf_load(x, base + d, is_bf16), vf_load(residual, base + d, is_bf16));
                vf_store(residual, base + d, v, is_bf16);
            }
            const float inv = 1.f / sqrtf(vf_sumsq(residual, base, dim, is_bf16) / dim + eps);
            vf_scale_row(residual, base, w, out, base, dim, inv, is_bf16);
            continue;
        }
#endif
        float ss = 0.f;
        for (int d = 0; d < dim; d++) {
            float v = LOADF(x, base + d) + LOADF(residual, base + d);
            if (is_bf16) {
                const uint16_t h = f32_to_bf16(v);
                ((uint16_t *)residual)[base + d] = h;
                v = bf16_to_f32(h);
            } else {
                ((float *)residual)[base + d] = v;
            }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / dim + eps);
        for (int d = 0; d < dim; d++) {
            const float v = LOADF(residual, base + d) * inv;
            if (is_bf16) {
                const float wv = bf16_to_f32(((const uint16_t *)w)[d]);
                ((uint16_t *)out)[base + d] = f32_to_bf16(bf16_to_f32(f32_to_bf16(v)) * wv);
            } else {
                ((float *)out)[base + d] = v * ((const float *)w)[d];
            }
        }
    }
    return 0;
}

// out (rows, inter) = act(gu[:, :inter]) * gu[:, inter:], for the fused gate/up projection's output. act is
// SiLU, g·sigmoid(g), or (gelu) tanh-GELU, 0.5 g (1 + tanh(y)) with y = sqrt(2/pi) (g + 0.044715 g³), which is
// g·sigmoid(2y): one sigmoid form for both, through exp(-|z|) <= 1 so the polynomial exp_neg applies.
static inline int gated_act(const void *gu, void *out, int rows, int inter, int is_bf16, const int gelu) {
    const float c1 = 2.f * 0.7978845608028654f, c3 = 2.f * 0.7978845608028654f * 0.044715f;
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const int64_t in = (int64_t)r * 2 * inter, o = (int64_t)r * inter;
        int i0 = 0;
#ifdef VW
        for (; i0 + VW <= inter; i0 += VW) {
            const vf g = vf_load(gu, in + i0, is_bf16), u = vf_load(gu, in + inter + i0, is_bf16);
            const vf z = gelu ? vf_mul(g, vf_fma(vf_mul(g, g), vf_set1(c3), vf_set1(c1))) : g;
            const vf e = vf_exp_neg(vf_sub(vf_zero(), vf_abs(z)));
            const vf one = vf_set1(1.f);
            const vf sig = vf_div(vf_select_ge0(z, one, e), vf_add(one, e));
            vf sv = vf_mul(g, sig);
            if (is_bf16) sv = vf_round_bf16(sv);
            vf_store(out, o + i0, vf_mul(sv, u), is_bf16);
        }
#endif
#pragma omp simd
        for (int i = i0; i < inter; i++) {
            const float g = LOADF(gu, in + i), u = LOADF(gu, in + inter + i);
            // act(g) * u: round the activation to the compute dtype first, as torch's separate ops do
            const float z = gelu ? g * (g * g * c3 + c1) : g;
            const float e = exp_neg(-fabsf(z));
            float s = g * (z >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
            if (is_bf16) {
                s = bf16_to_f32(f32_to_bf16(s));
                ((uint16_t *)out)[o + i] = f32_to_bf16(s * u);
            } else {
                ((float *)out)[o + i] = s * u;
            }
        }
    }
    return 0;
}

int silu_mul(const void *gu, void *out, int rows, int inter, int is_bf16) {
    return gated_act(gu, out, rows, inter, is_bf16, 0);
}

int gelu_tanh_mul(const void *gu, void *out, int rows, int inter, int is_bf16) {
    return gated_act(gu, out, rows, inter, is_bf16, 1);
}
