// Dense bf16 weights: y (M, N) = x (M, K) · Wᵀ with fp32 accumulation, written as fp32 (the lm_head: sampling
// must never see bf16-rounded logits) or bf16 (decoder linears of decode and verification rows).
// AVX512-BF16: vdpbf16ps, 32 multiply-adds per instruction; other vector tiers widen bf16 to fp32 and FMA.
// Weights stream once per step whatever M is: blocks of 8 weight rows (prefetched two blocks ahead), and inside a
// block, tiles of 4 weight rows × up to MB_MAX activation rows keep one accumulator per (weight row, x row), so each
// weight vector is loaded once for all the tile's x rows (a 5-row verification step costs little more than 1 row).
// Every (weight row, x row) dot is the same instruction sequence whatever M and the tiling are (zeroed accumulator,
// k ascending, one horizontal sum), so a row's result does not depend on the rows beside it: verification rows equal
// plain decode rows bit for bit.
#include "kernels.h"

static inline void store_out(void *y, int64_t o, float v, int out_f32) {
    if (out_f32)
        ((float *)y)[o] = v;
    else
        ((uint16_t *)y)[o] = f32_to_bf16(v);
}

#if defined(__AVX512BF16__) || defined(VW)
#define TILE_R 4  // weight rows of a tile
#if defined(__AVX512F__)
#define MB_MAX 5  // x rows of a tile: 4·5 accumulators + 5 x + 1 w fit the 32 zmm registers
#else
#define MB_MAX 2  // AVX2: 4·2 accumulators + 2 x + 1 w fit the 16 ymm registers
#endif

// Weight rows w[0 .. R) (row stride K) against x rows x[0 .. MB) (row stride K) → y[m·N + r] (y already offset to
// the tile's first row and column). R and MB are literals at every call (see tile_dispatch), so the loops unroll
// and the accumulators live in registers. pf: where to prefetch (the rows two 8-row blocks ahead), or NULL.
static inline __attribute__((always_inline)) void tile(const uint16_t *x, const int MB, const uint16_t *w, const int R,
                                                       const int K, const uint16_t *pf, void *y, const int N,
                                                       const int out_f32) {
#if defined(__AVX512BF16__)
    __m512 acc[TILE_R][5];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __m512bh xb[5];
        for (int m = 0; m < MB; m++) xb[m] = (__m512bh)_mm512_loadu_si512((const void *)(x + (int64_t)m * K + k));
        for (int r = 0; r < R; r++) {
            if (pf) _mm_prefetch((const char *)(pf + (int64_t)r * K + k), _MM_HINT_T0);
            const __m512bh wb = (__m512bh)_mm512_loadu_si512((const void *)(w + (int64_t)r * K + k));
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wb, xb[m]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) store_out(y, (int64_t)m * N + r, _mm512_reduce_add_ps(acc[r][m]), out_f32);
#else
    vf acc[TILE_R][5];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r][m] = vf_zero();
    for (int k = 0; k < K; k += VW) {
        vf xv[5];
        for (int m = 0; m < MB; m++) xv[m] = vf_load(x, (int64_t)m * K + k, 1);
        for (int r = 0; r < R; r++) {
            if (pf && k % 32 == 0) _mm_prefetch((const char *)(pf + (int64_t)r * K + k), _MM_HINT_T0);
            const vf wv = vf_load(w, (int64_t)r * K + k, 1);
            for (int m = 0; m < MB; m++) acc[r][m] = vf_fma(wv, xv[m], acc[r][m]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) store_out(y, (int64_t)m * N + r, vf_hsum(acc[r][m]), out_f32);
#endif
}

// One specialised body per (R, MB): the unrolled loops need literal bounds.
#define TILE_CASE(RR, MM) \
    case (RR) * 8 + (MM): \
        tile(x, MM, w, RR, K, pf, y, N, out_f32); \
        return;
static void tile_dispatch(const uint16_t *x, int MB, const uint16_t *w, int R, int K, const uint16_t *pf, void *y,
                          int N, int out_f32) {
    switch (R * 8 + MB) {
        TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(2, 1) TILE_CASE(2, 2)
        TILE_CASE(1, 1) TILE_CASE(1, 2)
#if defined(__AVX512F__)
        TILE_CASE(4, 3) TILE_CASE(4, 4) TILE_CASE(4, 5) TILE_CASE(3, 3) TILE_CASE(3, 4) TILE_CASE(3, 5)
        TILE_CASE(2, 3) TILE_CASE(2, 4) TILE_CASE(2, 5) TILE_CASE(1, 3) TILE_CASE(1, 4) TILE_CASE(1, 5)
#endif
    }
}

// Weight rows [n_start, N) in blocks of 8 against all M rows of x.
static void gemm_bf16_tiles(const uint16_t *x, int M, const uint16_t *w, void *y, int n_start, int N, int K,
                            int out_f32) {
    const int nch = (M + MB_MAX - 1) / MB_MAX;  // x-row chunks of near-equal size (8 rows: 4 + 4, not 5 + 3)
    const int nblocks = (N - n_start + 7) / 8;
    const int64_t esz = out_f32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        const int n0 = n_start + b * 8, rows = N - n0 < 8 ? N - n0 : 8;
        for (int r0 = 0; r0 < rows; r0 += TILE_R) {
            const int R = rows - r0 < TILE_R ? rows - r0 : TILE_R;
            const uint16_t *wr = w + (int64_t)(n0 + r0) * K;
            for (int c = 0, m0 = 0; c < nch; c++) {
                const int mb = M / nch + (c < M % nch);
                // the first pass over these weight rows prefetches the rows two blocks ahead; later passes hit L1
                const uint16_t *pf = c == 0 && n0 + 16 < N ? wr + (int64_t)16 * K : NULL;
                tile_dispatch(x + (int64_t)m0 * K, mb, wr, R, K, pf, (char *)y + ((int64_t)m0 * N + n0 + r0) * esz, N,
                              out_f32);
                m0 += mb;
            }
        }
    }
}
#endif

#if defined(__AVX512BF16__)
// One row of x against blocks of 8 weight rows (8·K contiguous bf16), prefetching the rows two blocks ahead:
// streams the weights at ~31 GB/s on a 2-core Zen 4 against ~27 for 4-row tiles (decode is bandwidth-bound: this is
// the single-stream bf16 speed). The same per-row sequence as tile(), so its results equal the tiles'.
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
#if defined(__AVX512BF16__) || defined(VW)
    int n_start = 0;
#if defined(__AVX512BF16__)
    if (M == 1 && N >= 8) {  // single-stream decode: the bandwidth-bound case
        gemv_bf16_rows8(x, w, y, N / 8, K, out_f32);
        n_start = N / 8 * 8;
    }
#endif
    if (n_start < N) gemm_bf16_tiles(x, M, w, y, n_start, N, K, out_f32);
    return 0;
#else
    (void)x; (void)w; (void)y; (void)N; (void)out_f32; (void)store_out;
    return -1;
#endif
}

// One decode row, bf16 out (models.blocks.Linear's single-row path).
int gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int N, int K) {
    return gemm_bf16(x, 1, w, y, N, K, 0);
}
