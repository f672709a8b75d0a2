// Bidirectional attention for encoders over packed variable-length sequences (no padding, no mask), every
// (sequence, head) pair in one OpenMP region: the per-sequence SDPA loop it replaces opens one parallel region
// per sequence and layer (192 for 32 texts through MiniLM), and each region's barrier stalls on a busy host.
// fp32 math whatever the input dtype; plain C loops that the compiler vectorises for each tier (the score loop
// runs over keys, the output loop over the head dim, so neither needs a horizontal sum).
#include "kernels.h"

#define ENC_MAX_T 1024  // tokens per sequence

#ifdef VW
#if VW == 16
#define enc_hmax _mm512_reduce_max_ps
#else
static inline float enc_hmax(vf v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    float m = t[0];
    for (int i = 1; i < 8; i++)
        m = fmaxf(m, t[i]);
    return m;
}
#endif
#define ENC_QB 4  // queries per pass: each K / V vector load feeds 4 accumulators
// One (sequence, head): kt (D, np) keys transposed, zero-padded to np = n rounded up to VW; v (n, D); q rows read
// from qkv. Scores for 4 queries × VW keys stay in registers; the output accumulates in D/VW vectors per query.
static void enc_head_vec(const void *qkv, int64_t base, int64_t row, int h, int H, int D, int n, int np,
                         const float *kt, const float *v, float *sc, void *out, int64_t out_off, float scale,
                         int is_bf16) {
    const int DV = D / VW;
    for (int i0 = 0; i0 < n; i0 += ENC_QB) {
        const int nq = n - i0 < ENC_QB ? n - i0 : ENC_QB;
        float q[ENC_QB][MAX_D];
        for (int a = 0; a < ENC_QB; a++)
            for (int d = 0; d < D; d++)
                q[a][d] = a < nq ? LOADF(qkv, base + (i0 + a) * row + (int64_t)h * D + d) * scale : 0.f;
        for (int j0 = 0; j0 < np; j0 += VW) {
            vf a0 = vf_zero(), a1 = vf_zero(), a2 = vf_zero(), a3 = vf_zero();
            for (int d = 0; d < D; d++) {
                const vf k = vf_load(kt, (int64_t)d * np + j0, 0);
                a0 = vf_fma(vf_set1(q[0][d]), k, a0);
                a1 = vf_fma(vf_set1(q[1][d]), k, a1);
                a2 = vf_fma(vf_set1(q[2][d]), k, a2);
                a3 = vf_fma(vf_set1(q[3][d]), k, a3);
            }
            vf_store(sc, j0, a0, 0);
            vf_store(sc, np + j0, a1, 0);
            vf_store(sc, 2 * np + j0, a2, 0);
            vf_store(sc, 3 * np + j0, a3, 0);
        }
        float inv[ENC_QB];
        for (int a = 0; a < nq; a++) {  // softmax, VW lanes at a time; the padded keys get exp(-87) ≈ 1e-38
            float *s = sc + (int64_t)a * np;
            for (int j = n; j < np; j++)
                s[j] = -1e30f;
            vf vm = vf_load(s, 0, 0);
            for (int j0 = VW; j0 < np; j0 += VW)
                vm = vf_max(vm, vf_load(s, j0, 0));
            const vf mx = vf_set1(enc_hmax(vm));
            vf vs = vf_zero();
            for (int j0 = 0; j0 < np; j0 += VW) {
                const vf e = vf_exp_neg(vf_sub(vf_load(s, j0, 0), mx));
                vf_store(s, j0, e, 0);
                vs = vf_add(vs, e);
            }
            inv[a] = 1.f / vf_hsum(vs);
        }
        vf o[ENC_QB][MAX_D / VW];
        for (int a = 0; a < ENC_QB; a++)
            for (int c = 0; c < DV; c++)
                o[a][c] = vf_zero();
        for (int j = 0; j < n; j++) {
            const float *vj = v + (int64_t)j * D;
            for (int c = 0; c < DV; c++) {
                const vf vv = vf_load(vj, c * VW, 0);
                for (int a = 0; a < nq; a++)
                    o[a][c] = vf_fma(vf_set1(sc[(int64_t)a * np + j]), vv, o[a][c]);
            }
        }
        for (int a = 0; a < nq; a++)
            for (int c = 0; c < DV; c++)
                vf_store(out, out_off + (int64_t)(i0 + a) * H * D + c * VW, vf_mul(o[a][c], vf_set1(inv[a])), is_bf16);
    }
}
#endif

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
        float *kt = (float *)malloc(sizeof(float) * (size_t)D * (ENC_MAX_T + 16));  // K transposed: (D, n)
        float *v = (float *)malloc(sizeof(float) * (size_t)D * ENC_MAX_T);   // (n, D)
        float *s = (float *)malloc(sizeof(float) * 4 * (ENC_MAX_T + 16));
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
#ifdef VW
            if (D % VW == 0) {
                const int np = (n + VW - 1) / VW * VW;
                for (int d = 0; d < D; d++) {
                    float *kd = kt + (int64_t)d * np;
                    for (int j = 0; j < n; j++)
                        kd[j] = LOADF(qkv, base + j * row + (int64_t)(H + h) * D + d);
                    for (int j = n; j < np; j++)
                        kd[j] = 0.f;
                }
                for (int j = 0; j < n; j++)
                    for (int d = 0; d < D; d++)
                        v[(int64_t)j * D + d] = LOADF(qkv, base + j * row + (int64_t)(2 * H + h) * D + d);
                enc_head_vec(qkv, base, row, h, H, D, n, np, kt, v, s, out, (int64_t)starts[b] * H * D + (int64_t)h * D,
                             scale, is_bf16);
                continue;
            }
#endif
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
