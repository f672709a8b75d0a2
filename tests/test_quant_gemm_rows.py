"""The packed quantized GEMMs of ops/csrc/quant_gemm.c at many activation rows (the register tiles of 4 rows × 2 row
blocks, the remainders of 1-3 rows and of one row block, the scales and >4-bit weights unpacked once per row-block
pair): every format against the dequantized fp32 matmul, every row bit-identical to a one-row call, and every tier
with the kernels bit-identical to the others, on each kernel tier this CPU can force."""

from __future__ import annotations

import sys

import pytest
import torch

from inferd.ops.kernels import runnable_tiers, use_tier
from inferd.quant.linear import (
    dequantize_qk,
    pack_q4_rows16,
    pack_qk_rows16,
    quantize_activations_q8,
    unpack_qk_rows16,
)

N, K = 80, 512  # 5 row blocks (two pairs and a single one), 16 groups of 32, 2 super-blocks of 256
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33]  # 1-4 rows: one tile; then tiles of 4 and a remainder
CASES = ["q4", "q4s", "qk4", "qk5", "qk6_16", "q4k_ks", "q6k_ks", "q6k_kss"]
QUANT_TIERS = ["avx512_bf16_vnni", "avx512", "avx2_fma"]  # the tiers with quantized GEMM bodies (VNNI, AVX2)


def _operands(case: str, g: torch.Generator) -> tuple[str, list[torch.Tensor], tuple[int, ...], torch.Tensor]:
    """(entry point, packed tensors, trailing int args, dequantized fp32 weights (N, K)) for one format."""
    if case == "q4":  # Q4_0 / Q4_1 / int4: fp16 d and m per 32
        q = torch.randint(0, 16, (N, K), generator=g)
        scale = torch.rand(N, K // 32, generator=g) * 0.02 + 0.002
        zero = torch.randn(N, K // 32, generator=g) * 0.01
        w, dm = pack_q4_rows16(q, scale, zero, 32)
        dmf = dm.float().view(N // 16, K // 32, 2, 16).permute(2, 0, 3, 1).reshape(2, N, K // 32)
        return "q4_gemm", [w, dm], (), dequantize_qk(q, dmf[0], dmf[1], 32)
    if case == "q4s":  # Q4_0: w = d·(q − 8), fp16 d alone per 32 (the offset in the integer sums)
        q = torch.randint(0, 16, (N, K), generator=g)
        scale = torch.rand(N, K // 32, generator=g) * 0.02 + 0.002
        w, d16 = pack_q4_rows16(q, scale, torch.zeros(N, K // 32), 32, symmetric=True)
        d = d16.float().view(N // 16, K // 32, 16).permute(0, 2, 1).reshape(N, K // 32)
        return "q4s_gemm", [w, d16], (), dequantize_qk(q, d, -8 * d, 32)
    if case in ("qk4", "qk5", "qk6_16"):  # fp16 scales and mins per sub-group
        bits, sub = {"qk4": (4, 32), "qk5": (5, 32), "qk6_16": (6, 16)}[case]
        q = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
        d = torch.rand(N, K // sub, generator=g) * 0.01 + 0.001
        m = -torch.rand(N, K // sub, generator=g) * 0.05
        w, dm = pack_qk_rows16(q, d, m, bits, sub)
        q2, d2, m2 = unpack_qk_rows16(w, dm, N, K, bits, sub)  # the fp16-rounded scales the kernel reads
        return "qk_gemm", [w, dm], (bits, sub), dequantize_qk(q2, d2, m2, sub)
    if case == "q6k_kss":  # Q6_K symmetric: int8 sc (rb, g, s, 16) and fp16 d_sb (rb, g / 8, 16) alone, m = −32 d
        nrb, G = N // 16, K // 32
        q = torch.randint(0, 64, (N, K), generator=g, dtype=torch.uint8)
        w, _ = pack_qk_rows16(q, torch.ones(N, K // 16), torch.zeros(N, K // 16), 6, 16)
        sc = torch.randint(-64, 64, (nrb, G, 2, 16), generator=g, dtype=torch.int8)
        sbd = (torch.rand(nrb, G // 8, 16, generator=g) * 0.001 + 0.0002).half()
        dd = sc.float() * sbd.float().repeat_interleave(8, dim=1).unsqueeze(2)  # (rb, g, s, 16)
        d = dd.permute(0, 3, 1, 2).reshape(N, K // 16)
        return "qk_gemm_kss", [w, sc.contiguous(), sbd.contiguous()], (6, 16), dequantize_qk(q, d, -32 * d, 16)
    # K-quant scales as the file keeps them: int8 multipliers (rb, g, [sc, mn], s, 16), fp16 super-block factors
    # (rb, g / 8, [d, dmin], 16); d = sc · d_sb, m = mn · dmin_sb
    bits, sub = (4, 32) if case == "q4k_ks" else (6, 16)
    ns, nrb, G = 32 // sub, N // 16, K // 32
    q = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
    w, _ = pack_qk_rows16(q, torch.ones(N, K // sub), torch.zeros(N, K // sub), bits, sub)
    sc = torch.randint(0, 64, (nrb, G, ns, 16), generator=g, dtype=torch.int8)
    mn = -torch.randint(0, 64, (nrb, G, ns, 16), generator=g, dtype=torch.int8)
    scm = torch.stack([sc, mn], dim=2).contiguous()  # (rb, g, 2, s, 16)
    sbd = (torch.rand(nrb, G // 8, 2, 16, generator=g) * 0.001 + 0.0002).half()
    sb = sbd.contiguous()
    per_g = sbd.float().repeat_interleave(8, dim=1)  # (rb, g, 2, 16)
    dd = sc.float() * per_g[:, :, 0:1, :]  # (rb, g, s, 16)
    mm = mn.float() * per_g[:, :, 1:2, :]
    d = dd.permute(0, 3, 1, 2).reshape(N, K // sub)
    m = mm.permute(0, 3, 1, 2).reshape(N, K // sub)
    return "qk_gemm_ks", [w, scm, sb], (bits, sub), dequantize_qk(q, d, m, sub)


def _call(lib, name: str, ops: list[torch.Tensor], extra: tuple[int, ...], x: torch.Tensor) -> torch.Tensor | None:
    y = torch.empty(x.shape[0], N, dtype=x.dtype)
    rc = getattr(lib, name)(x.data_ptr(), x.shape[0], *[t.data_ptr() for t in ops], y.data_ptr(), N, K,
                            int(x.dtype == torch.bfloat16), *extra)
    return y if rc == 0 else None


@pytest.mark.parametrize("tier", QUANT_TIERS + ["scalar"])
def test_many_row_quant_gemms_match_reference_and_single_rows(tier):
    if tier not in runnable_tiers():
        pytest.skip(f"this CPU cannot run kernel tier {tier}")
    g = torch.Generator().manual_seed(11)
    with use_tier(tier) as k:
        for case in CASES:
            name, ops, extra, wd = _operands(case, g)
            x = torch.randn(max(ROWS), K, generator=g)
            if tier == "scalar":  # no quantized GEMM bodies: the kernels decline and the layers compute in torch
                assert not k.quant_gemm and _call(k.lib, name, ops, extra, x[:3].contiguous()) is None
                continue
            ones = torch.cat([_call(k.lib, name, ops, extra, x[i:i + 1].clone()) for i in range(max(ROWS))])
            for rows in ROWS:
                xi = x[:rows].contiguous()
                y = _call(k.lib, name, ops, extra, xi)
                assert y is not None, (case, rows)
                assert torch.equal(y, ones[:rows]), (tier, case, rows)  # each row as if it were alone
                scale = float((xi @ wd.t()).abs().max())
                err_q = float((y - quantize_activations_q8(xi) @ wd.t()).abs().max()) / scale
                assert err_q < 1e-5, (tier, case, rows, err_q)  # the kernel's own math: fp32 rounding only
                err = float((y - xi @ wd.t()).abs().max()) / scale
                assert err < 0.01, (tier, case, rows, err)  # the bound, with int8 activations
            xb = x[:17].bfloat16()  # bf16 in and out: rows again independent of the step's size
            yb = _call(k.lib, name, ops, extra, xb)
            assert yb is not None and yb.dtype == torch.bfloat16
            assert torch.equal(yb, torch.cat([_call(k.lib, name, ops, extra, xb[i:i + 1].clone()) for i in range(17)]))


@pytest.mark.skipif(len([t for t in QUANT_TIERS if t in runnable_tiers()]) < 2,
                    reason="needs two tiers with quantized GEMMs on this CPU")
def test_many_row_quant_gemms_bit_identical_across_tiers():
    """The VNNI tiles and the AVX2 bodies compute the same exact integer sums and the same float steps per row."""
    outs: dict[str, list[torch.Tensor]] = {}
    for tier in [t for t in QUANT_TIERS if t in runnable_tiers()]:
        g = torch.Generator().manual_seed(12)
        with use_tier(tier) as k:
            outs[tier] = []
            for case in CASES:
                name, ops, extra, _ = _operands(case, g)
                x = torch.randn(21, K, generator=g)
                outs[tier].append(_call(k.lib, name, ops, extra, x))
    first = next(iter(outs.values()))
    for tier, o in outs.items():
        for case, a, b in zip(CASES, o, first):
            assert a is not None and torch.equal(a, b), (tier, case)


@pytest.mark.parametrize("tier", QUANT_TIERS)
def test_q6k_k_blocks_and_row_chunks_match_single_rows(tier, monkeypatch):
    """Symmetric Q6_K at ≥ 8 rows on VNNI passes K in blocks of 16 groups (the first tile of a block leaves its
    unpacked weights for the others; partial sums wait between blocks) and rows in chunks of 64: K = 1280 gives
    blocks of 16, 16 and 8 groups, 8-70 rows every remainder tile and a last chunk of 1-6. Every row as if alone,
    and the reference's value (on the other tiers: their bodies at these shapes)."""
    if tier not in runnable_tiers():
        pytest.skip(f"this CPU cannot run kernel tier {tier}")
    monkeypatch.setattr(sys.modules[__name__], "K", 1280)
    g = torch.Generator().manual_seed(13)
    with use_tier(tier) as k:
        name, ops, extra, wd = _operands("q6k_kss", g)
        x = torch.randn(70, K, generator=g)
        ones = torch.cat([_call(k.lib, name, ops, extra, x[i:i + 1].clone()) for i in range(70)])
        for rows in range(8, 71):  # every remainder tile after 4-row tiles, and last chunks of 1-6 rows
            xi = x[:rows].contiguous()
            y = _call(k.lib, name, ops, extra, xi)
            assert y is not None and torch.equal(y, ones[:rows]), rows
            scale = float((xi @ wd.t()).abs().max())
            assert float((y - quantize_activations_q8(xi) @ wd.t()).abs().max()) / scale < 1e-5, rows
