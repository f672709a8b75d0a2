// Entry points of the kernel library (one shared object built from every .c file in this folder) and the
// descriptor structs of the fused decode step, mirrored by ctypes in ops/fused_decode.py.
#ifndef INFERD_KERNELS_H
#define INFERD_KERNELS_H
#include "common.h"

int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                           const int32_t *ctx_lens, void *out, int B, int H, int Hkv, int D, int bs,
                           int max_blocks, float scale, int is_bf16, int window);
int paged_prefill_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                            const int32_t *q_starts, const int32_t *q_lens, const int32_t *ctx_lens, void *out,
                            int C, int H, int Hkv, int D, int bs, int max_blocks, float scale, int is_bf16,
                            int window);
int gemm_bf16(const uint16_t *x, int M, const uint16_t *w, void *y, int N, int K, int out_f32);
int gemv_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int N, int K);
int rms_norm(const void *x, const void *w, void *out, int rows, int dim, int64_t x_stride, float eps, int is_bf16);
int add_rms_norm(const void *x, void *residual, const void *w, void *out, int rows, int dim, float eps, int is_bf16);
int rope_inplace(void *x, int T, int heads, int head_dim, int64_t row_stride, int rot_dim, const float *cos_t,
                 const float *sin_t, const int64_t *positions, int is_bf16);
int silu_mul(const void *gu, void *out, int rows, int inter, int is_bf16);
int gelu_tanh_mul(const void *gu, void *out, int rows, int inter, int is_bf16);
int q4_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16);
int q4s_gemm(const void *x, int M, const uint8_t *w, const uint16_t *d, void *y, int N, int K, int is_bf16);
int q8_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dw, void *y, int N, int K, int is_bf16);
int qk_gemm(const void *x, int M, const uint8_t *w, const uint16_t *dm, void *y, int N, int K, int is_bf16, int bits,
            int sub);
int encoder_attention(const void *qkv, const int32_t *starts, const int32_t *lens, int B, int H, int D, void *out,
                      float scale, int is_bf16);
int quantize_rows_asym(const void *x, int M, int K, int group, int is_bf16, const float *inv, int8_t *xq,
                       float *sx, int32_t *zx, int nkeep, const int32_t *keep, float *xo);
int dequant_rows(const int32_t *acc, int G, int M, int N, const float *sx, const int32_t *zx, const int32_t *wsum,
                 const float *sw, const float *bias, void *y, int is_bf16, int act, int nkeep, const float *xo,
                 const float *wo);
int qk_gemm_ks(const void *x, int M, const uint8_t *w, const int8_t *scm, const uint16_t *sb, void *y, int N, int K,
               int is_bf16, int bits, int sub);
int qk_gemm_kss(const void *x, int M, const uint8_t *w, const int8_t *sc, const uint16_t *d, void *y, int N, int K,
                int is_bf16, int bits, int sub);
int qk_rows(const uint8_t *w, const void *scales, const uint16_t *sb, const int64_t *ids, int R, int N, int K,
            int bits, int sub, int mode, void *out, int is_bf16);
int argmax_rows(const float *x, int rows, int n, int64_t stride, int64_t *out);

// ---- the fused decode step ----
// ---- the decoder stack of a Llama-family model for decode rows, in one call ----
// Per layer: (add +) RMSNorm, qkv, [q/k RMSNorm], rotary, K/V write, paged attention (windowed or not), o,
// [RMSNorm], add + RMSNorm, gate_up, silu·mul or gelu·mul, down, [RMSNorm] — the same kernels the Python path calls
// one by one, without ~100 Python-level calls per layer. Bracketed steps run when the layer has them (Gemma 3).
typedef struct {
    int kind;  // 0: bf16 dense (gemm_bf16, up to fused_decode.py's DENSE_ROWS rows), 1: 4-bit (q4_gemm), 2: int8 (q8_gemm),
               // 3: symmetric 4-bit (q4s_gemm, a1: d alone), + 200 for qk_gemm_kss (symmetric K-quants: Q6_K),
               // 10·bits + (sub == 16) for qk_gemm (40 ... 61), + 100 for qk_gemm_ks (a2: sb);
               // 900 + n: n parts along N (w: lin_desc[n], see parts_run)
    int N, K;
    const void *w, *a1, *a2;  // weights; kind 1 and qk: dm; kind 2: fp16 scales
} lin_desc;

typedef struct {
    const void *in_norm, *post_norm;  // post_norm: the norm before the MLP (Gemma: pre_feedforward_layernorm)
    lin_desc qkv, o, gate_up, down;
    void *k_cache, *v_cache;  // this layer's (num_blocks, bs, Hkv, D) halves
    const void *q_norm, *k_norm;  // per-head RMSNorm of q and k before the rotation (Qwen3, Gemma 3), or NULL
    const void *attn_out_norm, *mlp_out_norm;  // RMSNorm of the attention / MLP output (Gemma 3), or NULL
    const float *cos, *sin;  // this layer's rotary tables (max_pos, rot_dim / 2): Gemma's local layers have their own
    int window;  // sliding window (0: none)
} layer_desc;

typedef struct {
    int M, H, Hkv, D, hidden, inter, rot_dim, bs, max_blocks, is_bf16, first;
    int act_kind;  // 0: SiLU (SwiGLU), 1: tanh-GELU (GeGLU)
    int local_max_blocks;  // width of local_block_tables
    float eps, scale;
    const int64_t *positions, *slots, *block_tables;
    const int32_t *ctx_lens;
    const float *cos, *sin;
    void *x, *residual;                // (M, hidden): layer input/output and the residual stream
    void *h, *qkv, *q, *attn, *gu, *act;  // workspaces
    // a hybrid KV cache (engine/hybrid_kv.py): slots and block tables of the sliding-window layers' own pool, used
    // by layers with a window; NULL: every layer uses slots / block_tables
    const int64_t *local_slots, *local_block_tables;
    // the model's final norm, or NULL: after the last layer residual += x and final_out = RMSNorm(residual) · w
    const void *final_norm;
    void *final_out;
} step_desc;

int decode_layers(const layer_desc *layers, int n_layers, const step_desc *s);
int decode_profile(int on, int64_t *out, int n);
int inferd_info(int64_t *out, int n);
#endif
