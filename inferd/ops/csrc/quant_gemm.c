// Quantized weights with int8 activations (llama.cpp's scheme): 4-bit (Q4_0/Q4_1/int4 groups of 32) and
// 8-bit (Q8_0/int8 groups of 32) weights in row-interleaved layouts made once at load by inferd/quant/linear.py.
// Two bodies per format over the same layout: AVX512-VNNI (vpdpbusd, 16 rows per accumulator) and AVX2
// (vpmaddubsw + vpmaddwd over 8 rows per half), used on AVX2 CPUs and on AVX-512 CPUs without VNNI. Their
// integer dot products are exact and the float steps identical, so both give bit-identical outputs.
#include "kernels.h"

#ifndef Q4_PAR_QUANT
#define Q4_PAR_QUANT 16384  // activations (rows × K) from which the rows are quantized in parallel
#endif
#ifndef Q4_MCHUNK
#define Q4_MCHUNK 8  // rows per pass over a row block's weights (accumulators in registers)
#endif

// One row of K activations → int8 per group of 32 (scale |x|max/127, round to nearest even, as
// _mm512_cvtps_epi32), with dx (scale), sx = dx · Σ xq and isum = Σ xq per group. Plain C, bit-identical on
// every tier; it vectorises.
static void quantize_q8_32(const void *x, int64_t off, int K, int is_bf16, int8_t *xq, float *dx, float *sx,
                           int32_t *isum, int32_t *isum8) {
#if defined(VW) && VW == 16  // the same steps 16 lanes at a time (a hot path: every quantized linear, every step)
    for (int g = 0; g < K / 32; g++) {
        const __m512 a = vf_load(x, off + g * 32, is_bf16), b = vf_load(x, off + g * 32 + 16, is_bf16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
        const __m512i ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(xq + g * 32), _mm512_cvtsepi32_epi8(ia));
        _mm_storeu_si128((__m128i *)(xq + g * 32 + 16), _mm512_cvtsepi32_epi8(ib));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
        dx[g] = d;
        sx[g] = d * (float)sum;
        isum[g] = sum;
        isum8[g] = -8 * sum;
    }
    return;
#endif
    for (int g = 0; g < K / 32; g++) {
        float v[32], amax = 0.f;
        for (int i = 0; i < 32; i++) {
            v[i] = LOADF(x, off + g * 32 + i);
            amax = fmaxf(amax, fabsf(v[i]));
        }
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int i = 0; i < 32; i++) {
            int32_t q = (int32_t)nearbyintf(v[i] * id);
            q = q > 127 ? 127 : (q < -128 ? -128 : q);
            xq[g * 32 + i] = (int8_t)q;
            s += q;
        }
        dx[g] = d;
        sx[g] = d * (float)s;
        isum[g] = s;
        isum8[g] = -8 * s;
    }
}

// M rows of K activations → int8 per group of 32 (row-major, in a per-thread buffer that grows as needed), with
// dx, sx, isum (M, K/32) per group (isum followed by −8 · isum, the offset of symmetric 4-bit weights); NULL if
// the buffer cannot be allocated.
static __attribute__((unused)) const int8_t *quantize_rows_q8_32(const void *x, int M, int K, int is_bf16, const float **dx,
                                         const float **sx, const int32_t **isum) {
    static __thread int8_t *xq = NULL;
    static __thread float *dsx = NULL;
    static __thread int32_t *is = NULL;
    static __thread int cap = 0;
    if (M * K > cap) {
        free(xq);
        free(dsx);
        free(is);
        cap = M * K;
        xq = (int8_t *)aligned_alloc(64, ((size_t)cap + 63) / 64 * 64);
        dsx = (float *)malloc(sizeof(float) * 2 * (size_t)(cap / 32));
        is = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)(cap / 32));  // Σ xq, then −8 Σ xq
        if (!xq || !dsx || !is) {
            cap = 0;
            return NULL;
        }
    }
    const int G = K / 32;
    int8_t *const q = xq;  // (the buffers as this thread holds them: in the parallel loop each thread would read
    float *const ds = dsx;  // its own thread-local pointers)
    int32_t *const su = is;
    // rows split between the threads once there are enough (one thread: ~15 µs for 16 rows of K = 2048, ~60 µs
    // for 16 of K = 8192)
#pragma omp parallel for schedule(static) if (M > 1 && (int64_t)M * K >= Q4_PAR_QUANT)
    for (int m = 0; m < M; m++)
        quantize_q8_32(x, (int64_t)m * K, K, is_bf16, q + (int64_t)m * K, ds + m * G, ds + M * G + m * G, su + m * G,
                       su + M * G + m * G);
    *dx = dsx;
    *sx = dsx + M * G;
    *isum = is;
    return xq;
}

// A step's activations, quantized once per GEMM call (see quantize_rows_q8_32).
typedef struct {
    const int8_t *xq;
    const float *dx, *sx;
    const int32_t *isum;
    const int32_t *isum16;  // Σ xq per 16 (M, K/32, 2), for symmetric weights with scales per 16 (else NULL)
    const int32_t *isum8;   // −8 Σ xq per 32 (M, K/32): the offset of symmetric 4-bit weights, ready to broadcast
} qact;

// ---- 4-bit weights in a row-interleaved layout for AVX512-VNNI (int8 activations, as llama.cpp) ----
// Made once at load by inferd/quant/linear.py (pack_q4_rows16). For row block rb (16 rows), group g (32 weights
// along K), chunk c (8 weights), row j, byte b: low nibble = q[16rb+j][32g+8c+b], high nibble =
// q[16rb+j][32g+8c+4+b], so one 64-byte load holds 8 weights of each of 16 rows and a vpdpbusd lane is a row.
// dm: fp16 (rb, g, [d, m], j) with w = d·q + m. Activations are quantized per group of 32 to int8 (scale
// |x|max/127); y = Σ_g dx_g (d_g Σ q·xq + m_g Σ xq). No horizontal sums: 16 outputs per accumulator.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_VNNI 1
// The bodies of q4_gemm and qk_gemm / qk_gemm_ks at 4 bits with a scale and min per 32 (Q4_0, Q4_1, Q4_K), of
// 6 bits per 16 (Q6_K) at every row count, and of 5 bits or 4 bits per 16 (Q5_K, ...) for more than Q4_MR rows. Register tiles of MR activation rows × NB
// row blocks (16 · NB outputs): each weight vector feeds MR rows and each broadcast activation word NB row blocks,
// every accumulator stays in a register across the whole K, and the int32 sums of a group are MR · NB · NS
// independent vpdpbusd chains. Weights come either as q4rows16 nibbles unpacked in the tile (4 bits) or from `uw`,
// (BUF) the weights unpacked once to bytes ((G, NB, 8, 64), shared by every tile) with their scales from `sc`
// ((G, NB, [d, m], NS, 16) fp32, converted once); without BUF the scales are converted in the tile. The integer sums are
// exact and the float steps those of qk_gemm_vnni for one row, in the same order, so every row is bit-identical to a
// one-row call (and to the AVX2 body).
static inline void qk_scales512(const uint16_t *dm, const int8_t *scm, const uint16_t *sb, int64_t rb, int G, int g,
                                int ns, int ksym, __m512 *dv, __m512 *mv);

#define Q4_PREFETCH 8  // groups ahead (measured on the 1B's gate_up at 1 row: as fast as one stream without it)
#define Q4_TILE_MAX 8  // bounds of the tile arrays (fixed sizes, not VLAs: with MR, NB, NS constant after inlining
                       // they are registers)

// WS (symmetric 6-bit weights at 2 · Q4_MR rows or more, see q4_rows): 1, the tile also stores its unpacked weight
// vectors and converted scales for groups g0..g1 to wb and sbuf; 2, it loads them from there instead of unpacking
// and converting (0: neither). Groups g0..g1 of K: the sums start from `part` (g0 > 0) and end there (g1 < G).
// pf (not NULL): pfn lines from pf + 64 · pfn · (g − g0) on, up to pfend, are asked into L2 at group g (see q4_rows).
static inline __attribute__((always_inline)) void q4_tile(const int MR, const int NB, const int NS, const int BUF,
                                                         const int OFF, const int WS, const qact *a,
                                                         const float *sx16, int64_t m0, int K, const uint8_t *w,
                                                         const uint8_t *uw, const uint16_t *dm, const int8_t *scm,
                                                         const uint16_t *sb, const float *sc, int64_t rb, void *y,
                                                         int N, int is_bf16, int g0, int g1, __m512 *part,
                                                         __m512i *wb, __m512 *sbuf, const uint8_t *pf, int pfn,
                                                         const uint8_t *pfend) {
    // W6: 6-bit weights with sub-groups of 16 (Q6_K, symmetric or with mins) unpacked in the tile at every row count
    const int G = K / 32, SPLIT = NS == 1 && MR <= 2, W6 = !BUF && NS == 2, GB = W6 ? 384 : 256;
    const __m512i mask = _mm512_set1_epi8(0x0F), b45 = _mm512_set1_epi8(0x30);
    __m512 acc[Q4_TILE_MAX][2];
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) acc[r][b] = g0 ? part[r * NB + b] : _mm512_setzero_ps();
    for (int g = g0; g < g1; g++) {
        const int64_t gi = (int64_t)(g - g0) * NB;  // this group's first vector pair in wb / sbuf (WS)
        __m512i s[Q4_TILE_MAX][2][2];
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {
            // OFF (symmetric weights w = d·(q − OFF): Q4_0 8, Q6_K 32): the offset −OFF Σ xq of each sub-group starts
            // its integer sum (no float term for it)
            const int64_t i = (m0 + r) * G + g;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            if (OFF == 8 && NS == 1) s0 = _mm512_set1_epi32(a->isum8[i]);
            if (OFF && NS == 2) {
                s0 = _mm512_set1_epi32(-OFF * a->isum16[2 * i]);
                s1 = _mm512_set1_epi32(-OFF * a->isum16[2 * i + 1]);
            }
            _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++)
                _Pragma("GCC unroll 2") for (int h = 0; h < NS + SPLIT; h++)
                    s[r][b][h] = h == 0 ? s0 : (NS == 2 ? s1 : _mm512_setzero_si512());
        }
        if (pf)
            for (int j = 0; j < pfn; j++) {
                const int64_t off = ((int64_t)(g - g0) * pfn + j) * 64;  // (an offset: no pointer past pfend)
                if (off < pfend - pf) _mm_prefetch((const char *)(pf + off), _MM_HINT_T1);
            }
        if (!BUF && WS != 2 && m0 == 0 && g + Q4_PREFETCH < G)  // the first tile streams the packed weights from DRAM:
            _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++)  // ask for them Q4_PREFETCH groups ahead
                _Pragma("GCC unroll 6") for (int c = 0; c < GB / 64; c++)
                    _mm_prefetch((const char *)(w + ((rb + b) * G + g + Q4_PREFETCH) * GB + 64 * c), _MM_HINT_T0);
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {  // vectors 2c, 2c+1 ↔ activation words 2c, 2c+1
            // sub-group of 16: vectors 0-3, then 4-7; one sub-group and few rows: two chains (c even, odd) per output
            // vector, so the vpdpbusd latency is hidden with few independent sums
            const int h = NS == 2 ? c >= 2 : (SPLIT && (c & 1));
            __m512i lo[2], hi[2];
            _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) {
                if (WS == 2) {
                    lo[b] = wb[(gi + b) * 8 + 2 * c];
                    hi[b] = wb[(gi + b) * 8 + 2 * c + 1];
                } else if (BUF) {
                    lo[b] = _mm512_load_si512((const __m512i *)(uw + (((int64_t)g * NB + b) * 8 + 2 * c) * 64));
                    hi[b] = _mm512_load_si512((const __m512i *)(uw + (((int64_t)g * NB + b) * 8 + 2 * c + 1) * 64));
                } else {
                    const __m512i wc = _mm512_loadu_si512((const __m512i *)(w + ((rb + b) * G + g) * GB + 64 * c));
                    lo[b] = _mm512_and_si512(wc, mask);
                    hi[b] = _mm512_and_si512(_mm512_srli_epi16(wc, 4), mask);
                    if (W6) {  // bits 4-5 of vectors 2c, 2c+1: plane c/2, fields 2(c&1), 2(c&1)+1 (see qk_unpack512)
                        const __m512i hp =
                            _mm512_loadu_si512((const __m512i *)(w + ((rb + b) * G + g) * GB + 256 + 64 * (c >> 1)));
                        if (!(c & 1)) {
                            lo[b] = _mm512_or_si512(lo[b], _mm512_and_si512(_mm512_slli_epi16(hp, 4), b45));
                            hi[b] = _mm512_or_si512(hi[b], _mm512_and_si512(_mm512_slli_epi16(hp, 2), b45));
                        } else {
                            lo[b] = _mm512_or_si512(lo[b], _mm512_and_si512(hp, b45));
                            hi[b] = _mm512_or_si512(hi[b], _mm512_and_si512(_mm512_srli_epi16(hp, 2), b45));
                        }
                    }
                    if (WS == 1) {
                        wb[(gi + b) * 8 + 2 * c] = lo[b];
                        wb[(gi + b) * 8 + 2 * c + 1] = hi[b];
                    }
                }
            }
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {
                const int32_t *xg = (const int32_t *)(a->xq + (m0 + r) * K + g * 32);
                const __m512i xl = _mm512_set1_epi32(xg[2 * c]), xh = _mm512_set1_epi32(xg[2 * c + 1]);
                _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) {
                    s[r][b][h] = _mm512_dpbusd_epi32(s[r][b][h], lo[b], xl);
                    s[r][b][h] = _mm512_dpbusd_epi32(s[r][b][h], hi[b], xh);
                }
            }
        }
        __m512 d[2][2], mv[2][2];
        _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) {
            if (OFF == 8 && !BUF) {  // d alone: fp16 (rb, g, 16) (Q4_0)
                d[b][0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + ((rb + b) * G + g) * 16)));
                mv[b][0] = _mm512_setzero_ps();
            } else if (BUF) {
                const float *sp = sc + ((int64_t)g * NB + b) * 32 * NS;
                _Pragma("GCC unroll 2") for (int h = 0; h < NS; h++) {
                    d[b][h] = _mm512_load_ps(sp + 16 * h);
                    mv[b][h] = _mm512_load_ps(sp + 16 * (NS + h));
                }
            } else if (WS == 2) {
                _Pragma("GCC unroll 2") for (int h = 0; h < NS; h++) {
                    d[b][h] = sbuf[(gi + b) * NS + h];
                    mv[b][h] = _mm512_setzero_ps();
                }
            } else {
                qk_scales512(dm, scm, sb, rb + b, G, g, NS, OFF == 32, d[b], mv[b]);
                if (WS == 1)
                    _Pragma("GCC unroll 2") for (int h = 0; h < NS; h++) sbuf[(gi + b) * NS + h] = d[b][h];
            }
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {
            const int64_t i = (m0 + r) * G + g;
            const __m512 dxv = _mm512_set1_ps(a->dx[i]);
            _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) {
                if (NS == 1) {
                    const __m512i si = SPLIT ? _mm512_add_epi32(s[r][b][0], s[r][b][1]) : s[r][b][0];
                    acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(d[b][0], dxv), acc[r][b]);
                    if (!OFF) acc[r][b] = _mm512_fmadd_ps(mv[b][0], _mm512_set1_ps(a->sx[i]), acc[r][b]);
                } else {
                    __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s[r][b][0]), d[b][0]);
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][b][1]), d[b][1], t);
                    acc[r][b] = _mm512_fmadd_ps(t, dxv, acc[r][b]);
                    if (!OFF) {
                        acc[r][b] = _mm512_fmadd_ps(mv[b][0], _mm512_set1_ps(sx16[2 * i]), acc[r][b]);
                        acc[r][b] = _mm512_fmadd_ps(mv[b][1], _mm512_set1_ps(sx16[2 * i + 1]), acc[r][b]);
                    }
                }
            }
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)
        _Pragma("GCC unroll 2") for (int b = 0; b < NB; b++) {
            if (g1 < G) part[r * NB + b] = acc[r][b];
            else vf_store(y, (m0 + r) * N + (rb + b) * 16, acc[r][b], is_bf16);
        }
}

#ifndef Q4_KB
#define Q4_KB 16  // groups of 32 per K block (symmetric 6-bit weights at many rows, see q4_rows)
#endif
#define Q4_KB_ROWS 64  // rows per chunk passing the K blocks (their partial sums wait in Q4_KB_ROWS · Q4_NB vectors)
#define Q4_MR 4  // activation rows per register tile: MR · NB · (1 + NS) of the 32 zmm registers
#define Q4_NB 2  // row blocks per tile
#define Q4_PF_TILES 3  // tiles after the first that prefetch the next row-block group (4-bit weights, see q4_rows)

// One group of NB row blocks against all M rows: tiles of Q4_MR rows, then one of the M % Q4_MR left (symmetric
// 6-bit weights at ≥ 2 · Q4_MR rows: the same per chunk of Q4_KB_ROWS rows and K block, see below).
static inline __attribute__((always_inline)) void q4_rows(const int NB, const int NS, const int BUF, const int OFF,
                                                         const qact *a,
                                                         const float *sx16, int M, int K, const uint8_t *w,
                                                         const uint8_t *uw, const uint16_t *dm, const int8_t *scm,
                                                         const uint16_t *sb, const float *sc, int64_t rb, void *y,
                                                         int N, int is_bf16) {
    const int G = K / 32;
    const int64_t nrbs = N / 16;  // row blocks in all
    // 4-bit weights unpacked in the tile at 2 · Q4_MR rows or more: tiles 1..pft (after the first, which streams
    // this group's weights from DRAM) ask for the next row-block group's packed weights into L2, pfn lines a group,
    // so that group's first tile finds them there instead of waiting on DRAM (measured 1.03-1.29x at 8-24 rows on
    // weights read from DRAM as in a decode step; 0.98-1.11x at 32-64 rows, where the first tile is a smaller share)
    const int pft = !BUF && NS == 1 && M >= 2 * Q4_MR ? (M / Q4_MR - 1 < Q4_PF_TILES ? M / Q4_MR - 1 : Q4_PF_TILES) : 0;
    // (byte offsets into w, 256 bytes per row block and group as at 4 bits, the only weights prefetched: the next
    // group's may lie past the end, where no pointer is formed. With guided scheduling the last group of a thread's
    // chunk prefetches one another thread takes: 32 KB of a few chunks per call.)
    const int64_t nbytes = (int64_t)NB * G * 256, nx = (rb + NB) * G * 256, wbytes = nrbs * G * 256;
    const int pfn = pft ? (int)((nbytes / 64 + (int64_t)pft * G - 1) / ((int64_t)pft * G)) : 0;
    const uint8_t *pfend = w + (nx + nbytes < wbytes ? nx + nbytes : wbytes);
#define Q4_T(MR, WS, G0, G1, PART, WB, SB, PF, PFN, PFEND)                                                          \
    q4_tile(MR, NB, NS, BUF, OFF, WS, a, sx16, m0, K, w, uw, dm, scm, sb, sc, rb, y, N, is_bf16, G0, G1, PART, WB, SB, \
            PF, PFN, PFEND)
// the tile of the 1-3 rows left before row M1 (none: nothing)
#define Q4_REST(M1, WS, G0, G1, PART, WB, SB)                   \
    switch ((M1) - m0) {                                          \
        case 3: Q4_T(3, WS, G0, G1, PART, WB, SB, NULL, 0, NULL); break; \
        case 2: Q4_T(2, WS, G0, G1, PART, WB, SB, NULL, 0, NULL); break; \
        case 1: Q4_T(1, WS, G0, G1, PART, WB, SB, NULL, 0, NULL); break; \
        default: break;                                           \
    }
    if (!BUF && NS == 2 && OFF == 32 && M >= 2 * Q4_MR) {
        // symmetric 6-bit weights (Q6_K) at 2 · Q4_MR rows or more: K in blocks of Q4_KB groups; per block the first
        // tile unpacks the weights and converts the scales in registers (7 vector ops a vector) and leaves them in
        // L1 buffers, the other tiles of the chunk of Q4_KB_ROWS rows load them; partial sums wait in `part`.
        // Every output's groups are summed in the same order, so the results are those of one pass.
        __m512i wb[Q4_KB * Q4_NB * 8];  // (NB ≤ Q4_NB = 2, NS = 2: the tile arrays' bounds)
        __m512 sbuf[Q4_KB * Q4_NB * 2], part[Q4_KB_ROWS * Q4_NB];
        for (int64_t c0 = 0; c0 < M; c0 += Q4_KB_ROWS) {
            const int64_t c1 = M - c0 < Q4_KB_ROWS ? M : c0 + Q4_KB_ROWS;
            for (int g0 = 0; g0 < G; g0 += Q4_KB) {
                const int g1 = G - g0 < Q4_KB ? G : g0 + Q4_KB;
                int64_t m0 = c0;
                if (c1 - c0 < Q4_MR) {  // a last chunk of fewer rows: one tile, no reuse
                    Q4_REST(c1, 0, g0, g1, part, wb, sbuf)
                    continue;
                }
                Q4_T(Q4_MR, 1, g0, g1, part, wb, sbuf, NULL, 0, NULL);
                for (m0 += Q4_MR; m0 + Q4_MR <= c1; m0 += Q4_MR)
                    Q4_T(Q4_MR, 2, g0, g1, part + (m0 - c0) * NB, wb, sbuf, NULL, 0, NULL);
                Q4_REST(c1, 2, g0, g1, part + (m0 - c0) * NB, wb, sbuf)
            }
        }
        return;
    }
    int64_t m0 = 0;
    if (pft) {  // the first tile, then tiles 1..pft with their slices (the others, below, without the test)
        Q4_T(Q4_MR, 0, 0, G, NULL, NULL, NULL, NULL, 0, NULL);
        for (m0 = Q4_MR; m0 <= (int64_t)pft * Q4_MR; m0 += Q4_MR) {
            const int64_t pf = nx + (m0 / Q4_MR - 1) * G * pfn * 64;
            Q4_T(Q4_MR, 0, 0, G, NULL, NULL, NULL, pf < pfend - w ? w + pf : NULL, pfn, pfend);
        }
    }
    for (; m0 + Q4_MR <= M; m0 += Q4_MR) Q4_T(Q4_MR, 0, 0, G, NULL, NULL, NULL, NULL, 0, NULL);
    Q4_REST(M, 0, 0, G, NULL, NULL, NULL)  // the rows left: fewer than Q4_MR
#undef Q4_REST
#undef Q4_T
}

static inline void qk_unpack512(const uint8_t *wp, int bits, __m512i *v);

// y (M, N) = x (M, K) · Wᵀ (see q4_tile) for `bits`-bit weights in the qkrows16 layout (q4rows16 at 4 bits) with
// ns sub-groups per 32. Threads take groups of Q4_NB row blocks; within one, the rows pass in tiles while its
// weights stay in L1/L2, so DRAM reads each weight once. Weights of 5 bits, or of 4 bits with sub-groups of 16, are
// unpacked to bytes and their scales converted to fp32 once per row-block group, into per-thread buffers (at 4 bits
// with one sub-group, unpacking and converting in each tile measured faster).
// *buf grown to at least `need` bytes (a multiple of 64), 64-byte aligned, kept for the next call (a per-thread
// buffer; never shrunk); NULL when it cannot be had.
static void *grow_aligned64(void **buf, size_t *cap, size_t need) {
    if (*cap < need) {
        free(*buf);
        *buf = aligned_alloc(64, need);
        *cap = *buf ? need : 0;
    }
    return *buf;
}

static int q4_gemm_tiled(const qact *a, const float *sx16, int M, const uint8_t *w, const uint16_t *dm,
                         const int8_t *scm, const uint16_t *sb, void *y, int N, int K, int is_bf16, int bits, int ns,
                         int off) {
    const int nrb = N / 16, ngr = (nrb + Q4_NB - 1) / Q4_NB, G = K / 32, gb = 256 + 64 * (bits - 4);
    int failed = 0;
    // guided, as every quantized GEMM's loop here: on a shared host one core can run slower for a while, and static
    // halves then wait for it at the barrier; guided chunks shrink towards the end, so the faster core takes more of
    // the work, while the first chunks stay long and sequential (measured equal to static when static ran at its
    // best, 1.13-1.29x in runs where the host slowed static; docs/benchmarks.md, seventh session)
#pragma omp parallel for schedule(guided) reduction(| : failed)
    for (int gr = 0; gr < ngr; gr++) {
        static __thread void *scb = NULL, *uwb = NULL;  // scales (G, NB, [d, m], ns, 16) fp32; weights (G, NB, 8, 64)
        static __thread size_t scap = 0, ucap = 0;
        const int64_t rb = (int64_t)gr * Q4_NB;
        const int nb = nrb - rb < Q4_NB ? (int)(nrb - rb) : Q4_NB;
        const float *sc = NULL;
        const uint8_t *uw = NULL;
        // 6 bits with sub-groups of 16 (Q6_K): unpacked in the tile, measured 1.1-2.7x faster at 1-64 rows than the
        // buffer pass (and than qk_gemm_vnni at 1-4 rows)
        const int w6 = bits == 6 && ns == 2;
        if ((bits > 4 || ns > 1) && !w6) {  // (at 4 bits converting the scales in the tile measured faster)
            float *scf = grow_aligned64(&scb, &scap, sizeof(float) * (size_t)G * Q4_NB * 64);
            uint8_t *uwf = grow_aligned64(&uwb, &ucap, (size_t)G * Q4_NB * 512);
            if (!scf || !uwf) {
                failed = 1;
                continue;
            }
            for (int g = 0; g < G; g++)
                for (int b = 0; b < nb; b++) {
                    __m512 d[2], mv[2];
                    qk_scales512(dm, scm, sb, rb + b, G, g, ns, off != 0, d, mv);
                    for (int h = 0; h < ns; h++) {
                        _mm512_store_ps(scf + ((int64_t)g * nb + b) * 32 * ns + 16 * h, d[h]);
                        _mm512_store_ps(scf + ((int64_t)g * nb + b) * 32 * ns + 16 * (ns + h), mv[h]);
                    }
                    __m512i v[8];
                    qk_unpack512(w + ((rb + b) * G + g) * gb, bits, v);
                    for (int t = 0; t < 8; t++) _mm512_store_si512((__m512i *)(uwf + (((int64_t)g * nb + b) * 8 + t) * 64), v[t]);
                }
            sc = scf;
            uw = uwf;
        }
#define Q4_ROWS(NB, NS, BUF, OFF) q4_rows(NB, NS, BUF, OFF, a, sx16, M, K, w, uw, dm, scm, sb, sc, rb, y, N, is_bf16)
        // BUF 0: nibbles unpacked and scales converted in the tile (4 bits, one sub-group); 1: both from the buffers
        if (w6 && off) {
            if (M <= 2)
                for (int b = 0; b < nb; b++) q4_rows(1, 2, 0, 32, a, sx16, M, K, w, uw, dm, scm, sb, sc, rb + b, y, N, is_bf16);
            else if (nb == 2) Q4_ROWS(2, 2, 0, 32);
            else Q4_ROWS(1, 2, 0, 32);
        } else if (w6) {
            if (M <= 2)
                for (int b = 0; b < nb; b++) q4_rows(1, 2, 0, 0, a, sx16, M, K, w, uw, dm, scm, sb, sc, rb + b, y, N, is_bf16);
            else if (nb == 2) Q4_ROWS(2, 2, 0, 0);
            else Q4_ROWS(1, 2, 0, 0);
        } else if (!uw && M <= 2) {  // 1-2 rows are bound by DRAM: one row block after the other, one sequential stream
            for (int b = 0; b < nb; b++) {  // (measured faster than pairs read side by side at 1-2 rows)
                const int64_t rb1 = rb + b;
                if (off) q4_rows(1, 1, 0, 8, a, sx16, M, K, w, uw, dm, scm, sb, sc, rb1, y, N, is_bf16);
                else q4_rows(1, 1, 0, 0, a, sx16, M, K, w, uw, dm, scm, sb, sc, rb1, y, N, is_bf16);
            }
        } else if (nb == 2) {
            if (off && !uw) Q4_ROWS(2, 1, 0, 8);  // (Q4_0)
            else if (!uw) Q4_ROWS(2, 1, 0, 0);
            else if (ns == 1) Q4_ROWS(2, 1, 1, 0);
            else Q4_ROWS(2, 2, 1, 0);  // (the buffers hold no symmetric layer: those are all w6)
        } else {
            if (off && !uw) Q4_ROWS(1, 1, 0, 8);
            else if (!uw) Q4_ROWS(1, 1, 0, 0);
            else if (ns == 1) Q4_ROWS(1, 1, 1, 0);
            else Q4_ROWS(1, 2, 1, 0);
        }
#undef Q4_ROWS
    }
    return failed ? -1 : 0;
}

// ---- int8 weights with a scale per group of 32 (llama.cpp's Q8_0), row-interleaved for AVX512-VNNI ----
// Layout: w[N/16][K/4][16][4] bytes holding q + 128 (unsigned): one 64-byte load = 4 consecutive k of 16 rows,
// so a vpdpbusd lane is a row and no horizontal sums are needed; d: fp16 [N/16][K/32][16]. Activations are
// quantized per group of 32 too, so y = Σ_g d_g dx_g (Σ (q+128)·xq − 128 Σ xq): the offset needs only Σ xq.
static int q8_gemm_vnni(const qact *a, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16) {
    const int K4 = K / 4, G = K / 32;
    const int8_t *xqp = a->xq;
    const float *dx = a->dx, *sx = a->sx;
#pragma omp parallel for schedule(guided)
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
            for (int m = 0; m < mc; m++) vf_store(y, (int64_t)(m0 + m) * N + rb * 16, acc[m], is_bf16);
        }
    }
    return 0;
}

// ---- 4/5/6-bit weights with a scale and min per 16 or 32 (Q5_0/Q5_1/Q5_K, Q6_K, and mixes promoted to one) ----
// Made once at load by inferd/quant/linear.py (pack_qk_rows16). Per row block rb (16 rows) and group g (32 along
// K): the 256 nibble bytes of the q4rows16 layout (the low 4 bits), then (bits − 4) planes of 64 bytes: plane p,
// byte 4j + b, bit t = bit 4 + p of q[16rb + j][32g + 4t + b] (t numbers the 8 nibble vectors l0 h0 l1 h1 ...,
// vector t holding k = 4t + b), so each plane adds one bit to all 8 vectors with a shift and a mask. dm: fp16
// (rb, g, [d, m], s, j) for the 32/sub sub-groups s, with w = d·q + m (q unsigned, < 2^bits).
// y = Σ_g dx_g Σ_s (d_s Σ_s q·xq + m_s Σ_s xq): sx16 holds dx · Σ xq per 16 (sub 16), sx per 32 (sub 32).
// A group's scales and mins (16 rows each, per sub-group s): from fp16 dm, or (scm != NULL: K-quant scales, exact)
// d_s = sc_s · d_sb and m_s = mn_s · dmin_sb from int8 multipliers scm (rb, g, [sc, mn], s, 16) and fp16 super-block
// factors sb (rb, g / 8, [d, dmin], 16): the products are exact in fp32 (8-bit × 11-bit), as the file's dequantization.
// ksym (symmetric K-quants, Q6_K: m = −32 d): scm holds sc alone (rb, g, s, 16) and sb d alone (rb, g / 8, 16); mv is 0.
static inline void qk_scales512(const uint16_t *dm, const int8_t *scm, const uint16_t *sb, int64_t rb, int G, int g,
                                int ns, int ksym, __m512 *dv, __m512 *mv) {
    if (ksym) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + ((int64_t)rb * (G / 8) + g / 8) * 16)));
        const int8_t *cg = scm + ((int64_t)rb * G + g) * 16 * ns;
        for (int s = 0; s < ns; s++) {
            dv[s] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(cg + s * 16)))), d);
            mv[s] = _mm512_setzero_ps();
        }
        return;
    }
    if (!scm) {
        const uint16_t *dg = dm + ((int64_t)rb * G + g) * 32 * ns;
        for (int s = 0; s < ns; s++) {
            dv[s] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + s * 16)));
            mv[s] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + (ns + s) * 16)));
        }
        return;
    }
    const uint16_t *sg = sb + ((int64_t)rb * (G / 8) + g / 8) * 32;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sg));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg + 16)));
    const int8_t *cg = scm + ((int64_t)rb * G + g) * 32 * ns;
    for (int s = 0; s < ns; s++) {
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(cg + s * 16))));
        const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(cg + (ns + s) * 16))));
        dv[s] = _mm512_mul_ps(sc, d);
        mv[s] = _mm512_mul_ps(mn, dmin);
    }
}

// The 8 weight vectors of one group of a qkrows16 row block as bytes q < 2^bits: vector t holds k = 4t..4t+3 of the
// 16 rows (the nibbles; at 5 bits bit t of each plane byte → bit 4 of vector t; at 6 bits bits 2u, 2u + 1 of plane
// p's bytes → bits 4-5 of vector 4p + u: one shift and one masked or per vector).
static inline void qk_unpack512(const uint8_t *wp, int bits, __m512i *v) {
    const __m512i mask = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10), b45 = _mm512_set1_epi8(0x30);
    for (int c = 0; c < 4; c++) {
        const __m512i wc = _mm512_loadu_si512((const __m512i *)(wp + 64 * c));
        v[2 * c] = _mm512_and_si512(wc, mask);
        v[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(wc, 4), mask);
    }
    if (bits == 5) {
        const __m512i p0 = _mm512_loadu_si512((const __m512i *)(wp + 256));
        for (int t = 0; t < 8; t++)
            v[t] = _mm512_or_si512(v[t], _mm512_and_si512(t <= 4 ? _mm512_slli_epi16(p0, 4 - t)
                                                                 : _mm512_srli_epi16(p0, t - 4), b4));
    }
    if (bits == 6)
        for (int p = 0; p < 2; p++) {
            const __m512i h = _mm512_loadu_si512((const __m512i *)(wp + 256 + 64 * p));
            v[4 * p] = _mm512_or_si512(v[4 * p], _mm512_and_si512(_mm512_slli_epi16(h, 4), b45));
            v[4 * p + 1] = _mm512_or_si512(v[4 * p + 1], _mm512_and_si512(_mm512_slli_epi16(h, 2), b45));
            v[4 * p + 2] = _mm512_or_si512(v[4 * p + 2], _mm512_and_si512(h, b45));
            v[4 * p + 3] = _mm512_or_si512(v[4 * p + 3], _mm512_and_si512(_mm512_srli_epi16(h, 2), b45));
        }
}

static inline __attribute__((always_inline)) void qk_vnni_body(int64_t rb, const qact *a, const float *sx16, int M,
                                                             const uint8_t *w, const uint16_t *dm, const int8_t *scm,
                                                             const uint16_t *sb, void *y, int N, int K, int is_bf16,
                                                             int bits, int sub, const int off) {
    const int G = K / 32, gb = 256 + 64 * (bits - 4), ns = 32 / sub;
    const int8_t *xqp = a->xq;
    const float *dx = a->dx, *sx = a->sx;
    {
        const uint8_t *wb = w + (int64_t)rb * G * gb;
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m512 acc[Q4_MCHUNK];
            for (int m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint8_t *wp = wb + (int64_t)g * gb;
                __m512i v[8];
                qk_unpack512(wp, bits, v);
                __m512 dv[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, mv[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
                qk_scales512(dm, scm, sb, rb, G, g, ns, off != 0, dv, mv);
                const __m512 d0 = dv[0], d1 = ns == 1 ? mv[0] : dv[1];
                if (ns == 1) {  // d0 = d, d1 = m
                    for (int m = 0; m < mc; m++) {
                        const int64_t row = m0 + m;
                        const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], _mm512_set1_epi32(xg[0]));
                        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[1], _mm512_set1_epi32(xg[1]));
                        for (int t = 2; t < 8; t += 2) {
                            s0 = _mm512_dpbusd_epi32(s0, v[t], _mm512_set1_epi32(xg[t]));
                            s1 = _mm512_dpbusd_epi32(s1, v[t + 1], _mm512_set1_epi32(xg[t + 1]));
                        }
                        const __m512 sf = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                        acc[m] = _mm512_fmadd_ps(sf, _mm512_mul_ps(d0, _mm512_set1_ps(dx[row * G + g])), acc[m]);
                        acc[m] = _mm512_fmadd_ps(d1, _mm512_set1_ps(sx[row * G + g]), acc[m]);
                    }
                } else {  // two sub-groups of 16: k 0-15 are vectors 0-3, k 16-31 vectors 4-7
                    const __m512 m0v = mv[0], m1v = mv[1];
                    for (int m = 0; m < mc; m++) {
                        const int64_t row = m0 + m;
                        const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                        // off (symmetric, sub 16 only): −off Σ xq of each half starts its sum, as in q4_tile
                        const __m512i z0 = off ? _mm512_set1_epi32(-off * a->isum16[2 * (row * G + g)]) : _mm512_setzero_si512();
                        const __m512i z1 = off ? _mm512_set1_epi32(-off * a->isum16[2 * (row * G + g) + 1]) : _mm512_setzero_si512();
                        __m512i s0 = _mm512_dpbusd_epi32(z0, v[0], _mm512_set1_epi32(xg[0]));
                        __m512i s1 = _mm512_dpbusd_epi32(z1, v[4], _mm512_set1_epi32(xg[4]));
                        for (int t = 1; t < 4; t++) {
                            s0 = _mm512_dpbusd_epi32(s0, v[t], _mm512_set1_epi32(xg[t]));
                            s1 = _mm512_dpbusd_epi32(s1, v[t + 4], _mm512_set1_epi32(xg[t + 4]));
                        }
                        const __m512 dxv = _mm512_set1_ps(dx[row * G + g]);
                        __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(s0), d0);
                        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), d1, t);
                        acc[m] = _mm512_fmadd_ps(t, dxv, acc[m]);
                        if (!off) {
                            acc[m] = _mm512_fmadd_ps(m0v, _mm512_set1_ps(sx16[(row * G + g) * 2]), acc[m]);
                            acc[m] = _mm512_fmadd_ps(m1v, _mm512_set1_ps(sx16[(row * G + g) * 2 + 1]), acc[m]);
                        }
                    }
                }
            }
            for (int m = 0; m < mc; m++) vf_store(y, (int64_t)(m0 + m) * N + rb * 16, acc[m], is_bf16);
        }
    }
}

// (no symmetric layer comes here: 6 bits with sub-groups of 16 always take the tile)
static int qk_gemm_vnni(const qact *a, const float *sx16, int M, const uint8_t *w, const uint16_t *dm,
                        const int8_t *scm, const uint16_t *sb, void *y, int N, int K, int is_bf16, int bits, int sub) {
#pragma omp parallel for schedule(guided)
    for (int rb = 0; rb < N / 16; rb++) qk_vnni_body(rb, a, sx16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, sub, 0);
    return 0;
}

#endif

#if !defined(HAVE_VNNI) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2_Q 1
// Σ over 4 consecutive bytes (one int32 lane = one row) of u8 · s8, as vpdpbusd without accumulation; exact
// while each pair of products fits int16 (4-bit weights: 2·15·128; 8-bit: sign trick below, 2·127·127).
static inline __m256i dot4_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// sym: w = d·(q − 8) with dm holding d alone, (rb, g, 16) (see q4s_gemm)
static int q4_gemm_avx2(const qact *a, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16,
                        int sym) {
    const int G = K / 32;
    const int8_t *xqp = a->xq;
    const float *dx = a->dx, *sx = a->sx;
    const int32_t *isum = a->isum;
#pragma omp parallel for schedule(guided)
    for (int rb = 0; rb < N / 16; rb++) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const uint8_t *wb = w + (int64_t)rb * G * 256;
        const int dstride = sym ? 16 : 32;  // fp16 per (rb, g): d (16) or d, m (32)
        const uint16_t *db = dm + (int64_t)rb * G * dstride;
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m256 acc[Q4_MCHUNK][2];
            for (int m = 0; m < mc; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint8_t *wg = wb + (int64_t)g * 256;
                for (int half = 0; half < 2; half++) {  // rows 0-7, then 8-15 of the row block
                    __m256i lo[4], hi[4];
                    for (int c = 0; c < 4; c++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + c * 64 + half * 32));
                        lo[c] = _mm256_and_si256(v, mask);
                        hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    }
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(db + g * dstride + half * 8)));
                    const __m256 mv = sym ? _mm256_setzero_ps()
                                          : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(db + g * 32 + 16 + half * 8)));
                    for (int m = 0; m < mc; m++) {
                        const int64_t row = m0 + m;
                        const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                        // chunk c: low nibbles ↔ activations 8c..8c+3, high nibbles ↔ 8c+4..8c+7
                        __m256i s16 = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(xg[0]));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[0], _mm256_set1_epi32(xg[1])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[1], _mm256_set1_epi32(xg[2])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[1], _mm256_set1_epi32(xg[3])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[2], _mm256_set1_epi32(xg[4])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[2], _mm256_set1_epi32(xg[5])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[3], _mm256_set1_epi32(xg[6])));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[3], _mm256_set1_epi32(xg[7])));
                        // |sum of 8 pair sums| <= 8 · 2 · 15 · 128 = 30720: fits int16
                        __m256i si = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
                        if (sym) si = _mm256_add_epi32(si, _mm256_set1_epi32(-8 * isum[row * G + g]));
                        const __m256 sf = _mm256_cvtepi32_ps(si);
                        acc[m][half] = _mm256_fmadd_ps(sf, _mm256_mul_ps(d, _mm256_set1_ps(dx[row * G + g])), acc[m][half]);
                        if (!sym) acc[m][half] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[row * G + g]), acc[m][half]);
                    }
                }
            }
            for (int m = 0; m < mc; m++)
                for (int half = 0; half < 2; half++)
                    v8_store(y, (int64_t)(m0 + m) * N + rb * 16 + half * 8, acc[m][half], is_bf16);
        }
    }
    return 0;
}

static int q8_gemm_avx2(const qact *a, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16) {
    const int K4 = K / 4, G = K / 32;
    const int8_t *xqp = a->xq;
    const float *dx = a->dx, *sx = a->sx;
    const int32_t *isum = a->isum;
#pragma omp parallel for schedule(guided)
    for (int rb = 0; rb < N / 16; rb++) {
        const uint8_t *wb = w + (int64_t)rb * K4 * 64;
        const uint16_t *db = dw + (int64_t)rb * G * 16;
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m256 acc[Q4_MCHUNK][2];
            for (int m = 0; m < mc; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint8_t *wg = wb + (int64_t)g * 512;
                for (int half = 0; half < 2; half++) {
                    __m256i wq[8];  // signed q (the layout stores q + 128)
                    for (int c = 0; c < 8; c++)
                        wq[c] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + c * 64 + half * 32)), flip);
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(db + g * 16 + half * 8)));
                    for (int m = 0; m < mc; m++) {
                        const int64_t row = m0 + m;
                        const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                        __m256i s = _mm256_setzero_si256();
                        for (int c = 0; c < 8; c++) {  // Σ q·xq = Σ |xq| · (q · sign(xq))
                            const __m256i xv = _mm256_set1_epi32(xg[c]);
                            s = _mm256_add_epi32(s, dot4_u8s8(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wq[c], xv)));
                        }
                        // the VNNI kernel's Σ (q+128)·xq, exactly: Σ q·xq + 128 Σ xq
                        s = _mm256_add_epi32(s, _mm256_set1_epi32(128 * isum[row * G + g]));
                        const __m256 sf = _mm256_cvtepi32_ps(s);
                        const __m256 t = _mm256_fmadd_ps(sf, _mm256_set1_ps(dx[row * G + g]),
                                                         _mm256_set1_ps(-128.f * sx[row * G + g]));
                        acc[m][half] = _mm256_fmadd_ps(t, d, acc[m][half]);
                    }
                }
            }
            for (int m = 0; m < mc; m++)
                for (int half = 0; half < 2; half++)
                    v8_store(y, (int64_t)(m0 + m) * N + rb * 16 + half * 8, acc[m][half], is_bf16);
        }
    }
    return 0;
}

// The AVX2 body of qk_gemm (same layout, 8 rows per half). maddubs pairs: 2·63·128 = 16128, two summed in int16
// still fit (32256), then widened.
// qk_scales512 for 8 rows (half 0: rows 0-7, 1: rows 8-15).
static inline void qk_scales256(const uint16_t *dm, const int8_t *scm, const uint16_t *sb, int64_t rb, int G, int g,
                                int ns, int ksym, int half, __m256 *dv, __m256 *mv) {
    if (ksym) {  // as qk_scales512
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + ((int64_t)rb * (G / 8) + g / 8) * 16 + half * 8)));
        const int8_t *cg = scm + ((int64_t)rb * G + g) * 16 * ns + half * 8;
        for (int s = 0; s < ns; s++) {
            dv[s] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cg + s * 16)))), d);
            mv[s] = _mm256_setzero_ps();
        }
        return;
    }
    if (!scm) {
        const uint16_t *dg = dm + ((int64_t)rb * G + g) * 32 * ns + half * 8;
        for (int s = 0; s < ns; s++) {
            dv[s] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + s * 16)));
            mv[s] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + (ns + s) * 16)));
        }
        return;
    }
    const uint16_t *sg = sb + ((int64_t)rb * (G / 8) + g / 8) * 32 + half * 8;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sg));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + 16)));
    const int8_t *cg = scm + ((int64_t)rb * G + g) * 32 * ns + half * 8;
    for (int s = 0; s < ns; s++) {
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cg + s * 16))));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cg + (ns + s) * 16))));
        dv[s] = _mm256_mul_ps(sc, d);
        mv[s] = _mm256_mul_ps(mn, dmin);
    }
}

static inline __attribute__((always_inline)) void qk_avx2_body(int64_t rb, const qact *a, const float *sx16, int M,
                                                             const uint8_t *w, const uint16_t *dm, const int8_t *scm,
                                                             const uint16_t *sb, void *y, int N, int K, int is_bf16,
                                                             int bits, int sub, const int off) {
    const int G = K / 32, gb = 256 + 64 * (bits - 4), ns = 32 / sub;
    const int8_t *xqp = a->xq;
    const float *dx = a->dx, *sx = a->sx;
    {
        const __m256i mask = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10), b45 = _mm256_set1_epi8(0x30);
        const __m256i one = _mm256_set1_epi16(1);
        const uint8_t *wb = w + (int64_t)rb * G * gb;
        for (int m0 = 0; m0 < M; m0 += Q4_MCHUNK) {
            const int mc = M - m0 < Q4_MCHUNK ? M - m0 : Q4_MCHUNK;
            __m256 acc[Q4_MCHUNK][2];
            for (int m = 0; m < mc; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint8_t *wp = wb + (int64_t)g * gb;
                for (int half = 0; half < 2; half++) {
                    __m256i v[8];
                    for (int c = 0; c < 4; c++) {
                        const __m256i wc = _mm256_loadu_si256((const __m256i *)(wp + 64 * c + 32 * half));
                        v[2 * c] = _mm256_and_si256(wc, mask);
                        v[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(wc, 4), mask);
                    }
                    if (bits == 5) {
                        const __m256i p0 = _mm256_loadu_si256((const __m256i *)(wp + 256 + 32 * half));
                        for (int t = 0; t < 8; t++)
                            v[t] = _mm256_or_si256(v[t], _mm256_and_si256(t <= 4 ? _mm256_slli_epi16(p0, 4 - t)
                                                                                 : _mm256_srli_epi16(p0, t - 4), b4));
                    }
                    if (bits == 6)  // as qk_unpack512
                        for (int p = 0; p < 2; p++) {
                            const __m256i h = _mm256_loadu_si256((const __m256i *)(wp + 256 + 64 * p + 32 * half));
                            v[4 * p] = _mm256_or_si256(v[4 * p], _mm256_and_si256(_mm256_slli_epi16(h, 4), b45));
                            v[4 * p + 1] = _mm256_or_si256(v[4 * p + 1], _mm256_and_si256(_mm256_slli_epi16(h, 2), b45));
                            v[4 * p + 2] = _mm256_or_si256(v[4 * p + 2], _mm256_and_si256(h, b45));
                            v[4 * p + 3] = _mm256_or_si256(v[4 * p + 3], _mm256_and_si256(_mm256_srli_epi16(h, 2), b45));
                        }
                    __m256 dv[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, mv[2];
                    qk_scales256(dm, scm, sb, rb, G, g, ns, off != 0, half, dv, mv);
                    const __m256 d0 = dv[0], d1 = ns == 1 ? mv[0] : dv[1];
                    for (int m = 0; m < mc; m++) {
                        const int64_t row = m0 + m;
                        const int32_t *xg = (const int32_t *)(xqp + row * K + g * 32);
                        __m256i p[4];
                        for (int i = 0; i < 4; i++)
                            p[i] = _mm256_madd_epi16(
                                _mm256_add_epi16(_mm256_maddubs_epi16(v[2 * i], _mm256_set1_epi32(xg[2 * i])),
                                                 _mm256_maddubs_epi16(v[2 * i + 1], _mm256_set1_epi32(xg[2 * i + 1]))),
                                one);
                        __m256i s0 = _mm256_add_epi32(p[0], p[1]), s1 = _mm256_add_epi32(p[2], p[3]);
                        if (off) {  // symmetric, sub 16: as the VNNI bodies, −off Σ xq per half in the integer sums
                            s0 = _mm256_add_epi32(s0, _mm256_set1_epi32(-off * a->isum16[2 * (row * G + g)]));
                            s1 = _mm256_add_epi32(s1, _mm256_set1_epi32(-off * a->isum16[2 * (row * G + g) + 1]));
                        }
                        const __m256 dxv = _mm256_set1_ps(dx[row * G + g]);
                        if (ns == 1) {  // d0 = d, d1 = m
                            const __m256 sf = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                            acc[m][half] = _mm256_fmadd_ps(sf, _mm256_mul_ps(d0, dxv), acc[m][half]);
                            acc[m][half] = _mm256_fmadd_ps(d1, _mm256_set1_ps(sx[row * G + g]), acc[m][half]);
                        } else {
                            const __m256 m0v = mv[0], m1v = mv[1];
                            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(s0), d0);
                            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), d1, t);
                            acc[m][half] = _mm256_fmadd_ps(t, dxv, acc[m][half]);
                            if (!off) {
                                acc[m][half] = _mm256_fmadd_ps(m0v, _mm256_set1_ps(sx16[(row * G + g) * 2]), acc[m][half]);
                                acc[m][half] = _mm256_fmadd_ps(m1v, _mm256_set1_ps(sx16[(row * G + g) * 2 + 1]), acc[m][half]);
                            }
                        }
                    }
                }
            }
            for (int m = 0; m < mc; m++)
                for (int half = 0; half < 2; half++)
                    v8_store(y, (int64_t)(m0 + m) * N + rb * 16 + half * 8, acc[m][half], is_bf16);
        }
    }
}

static int qk_gemm_avx2(const qact *a, const float *sx16, int M, const uint8_t *w, const uint16_t *dm,
                        const int8_t *scm, const uint16_t *sb, void *y, int N, int K, int is_bf16, int bits, int sub,
                        int off) {
#pragma omp parallel for schedule(guided)
    for (int rb = 0; rb < N / 16; rb++) {
        if (off == 32) qk_avx2_body(rb, a, sx16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, sub, 32);
        else qk_avx2_body(rb, a, sx16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, sub, 0);
    }
    return 0;
}
#endif

// Entry points: shape checks and the activations quantized once, then the tier's best body; -1 when the shape or
// this build has none (the caller then uses torch).
static __attribute__((unused)) int prepare(const void *x, int M, int N, int K, int is_bf16, qact *a) {
    if (M < 1 || N % 16 || K % 32 || K > Q4_MAXK) return -1;
    a->xq = quantize_rows_q8_32(x, M, K, is_bf16, &a->dx, &a->sx, &a->isum);
    a->isum16 = NULL;
    a->isum8 = a->xq ? a->isum + (int64_t)M * (K / 32) : NULL;
    return a->xq ? 0 : -1;
}

static int q4_run(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16,
                  int sym) {
#if defined(HAVE_VNNI) || defined(HAVE_AVX2_Q)
    qact a;
    if (prepare(x, M, N, K, is_bf16, &a)) return -1;
#if defined(HAVE_VNNI)
    return q4_gemm_tiled(&a, NULL, M, w, dm, NULL, NULL, y, N, K, is_bf16, 4, 1, sym ? 8 : 0);
#else
    return q4_gemm_avx2(&a, M, w, dm, y, N, K, is_bf16, sym);
#endif
#else
    (void)x; (void)M; (void)w; (void)dm; (void)y; (void)N; (void)K; (void)is_bf16; (void)sym;
    return -1;
#endif
}

int q4_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16) {
    return q4_run(x, M, w, dm, y, N, K, is_bf16, 0);
}

// Symmetric 4-bit weights, w = d·(q − 8) (GGUF Q4_0): the q4rows16 nibbles with fp16 d alone, (rb, g, 16), 18 bytes
// per 32 weights as in the file (q4_gemm's d and m take 20). The offset −8 Σ xq is added to the exact integer sum,
// so a group costs one conversion, one multiply and one FMA per output vector (q4_gemm: and a second FMA).
int q4s_gemm(const void *x, int M, const uint8_t *w, const uint16_t *d, void *y, int N, int K, int is_bf16) {
    return q4_run(x, M, w, d, y, N, K, is_bf16, 1);
}

int q8_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16) {
#if defined(HAVE_VNNI) || defined(HAVE_AVX2_Q)
    qact a;
    if (prepare(x, M, N, K, is_bf16, &a)) return -1;
#if defined(HAVE_VNNI)
    return q8_gemm_vnni(&a, M, w, dw, y, N, K, is_bf16);
#else
    return q8_gemm_avx2(&a, M, w, dw, y, N, K, is_bf16);
#endif
#else
    (void)x; (void)M; (void)w; (void)dw; (void)y; (void)N; (void)K; (void)is_bf16;
    return -1;
#endif
}

// dx · Σ xq per 16 activations (M, K/32, 2), for weights with a scale per 16, and the integer Σ xq per 16 into
// a->isum16 (per-thread buffers).
static __attribute__((unused)) const float *sums16(qact *a, int M, int K) {
    static __thread float *buf = NULL;
    static __thread int32_t *ibuf = NULL;
    static __thread int64_t cap = 0;
    const int64_t n = (int64_t)M * (K / 16);
    if (n > cap) {
        free(buf);
        free(ibuf);
        buf = (float *)malloc(sizeof(float) * (size_t)n);
        ibuf = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
        cap = buf && ibuf ? n : 0;
        if (!cap) return NULL;
    }
    const int G = K / 32;
    for (int64_t i = 0; i < (int64_t)M * G; i++) {
        const int8_t *q = a->xq + i * 32;
        int32_t lo = 0;
        for (int k = 0; k < 16; k++) lo += q[k];
        buf[2 * i] = a->dx[i] * (float)lo;
        buf[2 * i + 1] = a->dx[i] * (float)(a->isum[i] - lo);
        ibuf[2 * i] = lo;
        ibuf[2 * i + 1] = a->isum[i] - lo;
    }
    a->isum16 = ibuf;
    return buf;
}

// ksym: symmetric K-quant (Q6_K: w = d·sc·(q − 32)), sub 16 only; scm, sb as qk_scales512 takes them.
static int qk_run(const void *x, int M, const uint8_t *w, const uint16_t *dm, const int8_t *scm, const uint16_t *sb,
                  void *y, int N, int K, int is_bf16, int bits, int sub, int ksym) {
#if defined(HAVE_VNNI) || defined(HAVE_AVX2_Q)
    qact a;
    // symmetric (offset folded into the integer sums): 6 bits with sub-groups of 16 only (Q6_K)
    if (bits < 4 || bits > 6 || (sub != 16 && sub != 32) || (scm && K % 256) || (ksym && (sub != 16 || bits != 6)) ||
        prepare(x, M, N, K, is_bf16, &a))
        return -1;
    const float *s16 = NULL;
    if (sub == 16 && !(s16 = sums16(&a, M, K))) return -1;
    const int off = ksym ? 1 << (bits - 1) : 0;
#if defined(HAVE_VNNI)
    if (bits == 4 && sub == 32) return q4_gemm_tiled(&a, NULL, M, w, dm, scm, sb, y, N, K, is_bf16, 4, 1, 0);
    if (M > Q4_MR || (bits == 6 && sub == 16)) return q4_gemm_tiled(&a, s16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, 32 / sub, off);
    return qk_gemm_vnni(&a, s16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, sub);
#else
    return qk_gemm_avx2(&a, s16, M, w, dm, scm, sb, y, N, K, is_bf16, bits, sub, off);
#endif
#else
    (void)x; (void)M; (void)w; (void)dm; (void)scm; (void)sb; (void)y; (void)N; (void)K; (void)is_bf16; (void)bits;
    (void)sub; (void)ksym;
    return -1;
#endif
}

// Scales and mins as fp16 per sub-group: dm (rb, g, [d, m], s, 16).
int qk_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16, int bits,
            int sub) {
    return qk_run(x, M, w, dm, NULL, NULL, y, N, K, is_bf16, bits, sub, 0);
}

// K-quant scales kept as in the file (exact): int8 multipliers scm and fp16 super-block factors sb (see
// qk_scales512); K % 256 == 0.
int qk_gemm_ks(const void *x, int M, const uint8_t *w, const int8_t *scm, const uint16_t *sb, void *y, int N, int K,
               int is_bf16, int bits, int sub) {
    return qk_run(x, M, w, NULL, scm, sb, y, N, K, is_bf16, bits, sub, 0);
}

// Symmetric K-quants, w = d_sb·sc·(q − 2^(bits−1)) (GGUF Q6_K: bits 6, sub 16, the only one): sc alone as int8
// (rb, g, s, 16) and d_sb alone as fp16 (rb, K / 256, 16), the file's bytes (qk_gemm_ks would also read mins =
// −32·sc and factors −32·d). The offset is added to the exact integer sums per 16: no float term for the mins.
int qk_gemm_kss(const void *x, int M, const uint8_t *w, const int8_t *sc, const uint16_t *d, void *y, int N, int K,
                int is_bf16, int bits, int sub) {
    return qk_run(x, M, w, NULL, sc, d, y, N, K, is_bf16, bits, sub, 1);
}
