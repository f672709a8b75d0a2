"""The C kernels of the active tier (ops/kernels.py) against torch reference computations. CI runs this file
once per tier the machine can execute (INFERD_ISA=...), so every tier's vector bodies are checked here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from inferd.ops import cpu_kernels
from inferd.ops.kernels import TIERS, get_kernels, runnable_tiers, supported_tiers, use_tier
from inferd.quant.linear import Int4Linear, Int8Linear, quantize_activations_q8, quantize_int4, quantize_int8

K = get_kernels()
needs_c = pytest.mark.skipif(not K.available, reason=f"kernel tier {K.tier}: no C kernels")
needs_vector = pytest.mark.skipif(not K.dense_gemm, reason=f"kernel tier {K.tier}: no vector kernels")
needs_quant = pytest.mark.skipif(not K.quant_gemm, reason=f"kernel tier {K.tier}: no int4/int8 GEMMs")


def test_tier_is_one_this_cpu_supports():
    assert K.tier in supported_tiers() and supported_tiers()[-1] == "torch"
    if K.available:  # limits come from the library (csrc/common.h), struct sizes were checked at load
        assert (K.max_heads, K.max_head_dim, K.max_block_size) == (64, 256, 64)
        assert K.vector_width in (1, 8, 16)


def test_inferd_isa_forces_a_tier_and_rejects_unknown_ones():
    env = {k: v for k, v in os.environ.items() if k != "INFERD_DISABLE_C_KERNELS"} | {"INFERD_ISA": "torch"}
    code = "from inferd.ops.kernels import get_kernels; print(get_kernels().tier)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    if "avx2_fma" in supported_tiers():  # a forced tier also picks that tier's dtype: fp32 without AVX512-BF16
        env["INFERD_ISA"] = "avx2"
        dt = subprocess.run([sys.executable, "-c", "import torch; from inferd.hardware import pick_dtype; "
                             "print(pick_dtype('auto', torch.device('cpu')))"], env=env, capture_output=True,
                            text=True, check=True)
        assert dt.stdout.strip() == "torch.float32"
    env["INFERD_ISA"] = "avx9000"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "choose one of" in bad.stderr and all(t in bad.stderr for t in TIERS)


def test_without_a_c_compiler_everything_runs_on_torch(tiny_hf, tmp_path):
    """No compiler (CC names a missing one and there is no gcc/cc on PATH): tier torch, generation works."""
    code = ("from inferd import LLM, SamplingParams; from inferd.ops.kernels import get_kernels; "
            f"llm = LLM({str(tiny_hf)!r}, dtype='float32', kv_cache_memory=0.01); "
            "o = llm.generate(['hello'], SamplingParams(max_tokens=4, temperature=0))[0]; "
            "print(get_kernels().tier, len(o.outputs[0].token_ids))")
    env = {**os.environ, "CC": "/nonexistent/cc", "PATH": str(tmp_path), "INFERD_HOME": str(tmp_path),
           "INFERD_ISA": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch", "4"]


@needs_vector
def test_logits_gemm_writes_fp32_accumulation():
    """gemm_bf16_f32 (the lm_head): fp32 output equal to an fp32 matmul of the same bf16 values up to
    summation order, i.e. far finer than a bf16 step."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 576, generator=g).bfloat16()
    for rows in (1, 5, 40):
        x = (4 * torch.randn(rows, 576, generator=g)).bfloat16()
        y = cpu_kernels.gemm_bf16_f32(x, w)
        assert y is not None and y.dtype == torch.float32
        ref = x.double() @ w.double().t()
        assert (y.double() - ref).abs().max() < 1e-3  # a bf16 step at |y| ~ 50 is 0.25
    assert cpu_kernels.gemm_bf16_f32(x[:, :100].contiguous(), w[:, :100].contiguous()) is None  # K % 32


def _quant_layers(n: int = 64, k: int = 256, seed: int = 4):
    """An int8 and an int4 layer of the same random weights, their dequantized weights, and a generator."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, scale, zero = quantize_int4(w, 32)
    q8 = Int8Linear(*quantize_int8(w, 32))
    m = (zero - 8 * scale).half().float()  # the kernel's w = d·q + m keeps m in fp16
    w4 = (q.view(n, -1, 32).float() * scale.unsqueeze(-1) + m.unsqueeze(-1)).view(n, k)
    return q8, Int4Linear(q, scale, zero, 32), (q8.dequantized(), w4), g


def _quant_reference(x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """What the kernels compute: activations quantized to int8 per group of 32 (RNE), dot with dequantized W."""
    return quantize_activations_q8(x) @ wq.t()


@needs_quant
@pytest.mark.parametrize("rows", [1, 3, 19])
def test_quant_gemms_match_reference(rows):
    q8, q4, refs, g = _quant_layers()
    assert q8.layout == "q8rows16" and q4.layout == "q4rows16"
    x = torch.randn(rows, 256, generator=g)
    for layer, wq in zip((q8, q4), refs):
        torch.testing.assert_close(layer(x), _quant_reference(x, wq), atol=2e-3, rtol=2e-3)


QUANT_TIERS = [t for t in runnable_tiers() if t in ("avx512_bf16_vnni", "avx512", "avx2_fma")]


@pytest.mark.skipif(len(QUANT_TIERS) < 2, reason="needs two tiers with quantized GEMMs on this CPU")
def test_quant_gemms_bit_identical_across_tiers():
    """The VNNI and AVX2 bodies compute the same exact integer sums and the same float steps."""
    outs = {}
    for tier in QUANT_TIERS:
        with use_tier(tier):
            q8, q4, _, g = _quant_layers()
            x = torch.randn(7, 256, generator=g)
            outs[tier] = (q8(x), q4(x), q8(x.bfloat16()))
    first = next(iter(outs.values()))
    for tier, o in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(o, first)), tier


@needs_c
@pytest.mark.parametrize("tier", [t for t in runnable_tiers() if t != "torch"])
def test_decode_attention_matches_sdpa(tier):
    """Every tier's decode kernel (the vector bodies score VW keys at a time: blocks of 16 and of 12 keys, not a
    multiple of the lanes; lengths ending anywhere in a block; windows starting mid-block) against sdpa; a batch of
    fewer than 4 sequences (split by KV head among the threads) gives the same rows bit for bit."""
    g = torch.Generator().manual_seed(0)
    with use_tier(tier):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            for H, hkv, D in ((9, 3, 64), (4, 2, 16), (8, 8, 32), (32, 8, 64)):  # the last: Llama 3.2 1B (specialised)
                for bs, window in ((16, 0), (12, 0), (16, 21)):
                    cache = torch.randn(2, 40, bs, hkv, D, generator=g).to(dtype)
                    B = 6
                    tables = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(B)])
                    lens = torch.tensor([1, 16, 17, 50, 73, 96], dtype=torch.int32)
                    q = torch.randn(B, H, D, generator=g).to(dtype)
                    got = cpu_kernels.paged_decode_attention(q, cache, tables, lens, 0.3, window=window or None)
                    k = cache[0][tables].reshape(B, -1, hkv, D).transpose(1, 2).float().repeat_interleave(H // hkv, 1)
                    v = cache[1][tables].reshape(B, -1, hkv, D).transpose(1, 2).float().repeat_interleave(H // hkv, 1)
                    j = torch.arange(k.shape[2]).unsqueeze(0)
                    mask = j < lens.unsqueeze(1)
                    if window:
                        mask &= j > lens.unsqueeze(1) - 1 - window
                    ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=mask.view(B, 1, 1, -1),
                                                         scale=0.3).squeeze(2)
                    err = float((got.float() - ref).abs().max())
                    assert err <= tol * (1 + float(ref.abs().max())), (tier, dtype, H, bs, window, err)
                    for lo, hi in ((3, 4), (3, 6)):  # fewer than 4 sequences: each KV head a work item of its own
                        part = cpu_kernels.paged_decode_attention(q[lo:hi].contiguous(), cache, tables[lo:hi],
                                                                  lens[lo:hi], 0.3, window=window or None)
                        assert torch.equal(part, got[lo:hi]), (tier, dtype, H, bs, window, lo, hi)




@needs_vector
def test_bf16_gemv_matches_torch():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=g).bfloat16()
    x = torch.randn(576, generator=g).bfloat16()
    y = cpu_kernels.gemv_bf16(w, x)
    assert y is not None and y.dtype == torch.bfloat16
    ref = torch.mv(w.float(), x.float())
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.01)
    assert cpu_kernels.gemv_bf16(w[:, :100].contiguous(), x[:100].contiguous()) is None  # K % 32 != 0


@pytest.mark.parametrize("tier", ["avx512_bf16_vnni", "avx512", "avx2_fma"])
def test_multirow_bf16_gemm_matches_reference_and_single_rows(tier):
    """gemm_bf16 for 1..11 rows (tiles of 4 weight rows × up to 5 x rows on AVX-512, 2 on AVX2; N not a multiple of
    8): fp32 output equals an fp64 matmul of the same bf16 values up to summation order, and every row, fp32 or bf16
    out, equals the one-row call bit for bit (the fused decoder's verification rows equal plain decode rows)."""
    if tier not in runnable_tiers():
        pytest.skip(f"this CPU cannot run kernel tier {tier}")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(203, 96, generator=g).bfloat16()
    with use_tier(tier) as k:
        assert k.dense_gemm

        def gemm(x: torch.Tensor, out: torch.dtype) -> torch.Tensor:
            y = torch.empty(x.shape[0], w.shape[0], dtype=out)
            assert k.lib.gemm_bf16(x.data_ptr(), x.shape[0], w.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1],
                                   int(out == torch.float32)) == 0
            return y

        for rows in range(1, 12):
            x = (4 * torch.randn(rows, 96, generator=g)).bfloat16()
            y = gemm(x, torch.float32)
            assert (y.double() - x.double() @ w.double().t()).abs().max() < 1e-3  # a bf16 step at |y| ~ 50: 0.25
            for out in (torch.float32, torch.bfloat16):
                assert torch.equal(gemm(x, out), torch.cat([gemm(x[i : i + 1].clone(), out) for i in range(rows)]))




@needs_c
def test_norm_and_silu_match_torch():
    g = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        x, res, w = (torch.randn(3, 96, generator=g).to(dtype) for _ in range(3))
        w = w[0]
        want_res = res + x
        want = (torch.nn.functional.rms_norm(want_res.float(), (96,), None, 1e-5).to(dtype) * w)
        res2 = res.clone()
        got = cpu_kernels.add_rms_norm(x, res2, w, 1e-5)
        torch.testing.assert_close(res2, want_res, atol=0, rtol=0)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        for rows, inter in ((3, 40), (20, 1536)):  # 40: 16- or 8-wide vectors plus a scalar tail; 20 rows: threads
            gu = 4 * torch.randn(rows, 2 * inter, generator=g).to(dtype)
            gate, up = gu.chunk(2, dim=-1)
            torch.testing.assert_close(cpu_kernels.silu_mul(gu).float(),
                                       (torch.nn.functional.silu(gate) * up).float(), atol=tol, rtol=tol)
        x = torch.randn(20, 576, generator=g).to(dtype)
        w = torch.randn(576, generator=g).to(dtype)
        want = torch.nn.functional.rms_norm(x.float(), (576,), None, 1e-5).to(dtype) * w
        torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5).float(), want.float(), atol=tol, rtol=tol)



