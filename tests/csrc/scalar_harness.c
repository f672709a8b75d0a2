// Runs the kernel library's portable (scalar) C bodies on fixed inputs and prints every output, one line per
// kernel: "name rc v0 v1 ...". tests/test_arm64_build.py links it against the library built for aarch64 (run under
// qemu-aarch64) and for this x86 machine's scalar tier, and compares the two outputs.
#include <stdio.h>
#include <stdlib.h>
#include "../../inferd/ops/csrc/kernels.h"

static uint32_t seed = 12345u;
static float rnd(void) {  // uniform in [-1, 1), the same sequence on every machine
    seed = seed * 1664525u + 1013904223u;
    return (float)(seed >> 8) / 8388608.f - 1.f;
}
static void fill(float *p, int n, float scale) {
    for (int i = 0; i < n; i++) p[i] = rnd() * scale;
}
static void show_f(const char *name, int rc, const float *p, int n) {
    printf("%s %d", name, rc);
    for (int i = 0; i < n; i++) printf(" %.9g", p[i]);
    printf("\n");
}
static void show_i(const char *name, int rc, const int32_t *p, int n) {
    printf("%s %d", name, rc);
    for (int i = 0; i < n; i++) printf(" %d", p[i]);
    printf("\n");
}

int main(void) {
    enum { R = 3, DIM = 40 };
    float x[R * DIM], w[DIM], out[R * DIM], res[R * DIM];
    fill(x, R * DIM, 2.f);
    fill(w, DIM, 1.f);
    show_f("rms_norm", rms_norm(x, w, out, R, DIM, DIM, 1e-6f, 0), out, R * DIM);
    fill(res, R * DIM, 1.f);
    show_f("add_rms_norm", add_rms_norm(x, res, w, out, R, DIM, 1e-6f, 0), out, R * DIM);
    show_f("add_rms_norm.residual", 0, res, R * DIM);
    show_f("silu_mul", silu_mul(x, out, R, DIM / 2, 0), out, R * DIM / 2);
    show_f("gelu_tanh_mul", gelu_tanh_mul(x, out, R, DIM / 2, 0), out, R * DIM / 2);

    enum { T = 4, HEADS = 2, HD = 16 };
    float q[T * HEADS * HD], cs[8 * HD / 2], sn[8 * HD / 2];
    int64_t pos[T] = {0, 3, 5, 7};
    fill(q, T * HEADS * HD, 1.f);
    for (int i = 0; i < 8 * HD / 2; i++) {
        cs[i] = (float)(i % 7) / 7.f;
        sn[i] = (float)(i % 5) / 5.f;
    }
    show_f("rope_inplace", rope_inplace(q, T, HEADS, HD, HEADS * HD, HD, cs, sn, pos, 0), q, T * HEADS * HD);

    // encoder attention: two sequences (3 and 5 tokens), 2 heads of 8
    enum { NT = 8, EH = 2, ED = 8 };
    float qkv[NT * 3 * EH * ED], eo[NT * EH * ED];
    int32_t starts[2] = {0, 3}, lens[2] = {3, 5};
    fill(qkv, NT * 3 * EH * ED, 1.5f);
    show_f("encoder_attention", encoder_attention(qkv, starts, lens, 2, EH, ED, eo, 0.35f, 0), eo, NT * EH * ED);

    // paged decode attention: 2 sequences, 2 query heads over 1 KV head, head dim 8, blocks of 4
    enum { B = 2, H = 2, HKV = 1, D = 8, BS = 4, NB = 3 };
    float kc[NB * BS * HKV * D], vc[NB * BS * HKV * D], dq[B * H * D], dout[B * H * D];
    int64_t tables[B * 2] = {0, 2, 1, 0};
    int32_t ctx[B] = {6, 3};
    fill(kc, NB * BS * HKV * D, 1.f);
    fill(vc, NB * BS * HKV * D, 1.f);
    fill(dq, B * H * D, 1.f);
    show_f("paged_decode_attention",
           paged_decode_attention(dq, kc, vc, tables, ctx, dout, B, H, HKV, D, BS, 2, 0.35f, 0, 0), dout, B * H * D);

    // W8A8: quantize 3 rows of 16 channels (one outlier channel kept in fp32), then the epilogue with GELU
    enum { M = 3, K = 16, N = 5 };
    float xa[M * K], inv[K], sx[M], xo[M], sw[N], bias[N], wo[N], y[M * N];
    int8_t xq[M * K];
    int32_t zx[M], xqi[M * K], acc[M * N], wsum[N], keep[1] = {2};
    fill(xa, M * K, 3.f);
    for (int k = 0; k < K; k++) inv[k] = k == 2 ? 0.f : 0.5f + 0.05f * (float)k;
    int rc = quantize_rows_asym(xa, M, K, K, 0, inv, xq, sx, zx, 1, keep, xo);
    for (int i = 0; i < M * K; i++) xqi[i] = xq[i];
    show_i("quantize_rows_asym.xq", rc, xqi, M * K);
    show_i("quantize_rows_asym.zx", rc, zx, M);
    show_f("quantize_rows_asym.sx", rc, sx, M);
    show_f("quantize_rows_asym.xo", rc, xo, M);
    for (int i = 0; i < M * N; i++) acc[i] = (int32_t)(rnd() * 20000.f);
    for (int n = 0; n < N; n++) {
        wsum[n] = (int32_t)(rnd() * 500.f);
        sw[n] = 0.01f + 0.001f * (float)n;
        bias[n] = rnd();
        wo[n] = rnd();
    }
    show_f("dequant_rows", dequant_rows(acc, 1, M, N, sx, zx, wsum, sw, bias, y, 0, 1, 1, xo, wo), y, M * N);

    // the tier's limits and struct sizes, as the Python loader reads them
    int64_t info[16];
    int n = inferd_info(info, 16);
    printf("inferd_info %d", n);
    for (int i = 0; i < n; i++) printf(" %lld", (long long)info[i]);
    printf("\n");
    return 0;
}
