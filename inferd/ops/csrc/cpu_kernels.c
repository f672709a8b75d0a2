// inferd CPU kernels, called through ctypes on raw tensor memory (built at first use, see ops/cpu_kernels.py).
//
// paged_decode_attention: one query token per sequence against its K/V read in place from the paged cache
// (no gather copy). Parallel over (sequence, kv head); the G query heads of a KV head share every K/V load;
// online softmax one block of tokens at a time.
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
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

#define MAX_H 64
#define LOADF(p, i) (is_bf16 ? bf16_to_f32(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])
#define MAX_D 256
#define MAX_BS 64

// One K or V row of D values from the cache, as fp32.
static inline void load_row(const void *cache, int64_t off, int D, int is_bf16, float *out) {
    for (int d = 0; d < D; d++) out[d] = LOADF(cache, off + d);
}

// One sequence: every head, reading each K/V block front to back (sequential, prefetch-friendly).
// Inlined with constant Hkv, G and D so the short inner loops unroll.
static inline __attribute__((always_inline)) void attn_seq(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *bt, int ctx, void *out, int b,
    const int Hkv, const int G, const int D, int bs, float scale, const int is_bf16) {
    const int H = Hkv * G;
    float qf[MAX_H][MAX_D], acc[MAX_H][MAX_D], m[MAX_H], l[MAX_H], s[MAX_H][MAX_BS];
    float kf[MAX_D];
    const int64_t tok_stride = (int64_t)Hkv * D;
    const int64_t blk_stride = (int64_t)bs * tok_stride;
    for (int h = 0; h < H; h++) {
        const int64_t qoff = ((int64_t)b * H + h) * D;
        for (int d = 0; d < D; d++) {
            qf[h][d] = LOADF(q, qoff + d) * scale;
            acc[h][d] = 0.f;
        }
        m[h] = -INFINITY;
        l[h] = 0.f;
    }
    const int nblk = (ctx + bs - 1) / bs;
    for (int j = 0; j < nblk; j++) {
        const int n = (j == nblk - 1) ? ctx - j * bs : bs;
        const int64_t base = bt[j] * blk_stride;
        for (int t = 0; t < n; t++) {
            for (int kh = 0; kh < Hkv; kh++) {
                load_row(k_cache, base + t * tok_stride + (int64_t)kh * D, D, is_bf16, kf);
                for (int g = 0; g < G; g++) {
                    const int h = kh * G + g;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += qf[h][d] * kf[d];
                    s[h][t] = dot;
                }
            }
        }
        for (int h = 0; h < H; h++) {
            float mx = m[h];
            for (int t = 0; t < n; t++) mx = s[h][t] > mx ? s[h][t] : mx;
            const float corr = m[h] == -INFINITY ? 0.f : exp_neg(m[h] - mx);
            l[h] *= corr;
            for (int d = 0; d < D; d++) acc[h][d] *= corr;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                s[h][t] = exp_neg(s[h][t] - mx);
                sum += s[h][t];
            }
            l[h] += sum;
            m[h] = mx;
        }
        for (int t = 0; t < n; t++) {
            for (int kh = 0; kh < Hkv; kh++) {
                load_row(v_cache, base + t * tok_stride + (int64_t)kh * D, D, is_bf16, kf);
                for (int g = 0; g < G; g++) {
                    const int h = kh * G + g;
                    const float p = s[h][t];
                    for (int d = 0; d < D; d++) acc[h][d] += p * kf[d];
                }
            }
        }
    }
    for (int h = 0; h < H; h++) {
        const int64_t ooff = ((int64_t)b * H + h) * D;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        if (is_bf16) {
            uint16_t *op = (uint16_t *)out + ooff;
            for (int d = 0; d < D; d++) op[d] = f32_to_bf16(acc[h][d] * inv);
        } else {
            float *op = (float *)out + ooff;
            for (int d = 0; d < D; d++) op[d] = acc[h][d] * inv;
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>
// AVX-512 version for D a multiple of 16: K/V rows converted 16 lanes at a time, dot products as 4 FMAs and
// one horizontal sum, V accumulated with broadcast FMAs. ~5x faster than the auto-vectorised loops above
// (whose `omp simd` reductions re-initialise a lane array for every dot product).
static inline __m512 load16(const void *p, int64_t off, const int is_bf16) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)p + off);
}

static inline __attribute__((always_inline)) void attn_seq_avx512(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *bt, int ctx, void *out, int b,
    const int Hkv, const int G, const int D, int bs, float scale, const int is_bf16) {
    const int H = Hkv * G, NV = D / 16;
    __m512 qv[MAX_H][MAX_D / 16], acc[MAX_H][MAX_D / 16];
    float m[MAX_H], l[MAX_H], s[MAX_H][MAX_BS];
    const int64_t tok_stride = (int64_t)Hkv * D;
    const int64_t blk_stride = (int64_t)bs * tok_stride;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int h = 0; h < H; h++) {
        for (int i = 0; i < NV; i++) {
            qv[h][i] = _mm512_mul_ps(load16(q, ((int64_t)b * H + h) * D + i * 16, is_bf16), sc);
            acc[h][i] = _mm512_setzero_ps();
        }
        m[h] = -INFINITY;
        l[h] = 0.f;
    }
    const int nblk = (ctx + bs - 1) / bs;
    for (int j = 0; j < nblk; j++) {
        const int n = (j == nblk - 1) ? ctx - j * bs : bs;
        const int64_t base = bt[j] * blk_stride;
        for (int t = 0; t < n; t++) {
            for (int kh = 0; kh < Hkv; kh++) {
                const int64_t off = base + t * tok_stride + (int64_t)kh * D;
                __m512 kv[MAX_D / 16];
                for (int i = 0; i < NV; i++) kv[i] = load16(k_cache, off + i * 16, is_bf16);
                for (int g = 0; g < G; g++) {
                    const int h = kh * G + g;
                    __m512 a = _mm512_mul_ps(qv[h][0], kv[0]);
                    for (int i = 1; i < NV; i++) a = _mm512_fmadd_ps(qv[h][i], kv[i], a);
                    s[h][t] = _mm512_reduce_add_ps(a);
                }
            }
        }
        for (int h = 0; h < H; h++) {
            float mx = m[h];
            for (int t = 0; t < n; t++) mx = s[h][t] > mx ? s[h][t] : mx;
            const float corr = m[h] == -INFINITY ? 0.f : exp_neg(m[h] - mx);
            l[h] *= corr;
            const __m512 cv = _mm512_set1_ps(corr);
            for (int i = 0; i < NV; i++) acc[h][i] = _mm512_mul_ps(acc[h][i], cv);
            float sum = 0.f;
            for (int t = 0; t < n; t++) {
                s[h][t] = exp_neg(s[h][t] - mx);
                sum += s[h][t];
            }
            l[h] += sum;
            m[h] = mx;
        }
        for (int t = 0; t < n; t++) {
            for (int kh = 0; kh < Hkv; kh++) {
                const int64_t off = base + t * tok_stride + (int64_t)kh * D;
                __m512 vv[MAX_D / 16];
                for (int i = 0; i < NV; i++) vv[i] = load16(v_cache, off + i * 16, is_bf16);
                for (int g = 0; g < G; g++) {
                    const int h = kh * G + g;
                    const __m512 p = _mm512_set1_ps(s[h][t]);
                    for (int i = 0; i < NV; i++) acc[h][i] = _mm512_fmadd_ps(p, vv[i], acc[h][i]);
                }
            }
        }
    }
    for (int h = 0; h < H; h++) {
        const __m512 inv = _mm512_set1_ps(l[h] > 0.f ? 1.f / l[h] : 0.f);
        const int64_t ooff = ((int64_t)b * H + h) * D;
        for (int i = 0; i < NV; i++) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[h][i], inv));
            if (is_bf16) {
                uint16_t *op = (uint16_t *)out + ooff + i * 16;
                for (int d = 0; d < 16; d++) op[d] = f32_to_bf16(tmp[d]);
            } else {
                memcpy((float *)out + ooff + i * 16, tmp, sizeof(tmp));
            }
        }
    }
}
#define ATTN_FAST attn_seq_avx512
#else
#define ATTN_FAST attn_seq
#endif

#define DISPATCH(HKV, GV, DV, BF)                                                                         \
    if (Hkv == HKV && G == GV && D == DV && is_bf16 == BF) {                                              \
        _Pragma("omp parallel for schedule(dynamic, 1)") for (int b = 0; b < B; b++)                      \
            ATTN_FAST(q, k_cache, v_cache, block_tables + (int64_t)b * max_blocks, ctx_lens[b], out, b, HKV, GV, DV, bs, scale, BF); \
        return 0;                                                                                         \
    }

// dtype: 0 = float32, 1 = bfloat16 (q, caches and out share it)
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                           const int32_t *ctx_lens, void *out, int B, int H, int Hkv, int D, int bs,
                           int max_blocks, float scale, int is_bf16) {
    const int G = H / Hkv;
    if (H > MAX_H || D > MAX_D || bs > MAX_BS) return -1;
    DISPATCH(3, 3, 64, 1)  // SmolLM2-135M
    DISPATCH(3, 3, 64, 0)
#pragma omp parallel for schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        if (D % 16 == 0)
            ATTN_FAST(q, k_cache, v_cache, block_tables + (int64_t)b * max_blocks, ctx_lens[b], out, b, Hkv, G, D, bs,
                      scale, is_bf16);
        else
            attn_seq(q, k_cache, v_cache, block_tables + (int64_t)b * max_blocks, ctx_lens[b], out, b, Hkv, G, D, bs,
                     scale, is_bf16);
    }
    return 0;
}

// y = W x for one bf16 row x (K) and a bf16 weight W (N, K) row-major; fp32 accumulation, bf16 output.
// With AVX512-BF16, vdpbf16ps does 32 multiply-adds per instruction; 4 rows per step share each x load.
// Returns -1 when the CPU or shape is not supported (the caller then uses torch).
int gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int N, int K) {
#if defined(__AVX512BF16__)
    if (K % 32 != 0 || K > 16384) return -1;
    const int KV = K / 32;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int rows = N - n0 < 4 ? N - n0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int kv = 0; kv < KV; kv++) {
            const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(x + kv * 32));
            for (int r = 0; r < rows; r++) {
                const __m512bh wb = (__m512bh)_mm512_loadu_si512((const void *)(w + (int64_t)(n0 + r) * K + kv * 32));
                acc[r] = _mm512_dpbf16_ps(acc[r], wb, xb);
            }
        }
        for (int r = 0; r < rows; r++) y[n0 + r] = f32_to_bf16(_mm512_reduce_add_ps(acc[r]));
    }
    return 0;
#else
    (void)w; (void)x; (void)y; (void)N; (void)K;
    return -1;
#endif
}

// RMSNorm of `rows` rows of `dim`, computed in fp32: out = x / rms(x) * w. x and out may have row strides.
int rms_norm(const void *x, const void *w, void *out, int rows, int dim, int64_t x_stride, float eps,
             int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
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

// y (1, N) = x W^T for int8 W (N, K) with per-row scales, the way llama.cpp runs its Q8_0 dot products: x is
// quantized to int8 with one scale (|x|max / 127), then vpdpbusd does 64 u8·s8 multiply-adds per instruction
// (x is offset by +128 to be unsigned; wsum[n] = Σ_k W[n,k] removes the offset).
int qgemv_int8_vnni(const void *x, const int8_t *w, const float *scales, const int32_t *wsum, void *y, int N, int K,
                    int is_bf16) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (K % 64 != 0 || K > 16384) return -1;
    uint8_t xu[16384];
    float amax = 0.f;
    for (int k = 0; k < K; k++) {
        const float v = fabsf(LOADF(x, k));
        amax = v > amax ? v : amax;
    }
    const float sx = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / sx;
    for (int k = 0; k < K; k++) xu[k] = (uint8_t)((int)lrintf(LOADF(x, k) * inv) + 128);
    const int KV = K / 64;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = w + (int64_t)n * K;
        __m512i acc = _mm512_setzero_si512();
        for (int kv = 0; kv < KV; kv++)
            acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512((const void *)(xu + kv * 64)),
                                      _mm512_loadu_si512((const void *)(row + kv * 64)));
        const float v = sx * scales[n] * (float)(_mm512_reduce_add_epi32(acc) - 128 * wsum[n]);
        if (is_bf16) ((uint16_t *)y)[n] = f32_to_bf16(v);
        else ((float *)y)[n] = v;
    }
    return 0;
#else
    (void)x; (void)w; (void)scales; (void)wsum; (void)y; (void)N; (void)K; (void)is_bf16;
    return -1;
#endif
}

// residual += x (rounded to the residual's dtype, as a separate add would), then out = RMSNorm(residual) * w.
int add_rms_norm(const void *x, void *residual, const void *w, void *out, int rows, int dim, float eps,
                 int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const int64_t base = (int64_t)r * dim;
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

// out (rows, inter) = silu(gu[:, :inter]) * gu[:, inter:], for the fused gate/up projection's output.
int silu_mul(const void *gu, void *out, int rows, int inter, int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const int64_t in = (int64_t)r * 2 * inter, o = (int64_t)r * inter;
#pragma omp simd
        for (int i = 0; i < inter; i++) {
            const float g = LOADF(gu, in + i), u = LOADF(gu, in + inter + i);
            // silu(g) * u: round the silu to the compute dtype first, as torch's separate ops do;
            // sigmoid via exp(-|g|) <= 1 so the polynomial exp_neg applies and the loop vectorises
            const float e = exp_neg(-fabsf(g));
            float s = g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
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
