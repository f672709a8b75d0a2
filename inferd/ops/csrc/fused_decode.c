// The decoder stack of a Llama-family or Gemma 3 model for decode rows, in one call (see ops/fused_decode.py).
#include "kernels.h"
#include <time.h>

// Per-phase wall time of decode_layers, summed over layers and calls while profiling is on (decode_profile):
// benchmarks/decode_step_profile.py reads it to split a step into GEMMs, attention and the small row-wise ops.
// A diagnostic for one engine at a time: the sums are process-wide and not atomic. DP_ROPE also holds the per-head
// q/k norms of the families that have them.
enum { DP_NORM, DP_QKV, DP_ROPE, DP_KV, DP_ATTN, DP_O, DP_GATE_UP, DP_ACT, DP_DOWN, DP_N };
static int prof_on;  // 0 off, 1 wall clock, 2 the calling thread's CPU time (robust on a shared host at 1 thread)
static int64_t prof_ns[DP_N];

static inline int64_t now_ns(int mode) {
    struct timespec t;
    clock_gettime(mode == 2 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
// close the running phase: add the time since t0_ to `phase` and restart the clock (prof_ is the mode read once
// at the call's start, so switching profiling on or over mid-call cannot mix clocks)
#define PHASE(phase)                                 \
    if (prof_) {                                     \
        const int64_t t1_ = now_ns(prof_);           \
        prof_ns[phase] += t1_ - t0_;                 \
        t0_ = t1_;                                   \
    }

// on: 1 (wall clock) or 2 (thread CPU time) start, clearing the sums; 0 stop. out: the DP_N sums in ns (NULL: none). Returns DP_N.
int decode_profile(int on, int64_t *out, int n) {
    for (int i = 0; i < n && i < DP_N && out; i++) out[i] = prof_ns[i];
    if (on) memset(prof_ns, 0, sizeof(prof_ns));
    prof_on = on;
    return DP_N;
}

static int linear_run(const lin_desc *l, const void *x, void *y, int M, int is_bf16);

// kind 900 + n: a layer kept as n parts along N (ConcatLinear: a fused layer of several K-quant types), `w` their
// descriptors. One row: each part writes its slice of y. More rows: each part into a per-thread buffer (M, N_part),
// then its columns of y (the copy is ~M·N elements, next to the part's GEMM).
static int parts_run(const lin_desc *l, const void *x, void *y, int M, int is_bf16) {
    static __thread char *buf = NULL;
    static __thread size_t cap = 0;
    const lin_desc *p = (const lin_desc *)l->w;
    const int np = l->kind - 900, E = is_bf16 ? 2 : 4;
    int off = 0;
    for (int i = 0; i < np; i++) {
        if (p[i].K != l->K || off + p[i].N > l->N) return -1;
        if (M == 1) {
            if (linear_run(p + i, x, (char *)y + (size_t)off * E, 1, is_bf16)) return -1;
        } else {
            const size_t need = (size_t)M * p[i].N * E;
            if (need > cap) {
                free(buf);
                buf = (char *)malloc(need);
                cap = buf ? need : 0;
                if (!buf) return -1;
            }
            if (linear_run(p + i, x, buf, M, is_bf16)) return -1;
            for (int m = 0; m < M; m++)
                memcpy((char *)y + ((size_t)m * l->N + off) * E, buf + (size_t)m * p[i].N * E, (size_t)p[i].N * E);
        }
        off += p[i].N;
    }
    return off == l->N ? 0 : -1;
}

static int linear_run(const lin_desc *l, const void *x, void *y, int M, int is_bf16) {
    if (l->kind > 900 && l->kind <= 908) return parts_run(l, x, y, M, is_bf16);
    switch (l->kind) {
    case 0:
        return is_bf16 ? gemm_bf16((const uint16_t *)x, M, (const uint16_t *)l->w, y, l->N, l->K, 0) : -1;
    case 1:
        return q4_gemm(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16);
    case 3:
        return q4s_gemm(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16);
    case 2:
        return q8_gemm(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16);
    }
    if (l->kind >= 240 && l->kind <= 261)
        return qk_gemm_kss(x, M, (const uint8_t *)l->w, (const int8_t *)l->a1, (const uint16_t *)l->a2, y, l->N, l->K,
                           is_bf16, l->kind / 10 - 20, l->kind % 10 ? 16 : 32);
    if (l->kind >= 140 && l->kind <= 161)
        return qk_gemm_ks(x, M, (const uint8_t *)l->w, (const int8_t *)l->a1, (const uint16_t *)l->a2, y, l->N, l->K,
                          is_bf16, l->kind / 10 - 10, l->kind % 10 ? 16 : 32);
    if (l->kind >= 40 && l->kind <= 61)
        return qk_gemm(x, M, (const uint8_t *)l->w, (const uint16_t *)l->a1, y, l->N, l->K, is_bf16, l->kind / 10,
                       l->kind % 10 ? 16 : 32);
    return -1;
}

int decode_layers(const layer_desc *layers, int n_layers, const step_desc *s) {
    const int M = s->M, E = s->is_bf16 ? 2 : 4;
    const int qdim = s->H * s->D, kvdim = s->Hkv * s->D, qkvdim = qdim + 2 * kvdim;
    char *qkv = (char *)s->qkv;
    const int prof_ = prof_on;
    int64_t t0_ = prof_ ? now_ns(prof_) : 0;
    for (int i = 0; i < n_layers; i++) {
        const layer_desc *L = layers + i;
        if (i == 0 && s->first) {
            memcpy(s->residual, s->x, (size_t)M * s->hidden * E);
            rms_norm(s->x, L->in_norm, s->h, M, s->hidden, s->hidden, s->eps, s->is_bf16);
        } else {
            add_rms_norm(s->x, s->residual, L->in_norm, s->h, M, s->hidden, s->eps, s->is_bf16);
        }
        PHASE(DP_NORM)
        if (linear_run(&L->qkv, s->h, qkv, M, s->is_bf16)) return -1;
        PHASE(DP_QKV)
        const float *cos_t = L->cos ? L->cos : s->cos, *sin_t = L->sin ? L->sin : s->sin;
        for (int m = 0; m < M && L->q_norm; m++) {  // per head, in place, before the rotation
            char *row = qkv + (size_t)m * qkvdim * E;
            rms_norm(row, L->q_norm, row, s->H, s->D, s->D, s->eps, s->is_bf16);
            rms_norm(row + (size_t)qdim * E, L->k_norm, row + (size_t)qdim * E, s->Hkv, s->D, s->D, s->eps,
                     s->is_bf16);
        }
        rope_inplace(qkv, M, s->H, s->D, qkvdim, s->rot_dim, cos_t, sin_t, s->positions, s->is_bf16);
        rope_inplace(qkv + (size_t)qdim * E, M, s->Hkv, s->D, qkvdim, s->rot_dim, cos_t, sin_t, s->positions,
                     s->is_bf16);
        PHASE(DP_ROPE)
        const int own_pool = L->window && s->local_slots;  // a window layer of a hybrid KV cache
        const int64_t *slots = own_pool ? s->local_slots : s->slots;
        for (int m = 0; m < M; m++) {
            const char *row = qkv + (size_t)m * qkvdim * E;
            memcpy((char *)s->q + (size_t)m * qdim * E, row, (size_t)qdim * E);
            memcpy((char *)L->k_cache + (size_t)slots[m] * kvdim * E, row + (size_t)qdim * E, (size_t)kvdim * E);
            memcpy((char *)L->v_cache + (size_t)slots[m] * kvdim * E, row + (size_t)(qdim + kvdim) * E,
                   (size_t)kvdim * E);
        }
        PHASE(DP_KV)
        if (paged_decode_attention(s->q, L->k_cache, L->v_cache, own_pool ? s->local_block_tables : s->block_tables,
                                   s->ctx_lens, s->attn, M, s->H, s->Hkv, s->D, s->bs,
                                   own_pool ? s->local_max_blocks : s->max_blocks, s->scale, s->is_bf16, L->window))
            return -1;
        PHASE(DP_ATTN)
        if (linear_run(&L->o, s->attn, s->x, M, s->is_bf16)) return -1;
        PHASE(DP_O)
        if (L->attn_out_norm) rms_norm(s->x, L->attn_out_norm, s->x, M, s->hidden, s->hidden, s->eps, s->is_bf16);
        add_rms_norm(s->x, s->residual, L->post_norm, s->h, M, s->hidden, s->eps, s->is_bf16);
        PHASE(DP_NORM)
        if (linear_run(&L->gate_up, s->h, s->gu, M, s->is_bf16)) return -1;
        PHASE(DP_GATE_UP)
        if (s->act_kind == 1)
            gelu_tanh_mul(s->gu, s->act, M, s->inter, s->is_bf16);
        else
            silu_mul(s->gu, s->act, M, s->inter, s->is_bf16);
        PHASE(DP_ACT)
        if (linear_run(&L->down, s->act, s->x, M, s->is_bf16)) return -1;
        PHASE(DP_DOWN)
        if (L->mlp_out_norm) rms_norm(s->x, L->mlp_out_norm, s->x, M, s->hidden, s->hidden, s->eps, s->is_bf16);
        PHASE(DP_NORM)
    }
    if (s->final_norm) {  // the model's final norm, as the caller's RMSNorm.add_forward would run it
        add_rms_norm(s->x, s->residual, s->final_norm, s->final_out, M, s->hidden, s->eps, s->is_bf16);
        PHASE(DP_NORM)
    }
    return 0;
}

// Facts about this build for ops/kernels.py: limits, struct sizes (checked against the ctypes mirrors), and
// which vector bodies were compiled in. Returns the number of values written.
int inferd_info(int64_t *out, int n) {
    const int64_t v[] = {
        MAX_H, MAX_D, MAX_BS, Q4_MAXK, (int64_t)sizeof(lin_desc), (int64_t)sizeof(layer_desc),
        (int64_t)sizeof(step_desc),
#ifdef VW
        VW,
#else
        1,
#endif
#if defined(__AVX512BF16__)
        1,
#else
        0,
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
        1,
#else
        0,
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
        1,
#else
        0,
#endif
    };
    const int nv = (int)(sizeof(v) / sizeof(v[0]));
    for (int i = 0; i < n && i < nv; i++) out[i] = v[i];
    return nv;
}
