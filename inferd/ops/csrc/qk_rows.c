// Rows of a 4/5/6-bit weight in the qkrows16 layout (quant/linear.py pack_qk_rows16, QKLinear) dequantized to
// fp32 or bf16: the embedding lookup in a tied lm_head's K-quant / Q5 table (a Q6_K table in Llama 3.2 and Qwen2.5
// Q4_K_M / Q4_0 files). Each asked row is read straight from its lane of the 16-row blocks (nibble bytes, high-bit
// planes, scales) with no intermediate tensors: ~2 µs a row of 2048 where the torch path (QKLinear's
// dequantized_rows_torch, the fallback and the reference) spends ~60 µs a step in small ops.
//
// The arithmetic is the torch path's, operation for operation, so the rows are bit-identical to it: d = d_sb·sc,
// m = dmin_sb·mn (K-quant scales) or the fp16 d, m (Q5_0 / Q5_1), then w = q·d + m as a product and a sum (never
// contracted to an FMA, which rounds once where torch rounds twice). Portable C, built on every tier, ARM included;
// it runs where layers take the qkrows16 layout (the tiers with the quantized GEMMs).
#include "kernels.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

// IEEE half → float, exact (subnormals, infinities and NaN included), without F16C.
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {  // subnormal: normalize
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#define PF_GROUPS 6  // groups fetched ahead: a row reads 4-6 lines of weights and one of scales per group of 32

// Fetch what row `row` reads of group gi: its lanes of the nibble chunks and bit planes, and the group's scales.
static inline void prefetch_group(const uint8_t *blk, int row, int gi, int bits, const char *sc_blk, int sc_gbytes) {
    const uint8_t *b = blk + (int64_t)gi * (256 + 64 * (bits - 4)) + 4 * row;
    for (int c = 0; c < 4 + bits - 4; c++) __builtin_prefetch(b + 64 * c);
    const char *sc = sc_blk + (int64_t)gi * sc_gbytes;
    for (int x = 0; x < sc_gbytes; x += 64) __builtin_prefetch(sc + x);
}

// One row `row` (0..15) of row block `blk` (its bytes: K/32 groups of 256 + 64·(bits − 4)) → q (K) in [0, 2^bits).
// The row's bytes are spread over every group (a lane of 4 bytes in each 64-byte line): the groups PF_GROUPS ahead
// and their scales (sc_blk: the block's, sc_gbytes a group) are fetched while one is unpacked.
static void unpack_row(const uint8_t *blk, int row, int g, int bits, uint8_t *q, const char *sc_blk, int sc_gbytes) {
    const int gbytes = 256 + 64 * (bits - 4);
    for (int gi = 0; gi < PF_GROUPS && gi < g; gi++) prefetch_group(blk, row, gi, bits, sc_blk, sc_gbytes);
    for (int gi = 0; gi < g; gi++) {
        if (gi + PF_GROUPS < g) prefetch_group(blk, row, gi + PF_GROUPS, bits, sc_blk, sc_gbytes);
        const uint8_t *b = blk + (int64_t)gi * gbytes;
        uint8_t *qg = q + 32 * gi;
        for (int c = 0; c < 4; c++) {  // nibble bytes (chunk c, row, byte): low = k 8c + byte, high = k 8c + 4 + byte
            const uint8_t *v = b + 64 * c + 4 * row;
            for (int j = 0; j < 4; j++) {
                qg[8 * c + j] = v[j] & 15;
                qg[8 * c + 4 + j] = v[j] >> 4;
            }
        }
        if (bits == 5) {  // plane byte (row, byte): bit t = bit 4 of the weight at k = 4t + byte
            const uint8_t *p = b + 256 + 4 * row;
            for (int t = 0; t < 8; t++)
                for (int j = 0; j < 4; j++) qg[4 * t + j] |= (uint8_t)(((p[j] >> t) & 1) << 4);
        } else if (bits == 6) {  // plane pl, bits 2u, 2u + 1 = bits 4-5 of the weight at k = 4(4pl + u) + byte
            for (int pl = 0; pl < 2; pl++) {
                const uint8_t *p = b + 256 + 64 * pl + 4 * row;
                for (int u = 0; u < 4; u++)
                    for (int j = 0; j < 4; j++) qg[4 * (4 * pl + u) + j] |= (uint8_t)(((p[j] >> (2 * u)) & 3) << 4);
            }
        }
    }
}

// w: packed bytes (N/16 blocks); mode 0: scales = fp16 dm (rb, g, [d, m], s, 16); mode 1: scales = int8 scm
// (rb, g, [sc, mn], s, 16), sb = fp16 (rb, K/256, [d, dmin], 16); mode 2 (symmetric, Q6_K): scm (rb, g, s, 16),
// sb (rb, K/256, 16) with mn = sc and dmin = −2^(bits−1)·d. ids: R row indices in [0, N). out: (R, K) fp32 or bf16.
// Returns -1 for a shape or mode it does not take, -2 for an id out of range (nothing written then).
int qk_rows(const uint8_t *w, const void *scales, const uint16_t *sb, const int64_t *ids, int R, int N, int K,
            int bits, int sub, int mode, void *out, int is_bf16) {
    if (bits < 4 || bits > 6 || (sub != 16 && sub != 32) || N % 16 || K % 32 || K <= 0 || K > Q4_MAXK || R < 0 ||
        mode < 0 || mode > 2 || (mode > 0 && K % 256))
        return -1;
    for (int r = 0; r < R; r++)
        if (ids[r] < 0 || ids[r] >= N) return -2;
    const int g = K / 32, ns = 32 / sub, nsb = K / 256;
    const int64_t blk_bytes = (int64_t)g * (256 + 64 * (bits - 4));
    const float sym_min = -(float)(1 << (bits - 1));
    // bytes of scales per (row block, group): fp16 [d, m] (mode 0), int8 [sc, mn] (1) or int8 sc (2), ns × 16 rows
    const int sc_gbytes = mode == 0 ? 2 * ns * 16 * 2 : mode == 1 ? 2 * ns * 16 : ns * 16;
#pragma omp parallel for schedule(static) if ((int64_t)R * K >= (1 << 17))
    for (int r = 0; r < R; r++) {
        const int64_t rb = ids[r] >> 4;
        const int row = (int)(ids[r] & 15);
        uint8_t q[Q4_MAXK];
        float o[Q4_MAXK];
        unpack_row(w + rb * blk_bytes, row, g, bits, q, (const char *)scales + rb * g * sc_gbytes, sc_gbytes);
        for (int gi = 0; gi < g; gi++) {
            for (int s = 0; s < ns; s++) {
                float d, m;
                if (mode == 0) {
                    const uint16_t *dm = (const uint16_t *)scales + ((rb * g + gi) * 2 * ns) * 16;
                    d = f16_to_f32(dm[s * 16 + row]);
                    m = f16_to_f32(dm[(ns + s) * 16 + row]);
                } else if (mode == 1) {
                    const int8_t *scm = (const int8_t *)scales + ((rb * g + gi) * 2 * ns) * 16;
                    const uint16_t *f = sb + (rb * nsb + gi / 8) * 2 * 16;
                    d = f16_to_f32(f[row]) * (float)scm[s * 16 + row];
                    m = f16_to_f32(f[16 + row]) * (float)scm[(ns + s) * 16 + row];
                } else {
                    const int8_t *scm = (const int8_t *)scales + ((rb * g + gi) * ns) * 16;
                    const float kd = f16_to_f32(sb[(rb * nsb + gi / 8) * 16 + row]);
                    const float sc = (float)scm[s * 16 + row];
                    d = kd * sc;
                    m = (sym_min * kd) * sc;
                }
                const uint8_t *qs = q + 32 * gi + sub * s;
                float *os = o + 32 * gi + sub * s;
                for (int j = 0; j < sub; j++) {
                    const float p = (float)qs[j] * d;
                    os[j] = p + m;
                }
            }
        }
        if (is_bf16) {
            uint16_t *dst = (uint16_t *)out + (int64_t)r * K;
            for (int k = 0; k < K; k++) dst[k] = f32_to_bf16(o[k]);
        } else {
            memcpy((float *)out + (int64_t)r * K, o, sizeof(float) * K);
        }
    }
    return 0;
}
