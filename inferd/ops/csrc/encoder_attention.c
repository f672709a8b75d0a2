// Bidirectional attention for encoders over packed variable-length sequences (no padding, no mask), every
// (sequence, head) pair in one OpenMP region: the per-sequence SDPA loop it replaces opens one parallel region
// per sequence and layer (192 for 32 texts through MiniLM), and each region's barrier stalls on a busy host.
// fp32 math whatever the input dtype; plain C loops that the compiler vectorises for each tier (the score loop
// runs over keys, the output loop over the head dim, so neither needs a horizontal sum).
#include "kernels.h"

#define ENC_MAX_T 1024  // tokens per sequence

// qkv: (N, 3, H, D) packed rows (q, k, v of token t at t·3HD); starts/lens (B): each sequence's rows;
// out: (N, H·D). Returns -1 when a shape is over the limits (the caller then uses torch).
int encoder_attention(const void *qkv, const int32_t *starts, const int32_t *lens, int B, int H, int D, void *out,
                      float scale, int is_bf16) {
    if (B <= 0 || H <= 0 || D <= 0 || D > MAX_D)
        return -1;
    for (int b = 0; b < B; b++)
        if (lens[b] <= 0 || lens[b] > ENC_MAX_T)
            return -1;
    const int64_t row = 3LL * H * D;
    int failed = 0;
#pragma omp parallel
    {
        float *kt = (float *)malloc(sizeof(float) * (size_t)D * ENC_MAX_T);  // K transposed: (D, n)
        float *v = (float *)malloc(sizeof(float) * (size_t)D * ENC_MAX_T);   // (n, D)
        float *s = (float *)malloc(sizeof(float) * ENC_MAX_T);
        if (!kt || !v || !s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * H; task++) {
            if (failed)
                continue;
            const int b = task / H, h = task % H, n = lens[b];
            const int64_t base = (int64_t)starts[b] * row;
            for (int j = 0; j < n; j++)
                for (int d = 0; d < D; d++) {
                    kt[(int64_t)d * n + j] = LOADF(qkv, base + j * row + (int64_t)(H + h) * D + d);
                    v[(int64_t)j * D + d] = LOADF(qkv, base + j * row + (int64_t)(2 * H + h) * D + d);
                }
            for (int i = 0; i < n; i++) {
                float q[MAX_D], o[MAX_D];
                for (int d = 0; d < D; d++) {
                    q[d] = LOADF(qkv, base + i * row + (int64_t)h * D + d) * scale;
                    o[d] = 0.f;
                }
                for (int j = 0; j < n; j++)
                    s[j] = 0.f;
                for (int d = 0; d < D; d++) {
                    const float qd = q[d];
                    const float *kd = kt + (int64_t)d * n;
                    for (int j = 0; j < n; j++)
                        s[j] += qd * kd[j];
                }
                float mx = s[0];
                for (int j = 1; j < n; j++)
                    mx = fmaxf(mx, s[j]);
                float sum = 0.f;
                for (int j = 0; j < n; j++) {
                    s[j] = exp_neg(s[j] - mx);
                    sum += s[j];
                }
                const float inv = 1.f / sum;
                for (int j = 0; j < n; j++) {
                    const float p = s[j] * inv;
                    const float *vj = v + (int64_t)j * D;
                    for (int d = 0; d < D; d++)
                        o[d] += p * vj[d];
                }
                const int64_t off = ((int64_t)starts[b] + i) * H * D + (int64_t)h * D;
                for (int d = 0; d < D; d++) {
                    if (is_bf16)
                        ((uint16_t *)out)[off + d] = f32_to_bf16(o[d]);
                    else
                        ((float *)out)[off + d] = o[d];
                }
            }
        }
        free(kt);
        free(v);
        free(s);
    }
    return failed ? -1 : 0;
}
