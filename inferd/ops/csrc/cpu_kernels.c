// inferd CPU kernels, called through ctypes on raw tensor memory (built at first use, see ops/cpu_kernels.py).
//
// paged_decode_attention: one query token per sequence against its K/V read in place from the paged cache
// (no gather copy). Parallel over (sequence, kv head); the G query heads of a KV head share every K/V load;
// online softmax one block of tokens at a time.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

// round to nearest even bf16 (as f32_to_bf16), kept as fp32
static inline __m512 round_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline void store16(void *p, int64_t off, __m512 v, const int is_bf16) {
    if (!is_bf16) {
        _mm512_storeu_ps((float *)p + off, v);
        return;
    }
    const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + off), _mm512_cvtepi32_epi16(u));
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
        for (int i = 0; i < NV; i++) store16(out, ooff + i * 16, _mm512_mul_ps(acc[h][i], inv), is_bf16);
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

// ---- 16-wide fp32 helpers for the row-wise kernels below (same rounding as the scalar code) ----
#ifdef __AVX512F__
static inline __m512 v16_exp_neg(__m512 x) {  // exp_neg, 16 lanes
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, fi);
}
// Σ v² of one row of dim values (dim % 16 == 0).
static inline float v16_sumsq(const void *x, int64_t base, int dim, int is_bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < dim; d += 16) {
        const __m512 v = load16(x, base + d, is_bf16);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}
// out[r] = (round(x · inv) · w) for one row: the scaling half of RMSNorm (dim % 16 == 0).
static inline void v16_scale_row(const void *x, int64_t xbase, const void *w, void *out, int64_t obase, int dim,
                                 float inv, int is_bf16) {
    const __m512 vi = _mm512_set1_ps(inv);
    for (int d = 0; d < dim; d += 16) {
        __m512 v = _mm512_mul_ps(load16(x, xbase + d, is_bf16), vi);
        if (is_bf16) v = round_bf16(v);
        store16(out, obase + d, _mm512_mul_ps(v, load16(w, d, is_bf16)), is_bf16);
    }
}
#endif

// paged_prefill_attention: the query rows of C prefill chunks (chunk c: q_lens[c] consecutive rows of the
// flat batch from q_starts[c], the last q_lens[c] positions of a context of ctx_lens[c] tokens) against
// their context read in place from the paged cache, causal (the chunk's own K/V are already written). One
// work item is (chunk, KV head, tile of PF_QT rows): it converts each run of 16 keys once (K transposed to
// D × 16 so one FMA chain scores 16 keys for a query), shared by the tile's rows and the G query heads of
// the KV head; online softmax per query. Replaces one SDPA call per chunk and the gather of its context.
#define PF_QT 16
int paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                            const int32_t *q_starts, const int32_t *q_lens, const int32_t *ctx_lens, void *out,
                            int C, int H, int Hkv, int D, int bs, int max_blocks, float scale, int is_bf16) {
#ifdef __AVX512F__
    if (Hkv <= 0 || H % Hkv || D % 16 || bs % 16 || D > MAX_D || H > MAX_H) return -1;
    const int G = H / Hkv, NV = D / 16, NQ = PF_QT * G;
    int n_items = 0;
    for (int c = 0; c < C; c++) n_items += (q_lens[c] + PF_QT - 1) / PF_QT * Hkv;
    int *items = malloc(sizeof(int) * 3 * (size_t)(n_items ? n_items : 1));
    if (!items) return -2;
    for (int c = 0, k = 0; c < C; c++)
        for (int t = 0; t < (q_lens[c] + PF_QT - 1) / PF_QT; t++)
            for (int kh = 0; kh < Hkv; kh++, k++) {
                items[3 * k] = c;
                items[3 * k + 1] = t;
                items[3 * k + 2] = kh;
            }
    const int64_t tok_stride = (int64_t)Hkv * D, blk_stride = (int64_t)bs * tok_stride;
    int failed = 0;
#pragma omp parallel
    {
        float *qf = aligned_alloc(64, sizeof(float) * NQ * D), *acc = aligned_alloc(64, sizeof(float) * NQ * D);
        float *kt = aligned_alloc(64, sizeof(float) * D * 16), *vf = aligned_alloc(64, sizeof(float) * 16 * D);
        float *m = malloc(sizeof(float) * NQ), *l = malloc(sizeof(float) * NQ);
        if (!qf || !acc || !kt || !vf || !m || !l) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            if (failed) continue;
            const int c = items[3 * it], r0 = items[3 * it + 1] * PF_QT, kh = items[3 * it + 2];
            const int r1 = q_lens[c] < r0 + PF_QT ? q_lens[c] : r0 + PF_QT, nr = r1 - r0;
            const int pos0 = ctx_lens[c] - q_lens[c];  // position of the chunk's first row
            const int64_t *bt = block_tables + (int64_t)c * max_blocks;
            const __m512 sc = _mm512_set1_ps(scale);
            for (int rr = 0; rr < nr; rr++)
                for (int g = 0; g < G; g++) {
                    const int j = rr * G + g;
                    const int64_t qoff = ((int64_t)(q_starts[c] + r0 + rr) * H + kh * G + g) * D;
                    for (int i = 0; i < NV; i++) {
                        _mm512_store_ps(qf + (int64_t)j * D + i * 16, _mm512_mul_ps(load16(q, qoff + i * 16, is_bf16), sc));
                        _mm512_store_ps(acc + (int64_t)j * D + i * 16, _mm512_setzero_ps());
                    }
                    m[j] = -INFINITY;
                    l[j] = 0.f;
                }
            const int nk = pos0 + r1;  // keys 0 .. nk-1 are visible to some row of the tile
            const __m512i sidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi32(16));
            for (int k0 = 0; k0 < nk; k0 += 16) {
                const int n = nk - k0 < 16 ? nk - k0 : 16;
                const int64_t base = bt[k0 / bs] * blk_stride + (int64_t)(k0 % bs) * tok_stride + (int64_t)kh * D;
                for (int t = 0; t < 16; t++) {
                    if (t < n) {
                        const int64_t off = base + t * tok_stride;
                        for (int i = 0; i < NV; i++) {  // K row → column t of kt (a scatter with stride 16)
                            _mm512_i32scatter_ps(kt + i * 256 + t, sidx, load16(k_cache, off + i * 16, is_bf16), 4);
                            _mm512_store_ps(vf + t * D + i * 16, load16(v_cache, off + i * 16, is_bf16));
                        }
                    } else {
                        for (int d = 0; d < D; d++) kt[d * 16 + t] = 0.f;
                    }
                }
                // queries j = rr * G + g, four at a time (four independent FMA chains); row rr sees the
                // first lim = pos0 + r0 + rr - k0 + 1 keys of this run (none when <= 0: rows ascend, so skip ahead)
                int jstart = (k0 - pos0 - r0) * G;
                if (jstart < 0) jstart = 0;
                for (int j0 = jstart; j0 < nr * G; j0 += 4) {
                    const int nq = nr * G - j0 < 4 ? nr * G - j0 : 4;
                    __m512 sq[4];
                    __mmask16 vis[4];
                    for (int u = 0; u < 4; u++) {
                        sq[u] = _mm512_setzero_ps();
                        int lim = u < nq ? pos0 + r0 + (j0 + u) / G - k0 + 1 : 0;
                        lim = lim < 0 ? 0 : (lim > n ? n : lim);
                        vis[u] = (__mmask16)((1u << lim) - 1u);
                    }
                    const float *q0 = qf + (int64_t)j0 * D;
                    if (nq == 4) {
                        for (int d = 0; d < D; d++) {
                            const __m512 kd = _mm512_load_ps(kt + d * 16);
                            sq[0] = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), kd, sq[0]);
                            sq[1] = _mm512_fmadd_ps(_mm512_set1_ps(q0[D + d]), kd, sq[1]);
                            sq[2] = _mm512_fmadd_ps(_mm512_set1_ps(q0[2 * D + d]), kd, sq[2]);
                            sq[3] = _mm512_fmadd_ps(_mm512_set1_ps(q0[3 * D + d]), kd, sq[3]);
                        }
                    } else {
                        for (int d = 0; d < D; d++) {
                            const __m512 kd = _mm512_load_ps(kt + d * 16);
                            for (int u = 0; u < nq; u++) sq[u] = _mm512_fmadd_ps(_mm512_set1_ps(q0[u * D + d]), kd, sq[u]);
                        }
                    }
                    float pt[4][16], corr[4];
                    for (int u = 0; u < nq; u++) {
                        const int j = j0 + u;
                        if (!vis[u]) {  // row sees none of these keys: p = 0, nothing changes
                            memset(pt[u], 0, sizeof(pt[u]));
                            corr[u] = 1.f;
                            continue;
                        }
                        const float mx_run = _mm512_mask_reduce_max_ps(vis[u], sq[u]);
                        const float mx = mx_run > m[j] ? mx_run : m[j];
                        corr[u] = m[j] == -INFINITY ? 0.f : exp_neg(m[j] - mx);
                        const __m512 p = _mm512_maskz_mov_ps(vis[u], v16_exp_neg(_mm512_sub_ps(sq[u], _mm512_set1_ps(mx))));
                        l[j] = l[j] * corr[u] + _mm512_reduce_add_ps(p);
                        m[j] = mx;
                        _mm512_storeu_ps(pt[u], p);
                    }
                    for (int i = 0; i < NV; i++) {
                        __m512 a[4];
                        for (int u = 0; u < nq; u++)
                            a[u] = _mm512_mul_ps(_mm512_load_ps(acc + (int64_t)(j0 + u) * D + i * 16), _mm512_set1_ps(corr[u]));
                        for (int t = 0; t < n; t++) {
                            const __m512 vt = _mm512_load_ps(vf + t * D + i * 16);
                            for (int u = 0; u < nq; u++) a[u] = _mm512_fmadd_ps(_mm512_set1_ps(pt[u][t]), vt, a[u]);
                        }
                        for (int u = 0; u < nq; u++) _mm512_store_ps(acc + (int64_t)(j0 + u) * D + i * 16, a[u]);
                    }
                }
            }
            for (int rr = 0; rr < nr; rr++)
                for (int g = 0; g < G; g++) {
                    const int j = rr * G + g;
                    const __m512 inv = _mm512_set1_ps(l[j] > 0.f ? 1.f / l[j] : 0.f);
                    const int64_t ooff = ((int64_t)(q_starts[c] + r0 + rr) * H + kh * G + g) * D;
                    for (int i = 0; i < NV; i++)
                        store16(out, ooff + i * 16, _mm512_mul_ps(_mm512_load_ps(acc + (int64_t)j * D + i * 16), inv), is_bf16);
                }
        }
        free(qf);
        free(acc);
        free(kt);
        free(vf);
        free(m);
        free(l);
    }
    free(items);
    return failed ? -2 : 0;
#else
    (void)q; (void)k_cache; (void)v_cache; (void)block_tables; (void)q_starts; (void)q_lens; (void)ctx_lens;
    (void)out; (void)C; (void)H; (void)Hkv; (void)D; (void)bs; (void)max_blocks; (void)scale; (void)is_bf16;
    return -1;
#endif
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
#ifdef __AVX512F__
        if (dim % 16 == 0) {
            const float inv = 1.f / sqrtf(v16_sumsq(x, r * x_stride, dim, is_bf16) / dim + eps);
            v16_scale_row(x, r * x_stride, w, out, (int64_t)r * dim, dim, inv, is_bf16);
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
#ifdef __AVX512F__
        if (dim % 16 == 0) {
            for (int d = 0; d < dim; d += 16) {  // residual += x, rounded to the residual's dtype
                const __m512 v = _mm512_add_ps(load16(x, base + d, is_bf16), load16(residual, base + d, is_bf16));
                store16(residual, base + d, v, is_bf16);
            }
            const float inv = 1.f / sqrtf(v16_sumsq(residual, base, dim, is_bf16) / dim + eps);
            v16_scale_row(residual, base, w, out, base, dim, inv, is_bf16);
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

// out (rows, inter) = silu(gu[:, :inter]) * gu[:, inter:], for the fused gate/up projection's output.
int silu_mul(const void *gu, void *out, int rows, int inter, int is_bf16) {
#pragma omp parallel for schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) {
        const int64_t in = (int64_t)r * 2 * inter, o = (int64_t)r * inter;
        int i0 = 0;
#ifdef __AVX512F__
        for (; i0 + 16 <= inter; i0 += 16) {
            const __m512 g = load16(gu, in + i0, is_bf16), u = load16(gu, in + inter + i0, is_bf16);
            const __m512 e = v16_exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            const __m512 one = _mm512_set1_ps(1.f);
            const __mmask16 pos = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
            const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(pos, e, one), _mm512_add_ps(one, e));
            __m512 sv = _mm512_mul_ps(g, sig);
            if (is_bf16) sv = round_bf16(sv);
            store16(out, o + i0, _mm512_mul_ps(sv, u), is_bf16);
        }
#endif
#pragma omp simd
        for (int i = i0; i < inter; i++) {
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

// ---- 4-bit weights in a row-interleaved layout for AVX512-VNNI (int8 activations, as llama.cpp) ----
// Made once at load by inferd/quant/linear.py (pack_q4_vnni). For row block rb (16 rows), group g (32 weights
// along K), chunk c (8 weights), row j, byte b: low nibble = q[16rb+j][32g+8c+b], high nibble =
// q[16rb+j][32g+8c+4+b], so one 64-byte load holds 8 weights of each of 16 rows and a vpdpbusd lane is a row.
// dm: fp16 (rb, g, [d, m], j) with w = d·q + m. Activations are quantized per group of 32 to int8 (scale
// |x|max/127); y = Σ_g dx_g (d_g Σ q·xq + m_g Σ xq). No horizontal sums: 16 outputs per accumulator.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#ifndef Q4_MCHUNK
#define Q4_MCHUNK 8  // rows per pass over a row block's weights (accumulators in registers)
#endif
#define Q4_MAXK 16384
#include <stdlib.h>

// one row of K activations → int8 per group of 32, with dx (scale) and sx = dx · Σ xq per group
static void quantize_q8_32(const void *x, int64_t off, int K, int is_bf16, int8_t *xq, float *dx, float *sx) {
    for (int g = 0; g < K / 32; g++) {
        const __m512 a = load16(x, off + g * 32, is_bf16), b = load16(x, off + g * 32 + 16, is_bf16);
        const __m512 absmax = _mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b));
        const float amax = _mm512_reduce_max_ps(absmax);
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
        const __m512i ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(xq + g * 32), _mm512_cvtsepi32_epi8(ia));
        _mm_storeu_si128((__m128i *)(xq + g * 32 + 16), _mm512_cvtsepi32_epi8(ib));
        dx[g] = d;
        sx[g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
    }
}

// M rows of K activations → int8 per group of 32 (row-major, in a per-thread buffer that grows as needed), with
// dx (M, K/32) scales and sx = dx · Σ xq per group; NULL if the buffer cannot be allocated.
static const int8_t *quantize_rows_q8_32(const void *x, int M, int K, int is_bf16, const float **dx, const float **sx) {
    static __thread int8_t *xq = NULL;
    static __thread float *dsx = NULL;
    static __thread int cap = 0;
    if (M * K > cap) {
        free(xq);
        free(dsx);
        cap = M * K;
        xq = (int8_t *)aligned_alloc(64, ((size_t)cap + 63) / 64 * 64);
        dsx = (float *)malloc(sizeof(float) * 2 * (size_t)(cap / 32));
        if (!xq || !dsx) {
            cap = 0;
            return NULL;
        }
    }
    const int G = K / 32;
    for (int m = 0; m < M; m++)
        quantize_q8_32(x, (int64_t)m * K, K, is_bf16, xq + (int64_t)m * K, dsx + m * G, dsx + M * G + m * G);
    *dx = dsx;
    *sx = dsx + M * G;
    return xq;
}

// y (M, N) = x (M, K) · Wᵀ for any M (decode and prefill: the same numerics everywhere). Each thread takes row blocks; for each, the rows of x pass over its weights in
// chunks of Q4_MCHUNK (the block's weights stay in L1 between chunks), so DRAM reads each weight once.
int q4_gemm_vnni(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16) {
    if (M < 1 || N % 16 || K % 32 || K > Q4_MAXK) return -1;
    const int G = K / 32;
    const float *dx, *sx;
    const int8_t *xqp = quantize_rows_q8_32(x, M, K, is_bf16, &dx, &sx);
    if (!xqp) return -1;
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < N / 16; rb++) {
        const __m512i mask = _mm512_set1_epi8(0x0F);
        const uint8_t *wb = w + (int64_t)rb * G * 256;
        const uint16_t *db = dm + (int64_t)rb * G * 32;
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m512 acc[Q4_MCHUNK];
            for (int m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const __m512i *wp = (const __m512i *)(wb + (int64_t)g * 256);
                const __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 1);
                const __m512i w2 = _mm512_loadu_si512(wp + 2), w3 = _mm512_loadu_si512(wp + 3);
                const __m512i l0 = _mm512_and_si512(w0, mask), h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), mask);
                const __m512i l1 = _mm512_and_si512(w1, mask), h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), mask);
                const __m512i l2 = _mm512_and_si512(w2, mask), h2 = _mm512_and_si512(_mm512_srli_epi16(w2, 4), mask);
                const __m512i l3 = _mm512_and_si512(w3, mask), h3 = _mm512_and_si512(_mm512_srli_epi16(w3, 4), mask);
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(db + g * 32)));
                const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(db + g * 32 + 16)));
                for (int m = 0; m < mc; m++) {
                    const int64_t row = m0 + m;
                    const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, _mm512_set1_epi32(xg[0]));
                    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l1, _mm512_set1_epi32(xg[2]));
                    s0 = _mm512_dpbusd_epi32(s0, h0, _mm512_set1_epi32(xg[1]));
                    s1 = _mm512_dpbusd_epi32(s1, h1, _mm512_set1_epi32(xg[3]));
                    s0 = _mm512_dpbusd_epi32(s0, l2, _mm512_set1_epi32(xg[4]));
                    s1 = _mm512_dpbusd_epi32(s1, l3, _mm512_set1_epi32(xg[6]));
                    s0 = _mm512_dpbusd_epi32(s0, h2, _mm512_set1_epi32(xg[5]));
                    s1 = _mm512_dpbusd_epi32(s1, h3, _mm512_set1_epi32(xg[7]));
                    const __m512 sf = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    acc[m] = _mm512_fmadd_ps(sf, _mm512_mul_ps(d, _mm512_set1_ps(dx[row * G + g])), acc[m]);
                    acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[row * G + g]), acc[m]);
                }
            }
            for (int m = 0; m < mc; m++) store16(y, (int64_t)(m0 + m) * N + rb * 16, acc[m], is_bf16);
        }
    }
    return 0;
}

// ---- int8 weights with a scale per group of 32 (llama.cpp's Q8_0), row-interleaved for AVX512-VNNI ----
// Layout: w[N/16][K/4][16][4] bytes holding q + 128 (unsigned): one 64-byte load = 4 consecutive k of 16 rows,
// so a vpdpbusd lane is a row and no horizontal sums are needed; d: fp16 [N/16][K/32][16]. Activations are
// quantized per group of 32 too, so y = Σ_g d_g dx_g (Σ (q+128)·xq − 128 Σ xq): the offset needs only Σ xq.
int q8_gemm_vnni(const void *x, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16) {
    if (M < 1 || N % 16 || K % 32 || K > Q4_MAXK) return -1;
    const int K4 = K / 4, G = K / 32;
    const float *dx, *sx;
    const int8_t *xqp = quantize_rows_q8_32(x, M, K, is_bf16, &dx, &sx);
    if (!xqp) return -1;
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < N / 16; rb++) {
        const uint8_t *wb = w + (int64_t)rb * K4 * 64;
        const uint16_t *db = dw + (int64_t)rb * G * 16;
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m512 acc[Q4_MCHUNK];
            for (int m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const __m512i *wp = (const __m512i *)(wb + (int64_t)g * 512);
                if (m0 == 0)  // stream ahead: 4 groups (2 KB) of this row block
                    for (int c = 0; c < 8; c++) _mm_prefetch((const char *)(wp + 32 + c), _MM_HINT_T0);
                __m512i wv[8];
                for (int c = 0; c < 8; c++) wv[c] = _mm512_loadu_si512(wp + c);
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(db + g * 16)));
                for (int m = 0; m < mc; m++) {
                    const int64_t row = m0 + m;
                    const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_set1_epi32(xg[0]));
                    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], _mm512_set1_epi32(xg[1]));
                    s0 = _mm512_dpbusd_epi32(s0, wv[2], _mm512_set1_epi32(xg[2]));
                    s1 = _mm512_dpbusd_epi32(s1, wv[3], _mm512_set1_epi32(xg[3]));
                    s0 = _mm512_dpbusd_epi32(s0, wv[4], _mm512_set1_epi32(xg[4]));
                    s1 = _mm512_dpbusd_epi32(s1, wv[5], _mm512_set1_epi32(xg[5]));
                    s0 = _mm512_dpbusd_epi32(s0, wv[6], _mm512_set1_epi32(xg[6]));
                    s1 = _mm512_dpbusd_epi32(s1, wv[7], _mm512_set1_epi32(xg[7]));
                    const __m512 sf = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    // d · (dx · Σ (q+128)·xq − 128 · dx · Σ xq)   (sx = dx · Σ xq)
                    const __m512 t = _mm512_fmadd_ps(sf, _mm512_set1_ps(dx[row * G + g]),
                                                     _mm512_set1_ps(-128.f * sx[row * G + g]));
                    acc[m] = _mm512_fmadd_ps(t, d, acc[m]);
                }
            }
            for (int m = 0; m < mc; m++) store16(y, (int64_t)(m0 + m) * N + rb * 16, acc[m], is_bf16);
        }
    }
    return 0;
}
#else
int q4_gemm_vnni(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16) {
    (void)x; (void)M; (void)w; (void)dm; (void)y; (void)N; (void)K; (void)is_bf16;
    return -1;
}
int q8_gemm_vnni(const void *x, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16) {
    (void)x; (void)M; (void)w; (void)dw; (void)y; (void)N; (void)K; (void)is_bf16;
    return -1;
}
#endif

// ---- the decoder stack of a Llama-family model for decode rows, in one call ----
// Per layer: (add +) RMSNorm, qkv, rotary, K/V write, paged attention, o, add + RMSNorm, gate_up, silu·mul,
// down — the same kernels the Python path calls one by one, without ~100 Python-level calls per layer.
typedef struct {
    int kind;  // 0: bf16 dense (gemv_bf16, one row), 1: 4-bit q4vnni, 2: int8 q8vnni
    int N, K;
    const void *w, *a1, *a2;  // weights; kind 1: dm; kind 2: fp16 scales
} lin_desc;

typedef struct {
    const void *in_norm, *post_norm;
    lin_desc qkv, o, gate_up, down;
    void *k_cache, *v_cache;  // this layer's (num_blocks, bs, Hkv, D) halves
} layer_desc;

typedef struct {
    int M, H, Hkv, D, hidden, inter, rot_dim, bs, max_blocks, is_bf16, first;
    float eps, scale;
    const int64_t *positions, *slots, *block_tables;
    const int32_t *ctx_lens;
    const float *cos, *sin;
    void *x, *residual;                // (M, hidden): layer input/output and the residual stream
    void *h, *qkv, *q, *attn, *gu, *act;  // workspaces
} step_desc;

static int linear_run(const lin_desc *l, const void *x, void *y, int M, int is_bf16) {
    switch (l->kind) {
    case 0:
        return M == 1 && is_bf16 ? gemv_bf16((const uint16_t *)l->w, (const uint16_t *)x, (uint16_t *)y, l->N, l->K) : -1;
    case 1:
        return q4_gemm_vnni(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16);
    case 2:
        return q8_gemm_vnni(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16);
    }
    return -1;
}

int decode_layers(const layer_desc *layers, int n_layers, const step_desc *s) {
    const int M = s->M, E = s->is_bf16 ? 2 : 4;
    const int qdim = s->H * s->D, kvdim = s->Hkv * s->D, qkvdim = qdim + 2 * kvdim;
    char *qkv = (char *)s->qkv;
    for (int i = 0; i < n_layers; i++) {
        const layer_desc *L = layers + i;
        if (i == 0 && s->first) {
            memcpy(s->residual, s->x, (size_t)M * s->hidden * E);
            rms_norm(s->x, L->in_norm, s->h, M, s->hidden, s->hidden, s->eps, s->is_bf16);
        } else {
            add_rms_norm(s->x, s->residual, L->in_norm, s->h, M, s->hidden, s->eps, s->is_bf16);
        }
        if (linear_run(&L->qkv, s->h, qkv, M, s->is_bf16)) return -1;
        rope_inplace(qkv, M, s->H, s->D, qkvdim, s->rot_dim, s->cos, s->sin, s->positions, s->is_bf16);
        rope_inplace(qkv + (size_t)qdim * E, M, s->Hkv, s->D, qkvdim, s->rot_dim, s->cos, s->sin, s->positions,
                     s->is_bf16);
        for (int m = 0; m < M; m++) {
            const char *row = qkv + (size_t)m * qkvdim * E;
            memcpy((char *)s->q + (size_t)m * qdim * E, row, (size_t)qdim * E);
            memcpy((char *)L->k_cache + (size_t)s->slots[m] * kvdim * E, row + (size_t)qdim * E, (size_t)kvdim * E);
            memcpy((char *)L->v_cache + (size_t)s->slots[m] * kvdim * E, row + (size_t)(qdim + kvdim) * E,
                   (size_t)kvdim * E);
        }
        if (paged_decode_attention(s->q, L->k_cache, L->v_cache, s->block_tables, s->ctx_lens, s->attn, M, s->H,
                                   s->Hkv, s->D, s->bs, s->max_blocks, s->scale, s->is_bf16))
            return -1;
        if (linear_run(&L->o, s->attn, s->x, M, s->is_bf16)) return -1;
        add_rms_norm(s->x, s->residual, L->post_norm, s->h, M, s->hidden, s->eps, s->is_bf16);
        if (linear_run(&L->gate_up, s->h, s->gu, M, s->is_bf16)) return -1;
        silu_mul(s->gu, s->act, M, s->inter, s->is_bf16);
        if (linear_run(&L->down, s->act, s->x, M, s->is_bf16)) return -1;
    }
    return 0;
}
