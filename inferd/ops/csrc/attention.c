// Attention over the paged KV cache, read in place (no gather copy).
//
// paged_decode_attention: one query token per sequence. Parallel over sequences (fewer than 4: over (sequence,
// kv head)); the G query heads of a KV head share every K/V load; online softmax one block of tokens at a time.
#include "kernels.h"

// One K or V row of D values from the cache, as fp32.
static inline void load_row(const void *cache, int64_t off, int D, int is_bf16, float *out) {
    for (int d = 0; d < D; d++) out[d] = LOADF(cache, off + d);
}

// One sequence: every head, reading each K/V block front to back (sequential, prefetch-friendly).
// Inlined with constant Hkv, G and D so the short inner loops unroll.
static inline __attribute__((always_inline)) void attn_seq(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *bt, int start, int ctx, void *out, int b,
    const int Hkv, const int G, const int D, int bs, float scale, const int is_bf16, int64_t next_seq_blk, int kh0,
    int kh1) {
    (void)next_seq_blk, (void)kh0, (void)kh1;  // every KV head (ATTN_SPLIT is 1 without vector bodies)
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
    for (int j = start / bs; j < nblk; j++) {  // keys start .. ctx-1: only the blocks they lie in
        const int n = (j == nblk - 1) ? ctx - j * bs : bs;
        const int t0 = j == start / bs ? start - j * bs : 0;
        const int64_t base = bt[j] * blk_stride;
        for (int t = t0; t < n; t++) {
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
            for (int t = t0; t < n; t++) mx = s[h][t] > mx ? s[h][t] : mx;
            const float corr = m[h] == -INFINITY ? 0.f : exp_neg(m[h] - mx);
            l[h] *= corr;
            for (int d = 0; d < D; d++) acc[h][d] *= corr;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int t = t0; t < n; t++) {
                s[h][t] = exp_neg(s[h][t] - mx);
                sum += s[h][t];
            }
            l[h] += sum;
            m[h] = mx;
        }
        for (int t = t0; t < n; t++) {
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


#ifdef VW
// r[i] = the sum of v[SLOT(i)]'s lanes, i < VW: VW horizontal sums in log2(VW) rounds of shuffles and adds (one
// _mm512_reduce_add_ps costs about as much as this does for all 16).
#define SLOT(i) (((i) & 3) * (VW / 4) + ((i) >> 2))
#if VW == 16
static inline vf vf_reduce_lanes(const vf *v) {
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
#define vf_hmax _mm512_reduce_max_ps
#else
static inline vf vf_reduce_lanes(const vf *v) {
    vf a[4], b[2];
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}
static inline float vf_hmax(vf v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
#endif

// Fetch the K and V row of one token and KV head (row_bytes at byte offset off) into the cache.
static inline void prefetch_row(const void *k_cache, const void *v_cache, int64_t off, int row_bytes) {
    for (int x = 0; x < row_bytes; x += 64) {
        __builtin_prefetch((const char *)k_cache + off + x);
        __builtin_prefetch((const char *)v_cache + off + x);
    }
}

// Vector version for D a multiple of VW: K/V rows converted VW lanes at a time. Scores VW keys at a time: each
// key's dot product as FMAs into one vector per head, the VW vectors summed across lanes together
// (vf_reduce_lanes); the block's softmax (max, exp, sum) on vectors of keys; V accumulated with broadcast FMAs.
// next_seq_blk: the first block the next work item reads (-1: none), fetched while this one's last block is
// computed. KV heads kh0 .. kh1-1 only (and their query heads): a sequence may be split among threads.
static inline __attribute__((always_inline)) void attn_seq_vec(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *bt, int start, int ctx, void *out, int b,
    const int Hkv, const int G, const int D, int bs, float scale, const int is_bf16, int64_t next_seq_blk, int kh0,
    int kh1) {
    const int H = Hkv * G, NV = D / VW;
    vf qv[MAX_H][MAX_D / VW], acc[MAX_H][MAX_D / VW];
    vf part[MAX_H][VW];  // per head of the KV head: the dot-product vectors of VW keys (slot SLOT(i) for key i)
    float m[MAX_H], l[MAX_H], s[MAX_H][MAX_BS + VW];
    const int64_t tok_stride = (int64_t)Hkv * D;
    const int64_t blk_stride = (int64_t)bs * tok_stride;
    const vf sc = vf_set1(scale);
    for (int h = kh0 * G; h < kh1 * G; h++) {
        for (int i = 0; i < NV; i++) {
            qv[h][i] = vf_mul(vf_load(q, ((int64_t)b * H + h) * D + i * VW, is_bf16), sc);
            acc[h][i] = vf_zero();
        }
        m[h] = -INFINITY;
        l[h] = 0.f;
    }
    const int nblk = (ctx + bs - 1) / bs;
    for (int j = start / bs; j < nblk; j++) {  // keys start .. ctx-1: only the blocks they lie in
        const int n = (j == nblk - 1) ? ctx - j * bs : bs;
        const int t0 = j == start / bs ? start - j * bs : 0;
        const int nch = (n - t0 + VW - 1) / VW, tend = t0 + nch * VW;  // keys t0 .. n-1 in chunks of VW
        const int64_t base = bt[j] * blk_stride;
        // the next block (this sequence's or the next one's first) is fetched while this one is computed: the
        // blocks of a step's sequences lie anywhere in the pool, beyond what the hardware prefetcher follows
        const int64_t next = j + 1 < nblk ? bt[j + 1] : next_seq_blk;
        const int elt = is_bf16 ? 2 : 4;
        // one KV head at a time (the block's K and V stay in L1 across them): its G heads' q and accumulators
        // are local arrays of constant size (kept in registers where the dispatch makes G and D constants)
        for (int kh = kh0; kh < kh1; kh++) {
            vf ql[MAX_H][MAX_D / VW];
            for (int g = 0; g < G; g++)
                for (int u = 0; u < NV; u++) ql[g][u] = qv[kh * G + g][u];
            for (int c = 0; c < nch; c++) {
                const int tc = t0 + c * VW, k = n - tc < VW ? n - tc : VW;
                for (int i = 0; i < VW; i++) {
                    if (i >= k) {
                        for (int g = 0; g < G; g++) part[g][SLOT(i)] = vf_zero();
                        continue;
                    }
                    const int64_t off = base + (tc + i) * tok_stride + (int64_t)kh * D;
                    if (next >= 0)  // the same row of the next block, one row per row computed
                        prefetch_row(k_cache, v_cache, (next * blk_stride + (tc + i) * tok_stride + (int64_t)kh * D) * elt,
                                     D * elt);
                    vf kv[MAX_D / VW];
                    for (int u = 0; u < NV; u++) kv[u] = vf_load(k_cache, off + u * VW, is_bf16);
                    for (int g = 0; g < G; g++) {
                        vf a = vf_mul(ql[g][0], kv[0]);
                        for (int u = 1; u < NV; u++) a = vf_fma(ql[g][u], kv[u], a);
                        part[g][SLOT(i)] = a;
                    }
                }
                for (int g = 0; g < G; g++) vf_store(s[g], tc, vf_reduce_lanes(part[g]), 0);
            }
            if (next >= 0)  // the next block's rows this block has no row for (a partial first or last block)
                for (int t = 0; t < bs; t++)
                    if (t < t0 || t >= n)
                        prefetch_row(k_cache, v_cache, (next * blk_stride + t * tok_stride + (int64_t)kh * D) * elt,
                                     D * elt);
            vf al[MAX_H][MAX_D / VW];
            for (int g = 0; g < G; g++) {  // the block's softmax step of each head
                const int h = kh * G + g;
                for (int t = n; t < tend; t++) s[g][t] = -INFINITY;
                vf mv = vf_set1(m[h]);
                for (int c = 0; c < nch; c++) mv = vf_max(mv, vf_load(s[g], t0 + c * VW, 0));
                const float mx = vf_hmax(mv);
                const float corr = m[h] == -INFINITY ? 0.f : exp_neg(m[h] - mx);
                l[h] *= corr;
                const vf cv = vf_set1(corr);
                for (int u = 0; u < NV; u++) al[g][u] = vf_mul(acc[h][u], cv);
                const vf mxv = vf_set1(mx);
                for (int c = 0; c < nch; c++)
                    vf_store(s[g], t0 + c * VW, vf_exp_neg(vf_sub(vf_load(s[g], t0 + c * VW, 0), mxv)), 0);
                for (int t = n; t < tend; t++) s[g][t] = 0.f;
                vf sum = vf_zero();
                for (int c = 0; c < nch; c++) sum = vf_add(sum, vf_load(s[g], t0 + c * VW, 0));
                l[h] += vf_hsum(sum);
                m[h] = mx;
            }
            for (int t = t0; t < n; t++) {
                const int64_t off = base + t * tok_stride + (int64_t)kh * D;
                vf vv[MAX_D / VW];
                for (int u = 0; u < NV; u++) vv[u] = vf_load(v_cache, off + u * VW, is_bf16);
                for (int g = 0; g < G; g++) {
                    const vf p = vf_set1(s[g][t]);
                    for (int u = 0; u < NV; u++) al[g][u] = vf_fma(p, vv[u], al[g][u]);
                }
            }
            for (int g = 0; g < G; g++)
                for (int u = 0; u < NV; u++) acc[kh * G + g][u] = al[g][u];
        }
    }
    for (int h = kh0 * G; h < kh1 * G; h++) {
        const vf inv = vf_set1(l[h] > 0.f ? 1.f / l[h] : 0.f);
        const int64_t ooff = ((int64_t)b * H + h) * D;
        for (int i = 0; i < NV; i++) vf_store(out, ooff + i * VW, vf_mul(acc[h][i], inv), is_bf16);
    }
}
#define ATTN_FAST attn_seq_vec
#define ATTN_VW VW
// work items per sequence: with fewer sequences than 4 (a single stream) each KV head is one, so every thread works
#define ATTN_SPLIT(B) ((B) >= 4 ? 1 : Hkv)
#else
#define ATTN_FAST attn_seq
#define ATTN_VW 1
#define ATTN_SPLIT(B) 1
#endif

// item w of B · split: sequence w / split, its KV heads of part w % split
#define ITEM_ARGS(w, split, HKV) \
    block_tables + (int64_t)((w) / (split)) * max_blocks, WSTART(ctx_lens[(w) / (split)]), ctx_lens[(w) / (split)], out, \
    (w) / (split)
#define ITEM_TAIL(w, split, HKV) \
    (w) % (split) == (split) - 1 ? NEXT_SEQ_BLK((w) / (split)) : -1, (w) % (split) * (HKV) / (split), \
    ((w) % (split) + 1) * (HKV) / (split)
#define DISPATCH(HKV, GV, DV, BF)                                                                         \
    if (Hkv == HKV && G == GV && D == DV && is_bf16 == BF) {                                              \
        const int split = ATTN_SPLIT(B);                                                                  \
        _Pragma("omp parallel for schedule(dynamic, 1)") for (int w = 0; w < B * split; w++)              \
            ATTN_FAST(q, k_cache, v_cache, ITEM_ARGS(w, split, HKV), HKV, GV, DV, bs, scale, BF, ITEM_TAIL(w, split, HKV)); \
        return 0;                                                                                         \
    }

// the first key a query at position ctx - 1 sees under a sliding window (0: the whole context)
#define WSTART(ctx) (window > 0 && (ctx) > window ? (ctx) - window : 0)
// the first block sequence b + 1 reads (-1: b is the last)
#define NEXT_SEQ_BLK(b) ((b) + 1 < B && ctx_lens[(b) + 1] > 0 ? block_tables[(int64_t)((b) + 1) * max_blocks + WSTART(ctx_lens[(b) + 1]) / bs] : -1)

// dtype: 0 = float32, 1 = bfloat16 (q, caches and out share it). window > 0: a sliding-window layer, the query at
// position p sees keys p - window < j <= p (transformers' convention) and only the blocks holding them are read.
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                           const int32_t *ctx_lens, void *out, int B, int H, int Hkv, int D, int bs,
                           int max_blocks, float scale, int is_bf16, int window) {
    const int G = H / Hkv;
    if (H > MAX_H || D > MAX_D || bs > MAX_BS) return -1;
    DISPATCH(3, 3, 64, 1)  // SmolLM2-135M
    DISPATCH(3, 3, 64, 0)
    DISPATCH(1, 4, 256, 1)  // Gemma 3 270M
    DISPATCH(8, 4, 64, 1)   // Llama 3.2 1B
    const int split = D % ATTN_VW == 0 ? ATTN_SPLIT(B) : 1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int w = 0; w < B * split; w++) {
        if (D % ATTN_VW == 0)
            ATTN_FAST(q, k_cache, v_cache, ITEM_ARGS(w, split, Hkv), Hkv, G, D, bs, scale, is_bf16,
                      ITEM_TAIL(w, split, Hkv));
        else
            attn_seq(q, k_cache, v_cache, ITEM_ARGS(w, split, Hkv), Hkv, G, D, bs, scale, is_bf16, -1, 0, Hkv);
    }
    return 0;
}



// paged_prefill_attention: the query rows of C prefill chunks (chunk c: q_lens[c] consecutive rows of the
// flat batch from q_starts[c], the last q_lens[c] positions of a context of ctx_lens[c] tokens) against
// their context read in place from the paged cache, causal (the chunk's own K/V are already written). One
// work item is (chunk, KV head, tile of PF_QT rows): it converts each run of 16 keys once (K transposed to
// D × 16 so one FMA chain scores 16 keys for a query), shared by the tile's rows and the G query heads of
// the KV head; online softmax per query. Replaces one SDPA call per chunk and the gather of its context.
#define PF_QT 16
#if defined(__AVX512F__) || (defined(VW) && VW == 8)
// The work items (chunk, tile of PF_QT rows, KV head) of a call, as triples; NULL when out of memory.
static int *prefill_items(const int32_t *q_lens, int C, int Hkv, int *n_items) {
    int n = 0;
    for (int c = 0; c < C; c++) n += (q_lens[c] + PF_QT - 1) / PF_QT * Hkv;
    int *items = malloc(sizeof(int) * 3 * (size_t)(n ? n : 1));
    if (!items) return NULL;
    for (int c = 0, k = 0; c < C; c++)
        for (int t = 0; t < (q_lens[c] + PF_QT - 1) / PF_QT; t++)
            for (int kh = 0; kh < Hkv; kh++, k++) {
                items[3 * k] = c;
                items[3 * k + 1] = t;
                items[3 * k + 2] = kh;
            }
    *n_items = n;
    return items;
}
#endif
// window > 0: sliding window, a row at position p sees keys p - window < j <= p; runs of keys no row of a tile sees
// are skipped.
int paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                            const int32_t *q_starts, const int32_t *q_lens, const int32_t *ctx_lens, void *out,
                            int C, int H, int Hkv, int D, int bs, int max_blocks, float scale, int is_bf16,
                            int window) {
#ifdef __AVX512F__
    if (Hkv <= 0 || H % Hkv || D % 16 || bs % 16 || D > MAX_D || H > MAX_H) return -1;
    const int G = H / Hkv, NV = D / 16, NQ = PF_QT * G;
    int n_items;
    int *items = prefill_items(q_lens, C, Hkv, &n_items);
    if (!items) return -2;
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
                        _mm512_store_ps(qf + (int64_t)j * D + i * 16, _mm512_mul_ps(vf_load(q, qoff + i * 16, is_bf16), sc));
                        _mm512_store_ps(acc + (int64_t)j * D + i * 16, _mm512_setzero_ps());
                    }
                    m[j] = -INFINITY;
                    l[j] = 0.f;
                }
            const int nk = pos0 + r1;  // keys 0 .. nk-1 are visible to some row of the tile
            const __m512i sidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi32(16));
            int kfirst = window > 0 ? pos0 + r0 - window + 1 : 0;  // the first key the tile's first row sees
            kfirst = kfirst < 0 ? 0 : kfirst / 16 * 16;
            for (int k0 = kfirst; k0 < nk; k0 += 16) {
                const int n = nk - k0 < 16 ? nk - k0 : 16;
                const int64_t base = bt[k0 / bs] * blk_stride + (int64_t)(k0 % bs) * tok_stride + (int64_t)kh * D;
                for (int t = 0; t < 16; t++) {
                    if (t < n) {
                        const int64_t off = base + t * tok_stride;
                        for (int i = 0; i < NV; i++) {  // K row → column t of kt (a scatter with stride 16)
                            _mm512_i32scatter_ps(kt + i * 256 + t, sidx, vf_load(k_cache, off + i * 16, is_bf16), 4);
                            _mm512_store_ps(vf + t * D + i * 16, vf_load(v_cache, off + i * 16, is_bf16));
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
                        if (window > 0 && u < nq) {  // keys before p - window + 1 are outside the row's window
                            int lo = pos0 + r0 + (j0 + u) / G - window + 1 - k0;
                            lo = lo < 0 ? 0 : (lo > 16 ? 16 : lo);
                            vis[u] &= (__mmask16)~((1u << lo) - 1u);
                        }
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
                        const __m512 p = _mm512_maskz_mov_ps(vis[u], vf_exp_neg(_mm512_sub_ps(sq[u], _mm512_set1_ps(mx))));
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
                        vf_store(out, ooff + i * 16, _mm512_mul_ps(_mm512_load_ps(acc + (int64_t)j * D + i * 16), inv), is_bf16);
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
#elif defined(VW) && VW == 8
    // AVX2 + FMA: the same algorithm over runs of 8 keys (K run transposed to D × 8 by scalar stores, no scatter;
    // visibility as lane masks built by comparisons instead of AVX-512 mask registers)
    if (Hkv <= 0 || H % Hkv || D % 8 || bs % 8 || D > MAX_D || H > MAX_H) return -1;
    const int G = H / Hkv, NV = D / 8, NQ = PF_QT * G;
    int n_items;
    int *items = prefill_items(q_lens, C, Hkv, &n_items);
    if (!items) return -2;
    const int64_t tok_stride = (int64_t)Hkv * D, blk_stride = (int64_t)bs * tok_stride;
    int failed = 0;
#pragma omp parallel
    {
        float *qf = aligned_alloc(32, sizeof(float) * NQ * D), *acc = aligned_alloc(32, sizeof(float) * NQ * D);
        float *kt = aligned_alloc(32, sizeof(float) * D * 8), *vf8 = aligned_alloc(32, sizeof(float) * 8 * D);
        float *m = malloc(sizeof(float) * NQ), *l = malloc(sizeof(float) * NQ);
        if (!qf || !acc || !kt || !vf8 || !m || !l) {
#pragma omp atomic write
            failed = 1;
        }
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < n_items; it++) {
            if (failed) continue;
            const int c = items[3 * it], r0 = items[3 * it + 1] * PF_QT, kh = items[3 * it + 2];
            const int r1 = q_lens[c] < r0 + PF_QT ? q_lens[c] : r0 + PF_QT, nr = r1 - r0;
            const int pos0 = ctx_lens[c] - q_lens[c];
            const int64_t *bt = block_tables + (int64_t)c * max_blocks;
            const __m256 sc = _mm256_set1_ps(scale);
            for (int rr = 0; rr < nr; rr++)
                for (int g = 0; g < G; g++) {
                    const int j = rr * G + g;
                    const int64_t qoff = ((int64_t)(q_starts[c] + r0 + rr) * H + kh * G + g) * D;
                    for (int i = 0; i < NV; i++) {
                        _mm256_store_ps(qf + (int64_t)j * D + i * 8, _mm256_mul_ps(v8_load(q, qoff + i * 8, is_bf16), sc));
                        _mm256_store_ps(acc + (int64_t)j * D + i * 8, _mm256_setzero_ps());
                    }
                    m[j] = -INFINITY;
                    l[j] = 0.f;
                }
            const int nk = pos0 + r1;
            int kfirst = window > 0 ? pos0 + r0 - window + 1 : 0;
            kfirst = kfirst < 0 ? 0 : kfirst / 8 * 8;
            for (int k0 = kfirst; k0 < nk; k0 += 8) {
                const int n = nk - k0 < 8 ? nk - k0 : 8;
                const int64_t base = bt[k0 / bs] * blk_stride + (int64_t)(k0 % bs) * tok_stride + (int64_t)kh * D;
                for (int t = 0; t < 8; t++) {
                    if (t < n) {
                        const int64_t off = base + t * tok_stride;
                        for (int i = 0; i < NV; i++) {
                            float row[8];
                            _mm256_storeu_ps(row, v8_load(k_cache, off + i * 8, is_bf16));
                            for (int e = 0; e < 8; e++) kt[(i * 8 + e) * 8 + t] = row[e];
                            _mm256_store_ps(vf8 + t * D + i * 8, v8_load(v_cache, off + i * 8, is_bf16));
                        }
                    } else {
                        for (int d = 0; d < D; d++) kt[d * 8 + t] = 0.f;
                    }
                }
                int jstart = (k0 - pos0 - r0) * G;
                if (jstart < 0) jstart = 0;
                for (int j0 = jstart; j0 < nr * G; j0 += 4) {
                    const int nq = nr * G - j0 < 4 ? nr * G - j0 : 4;
                    __m256 sq[4];
                    int lo[4], lim[4];
                    for (int u = 0; u < 4; u++) {
                        sq[u] = _mm256_setzero_ps();
                        int hi = u < nq ? pos0 + r0 + (j0 + u) / G - k0 + 1 : 0;  // keys [lo, hi) of the run visible
                        lim[u] = hi < 0 ? 0 : (hi > n ? n : hi);
                        int a = window > 0 && u < nq ? pos0 + r0 + (j0 + u) / G - window + 1 - k0 : 0;
                        lo[u] = a < 0 ? 0 : (a > 8 ? 8 : a);
                    }
                    const float *q0 = qf + (int64_t)j0 * D;
                    for (int d = 0; d < D; d++) {
                        const __m256 kd = _mm256_load_ps(kt + d * 8);
                        for (int u = 0; u < nq; u++) sq[u] = _mm256_fmadd_ps(_mm256_set1_ps(q0[u * D + d]), kd, sq[u]);
                    }
                    float pt[4][8], corr[4];
                    for (int u = 0; u < nq; u++) {
                        const int j = j0 + u;
                        if (lo[u] >= lim[u]) {  // row sees none of these keys
                            memset(pt[u], 0, sizeof(pt[u]));
                            corr[u] = 1.f;
                            continue;
                        }
                        const __m256 vis = _mm256_castsi256_ps(_mm256_and_si256(
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(lim[u]), lane),
                            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo[u] - 1))));
                        float s8[8];
                        _mm256_storeu_ps(s8, sq[u]);
                        float mx_run = -INFINITY;
                        for (int t = lo[u]; t < lim[u]; t++) mx_run = s8[t] > mx_run ? s8[t] : mx_run;
                        const float mx = mx_run > m[j] ? mx_run : m[j];
                        corr[u] = m[j] == -INFINITY ? 0.f : exp_neg(m[j] - mx);
                        const __m256 p = _mm256_and_ps(vis, vf_exp_neg(_mm256_sub_ps(sq[u], _mm256_set1_ps(mx))));
                        l[j] = l[j] * corr[u] + vf_hsum(p);
                        m[j] = mx;
                        _mm256_storeu_ps(pt[u], p);
                    }
                    for (int i = 0; i < NV; i++) {
                        __m256 a[4];
                        for (int u = 0; u < nq; u++)
                            a[u] = _mm256_mul_ps(_mm256_load_ps(acc + (int64_t)(j0 + u) * D + i * 8), _mm256_set1_ps(corr[u]));
                        for (int t = 0; t < n; t++) {
                            const __m256 vt = _mm256_load_ps(vf8 + t * D + i * 8);
                            for (int u = 0; u < nq; u++) a[u] = _mm256_fmadd_ps(_mm256_set1_ps(pt[u][t]), vt, a[u]);
                        }
                        for (int u = 0; u < nq; u++) _mm256_store_ps(acc + (int64_t)(j0 + u) * D + i * 8, a[u]);
                    }
                }
            }
            for (int rr = 0; rr < nr; rr++)
                for (int g = 0; g < G; g++) {
                    const int j = rr * G + g;
                    const __m256 inv = _mm256_set1_ps(l[j] > 0.f ? 1.f / l[j] : 0.f);
                    const int64_t ooff = ((int64_t)(q_starts[c] + r0 + rr) * H + kh * G + g) * D;
                    for (int i = 0; i < NV; i++)
                        v8_store(out, ooff + i * 8, _mm256_mul_ps(_mm256_load_ps(acc + (int64_t)j * D + i * 8), inv), is_bf16);
                }
        }
        free(qf);
        free(acc);
        free(kt);
        free(vf8);
        free(m);
        free(l);
    }
    free(items);
    return failed ? -2 : 0;
#else
    (void)q; (void)k_cache; (void)v_cache; (void)block_tables; (void)q_starts; (void)q_lens; (void)ctx_lens;
    (void)out; (void)C; (void)H; (void)Hkv; (void)D; (void)bs; (void)max_blocks; (void)scale; (void)is_bf16;
    (void)window;
    return -1;
#endif
}

// y = W x for one bf16 row x (K) and a bf16 weight W (N, K) row-major; fp32 accumulation, bf16 output.
// With AVX512-BF16, vdpbf16ps does 32 multiply-adds per instruction; 4 rows per step share each x load.
