// Dense bf16 weights: y (M, N) = x (M, K) · Wᵀ with fp32 accumulation, written as fp32 (the lm_head: sampling
// must never see bf16-rounded logits) or bf16 (decoder linears of one decode row).
// AVX512-BF16: vdpbf16ps, 32 multiply-adds per instruction; other vector tiers widen bf16 to fp32 and FMA.
// 4 weight rows per step share each x load; the M rows of x pass over them while they sit in L1.
#include "kernels.h"

static inline void store_out(void *y, int64_t o, float v, int out_f32) {
    if (out_f32)
        ((float *)y)[o] = v;
    else
        ((uint16_t *)y)[o] = f32_to_bf16(v);
}

#if defined(__AVX512BF16__)
// One row of x against blocks of 8 weight rows (8·K contiguous bf16), prefetching the rows two blocks ahead:
// streams the weights at ~31 GB/s on a 2-core Zen 4 against ~27 for the 4-row loop below (decode is
// bandwidth-bound: this is the single-stream bf16 speed).
static void gemv_bf16_rows8(const uint16_t *x, const uint16_t *w, void *y, int nblocks, int K, int out_f32) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        const uint16_t *wb = w + (int64_t)b * 8 * K;
        __m512 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 32) {
            const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
            for (int r = 0; r < 8; r++) {
                _mm_prefetch((const char *)(wb + (int64_t)(r + 16) * K + k), _MM_HINT_T0);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(wb + (int64_t)r * K + k)),
                                          xb);
            }
        }
        for (int r = 0; r < 8; r++) store_out(y, (int64_t)b * 8 + r, _mm512_reduce_add_ps(acc[r]), out_f32);
    }
}
#endif

int gemm_bf16(const uint16_t *x, int M, const uint16_t *w, void *y, int N, int K, int out_f32) {
    if (M < 1 || K % 32 != 0 || K > 16384) return -1;
    int n_start = 0;
#if defined(__AVX512BF16__)
    if (M == 1 && N >= 8) {  // single-stream decode: the bandwidth-bound case
        gemv_bf16_rows8(x, w, y, N / 8, K, out_f32);
        n_start = N / 8 * 8;
    }
#endif
#if defined(__AVX512BF16__) || defined(VW)
#pragma omp parallel for schedule(static)
    for (int n0 = n_start; n0 < N; n0 += 4) {
        const int rows = N - n0 < 4 ? N - n0 : 4;
        for (int m = 0; m < M; m++) {
            const uint16_t *xm = x + (int64_t)m * K;
            float dot[4];
#if defined(__AVX512BF16__)
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int k = 0; k < K; k += 32) {
                const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(xm + k));
                for (int r = 0; r < rows; r++) {
                    const __m512bh wb = (__m512bh)_mm512_loadu_si512((const void *)(w + (int64_t)(n0 + r) * K + k));
                    acc[r] = _mm512_dpbf16_ps(acc[r], wb, xb);
                }
            }
            for (int r = 0; r < rows; r++) dot[r] = _mm512_reduce_add_ps(acc[r]);
#else
            vf acc[4] = {vf_zero(), vf_zero(), vf_zero(), vf_zero()};
            for (int k = 0; k < K; k += VW) {
                const vf xv = vf_load(xm, k, 1);
                for (int r = 0; r < rows; r++) acc[r] = vf_fma(vf_load(w, (int64_t)(n0 + r) * K + k, 1), xv, acc[r]);
            }
            for (int r = 0; r < rows; r++) dot[r] = vf_hsum(acc[r]);
#endif
            for (int r = 0; r < rows; r++) store_out(y, (int64_t)m * N + n0 + r, dot[r], out_f32);
        }
    }
    return 0;
#else
    (void)x; (void)w; (void)y; (void)N; (void)out_f32; (void)n_start; (void)store_out;
    return -1;
#endif
}

// One decode row, bf16 out (the decoder linears of the fused decode step and models.blocks.Linear).
int gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int N, int K) {
    return gemm_bf16(x, 1, w, y, N, K, 0);
}
