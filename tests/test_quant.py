"""Quantization: pack/unpack round trips, quantized matmuls vs the dequantized fp32 matmul (stated bounds),
GGUF Q4 blocks vs gguf.quants.dequantize, quantized models (in memory, GGUF-packed, written by
`inferd quantize`), perplexity."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.llm_engine import prompt_logits
from inferd.ops import cpu_kernels
from inferd.quant.gguf_blocks import unpack_q4
from inferd.quant.io import _pack_nibbles, _unpack_nibbles
from inferd.quant.linear import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    module_bytes,
    quantize_int4,
    quantize_int8,
)
from inferd.quant.perplexity import perplexity
from tests.conftest import needs_smollm2
from tests.tiny_models import write_gguf


def test_int8_round_trip_error_bound():
    w = torch.randn(64, 96)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()  # half a step


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_bound(group):
    w = torch.randn(48, 256)
    q, s, z = quantize_int4(w, group)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    err = (dequantize_int4(q, s, z, group) - w).abs().view(48, -1, group)
    assert (err <= s.unsqueeze(-1) / 2 + 1e-5).all()
    assert torch.equal(_unpack_nibbles(_pack_nibbles(q)), q)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_quantized_matmuls_match_dequantized_fp32(rows):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(192, 256, generator=g), torch.randn(rows, 256, generator=g)
    q8, s8 = quantize_int8(w)
    ref8 = x.bfloat16().float() @ (q8.float() * s8.bfloat16().float()[:, None]).t()
    got8 = Int8Linear(q8, s8)(x).float()
    # bound: bf16 rounding of activations/outputs, relative to the output scale
    assert (got8 - ref8).abs().max() <= 0.01 * ref8.abs().max()
    q4, s4, z4 = quantize_int4(w, 32)
    ref4 = x.bfloat16().float() @ dequantize_int4(q4, s4.bfloat16().float(), z4.bfloat16().float(), 32).t()
    got4 = Int4Linear(q4, s4, z4, 32)(x).float()
    assert (got4 - ref4).abs().max() <= 0.01 * ref4.abs().max()
    big = Int4Linear(q4, s4, z4, 32, dense_from_rows=16)  # bf16-copy path for big batches
    dense = big(x).float()
    assert (dense - ref4).abs().max() <= 0.01 * ref4.abs().max()
    plain = torch.nn.functional.linear(x.bfloat16(), dequantize_int4(q4, s4, z4, 32).bfloat16()).float()
    assert big.has_dense
    if rows >= 16:  # the oneDNN-prepacked copy computes exactly what F.linear on the plain copy does
        assert torch.equal(dense, plain)


def test_onednn_prepacked_linear_equals_f_linear():
    from inferd.ops import onednn

    if not onednn.available():
        pytest.skip("no native bf16 oneDNN on this CPU")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g).bfloat16()
    packed = onednn.prepack(w)
    assert packed is not None and onednn.nbytes(packed) == w.numel() * 2
    for shape in [(1, 64), (33, 64), (2, 7, 64)]:
        x = torch.randn(*shape, generator=g).bfloat16()
        assert torch.equal(onednn.linear(x, packed), torch.nn.functional.linear(x, w))
    layer = Int8Linear(*quantize_int8(w.float(), 32), dense_from_rows=32)
    assert layer.dense is None and layer.has_dense  # the packed copy replaces the buffer; bytes still counted
    from inferd.quant.linear import module_bytes

    assert module_bytes(layer) >= w.numel() * 3


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_unpack_matches_gguf_dequantize(type_name):
    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    qt = getattr(gguf.GGMLQuantizationType, type_name)
    raw = gguf.quants.quantize(w, qt)
    want = gguf.quants.dequantize(raw, qt)
    q, s, z = unpack_q4(raw, type_name, 16, 128)
    got = dequantize_int4(q, s, z, 32).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # exact: same arithmetic


def test_quantized_tiny_model_close_to_fp32(tiny_hf):
    ref = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01)
    ids = ref.tokenizer.encode("The capital of France is Paris. The quick brown fox")
    base = prompt_logits(ref.engine, ids)
    # a 64-wide random model is harsh on 4 bits (SmolLM2's perplexity, test_smollm2_quantized_perplexity and
    # docs/benchmarks.md, is the real quality check). Weight-only int8 (aten layout, bf16 activations) keeps
    # 0.999; the VNNI layouts also quantize activations to int8 per group of 32 (as llama.cpp), worth ~0.0005.
    import inferd.quant.linear as qlin

    for method, layout, bound in (("int8", "aten", 0.999), ("int8", None, 0.998), ("int4", None, 0.9)):
        if layout:
            orig, qlin.int8_layout = qlin.int8_layout, lambda q, lay=layout: lay
        try:
            q = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01, quantization=method)
        finally:
            if layout:
                qlin.int8_layout = orig
        got = prompt_logits(q.engine, ids)
        cos = torch.nn.functional.cosine_similarity(got, base, dim=-1)
        assert cos.min() > bound, (method, layout, cos.min())
        assert module_bytes(q.engine.lm.model) < module_bytes(ref.engine.lm.model) / 2


def test_gguf_q4_blocks_kept_packed(tiny_hf, tmp_path):
    path = write_gguf(tmp_path / "q41.gguf", tiny_hf, quant="Q4_1")
    dq = LLM(str(path), dtype="float32", kv_cache_memory=0.01)  # dequantized at load
    packed = LLM(str(path), dtype="float32", kv_cache_memory=0.01, quantization="gguf")
    from inferd.quant.linear import Int4Linear as I4

    layers = [m for m in packed.engine.lm.model.modules() if isinstance(m, I4)]
    assert len(layers) == 2 * 4  # every decoder linear of both layers
    ids = dq.tokenizer.encode("The capital of France")
    a, b = prompt_logits(dq.engine, ids), prompt_logits(packed.engine, ids)
    # same weights exactly; only bf16 activations inside the packed kernel differ
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999


def test_quantize_cli_writes_loadable_model(tiny_hf, tmp_path):
    dst = tmp_path / "tiny-int4"
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "quantize", str(tiny_hf), str(dst), "--method", "int4",
                        "--group-size", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    recipe = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert recipe["method"] == "int4" and recipe["group_size"] == 32
    loaded = LLM(str(dst), dtype="float32", kv_cache_memory=0.01)
    inmem = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01, quantization="int4", group_size=32)
    ids = loaded.tokenizer.encode("The capital of France")
    if cpu_kernels.has_quant_gemm():  # without our kernels in-memory int8 (the lm_head) is per channel instead
        torch.testing.assert_close(prompt_logits(loaded.engine, ids), prompt_logits(inmem.engine, ids), atol=2e-2,
                                   rtol=0)
    out = loaded.generate(["The capital"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert loaded.tokenizer.chat_template == inmem.tokenizer.chat_template


def test_perplexity_definition(tiny_llm):
    ids = tiny_llm.tokenizer.encode("The capital of France is Paris. The capital of Germany is Berlin. " * 3)
    lp = torch.log_softmax(prompt_logits(tiny_llm.engine, ids), dim=-1)
    want = math.exp(-float(lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean()))
    ppl, n = perplexity(tiny_llm.engine, ids, context=len(ids), stride=len(ids))
    assert n == len(ids) - 1 and ppl == pytest.approx(want, rel=1e-5)
    ppl2, n2 = perplexity(tiny_llm.engine, ids, context=16, stride=8)
    assert n2 == len(ids) - 1 and math.isfinite(ppl2)


def test_eval_perplexity_cli(tiny_hf, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The capital of France is Paris. " * 10)
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "eval", "perplexity", "--model", str(tiny_hf),
                        "--file", str(f), "--context", "32", "--stride", "16", "--kv-cache-memory", "0.01",
                        "--quantization", "int8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "quantization int8" in r.stdout


def test_group_size_that_does_not_divide_is_a_clear_error(tiny_hf):
    from inferd.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not divide"):
        LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01, quantization="int4", group_size=128)


@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_vnni_int8_layout_close_to_aten_kernel(rows):
    """q8rows16 (interleaved rows, int8 activations per group of 32) vs aten's int8 kernel on the same weights."""
    from inferd.ops import cpu_kernels

    if not cpu_kernels.has_quant_gemm():
        pytest.skip("no AVX512-VNNI or no compiler")
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(304, 576, generator=g), torch.randn(rows, 576, generator=g).bfloat16()
    q, s = quantize_int8(w)
    fast, ref = Int8Linear(q, s), Int8Linear(q, s, layout="aten")
    assert fast.layout == "q8rows16" and torch.equal(fast.rowmajor(), q)
    got, want = fast(x).float(), ref(x).float()
    # activations quantized to int8 (one scale per row): error within 2% of the output scale
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert torch.equal(fast(x), cpu_kernels.q8_gemm(x, fast.qweight, fast.scales, 304))


def test_vnni_int4_layout_matches_aten_and_dequant():
    from inferd.ops import cpu_kernels

    if not cpu_kernels.has_quant_gemm():
        pytest.skip("no AVX512-VNNI or no compiler")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 1536, generator=g)
    q, s, z = quantize_int4(w, 64)
    fast, ref = Int4Linear(q, s, z, 64), Int4Linear(q, s, z, 64, layout="aten")
    assert fast.layout == "q4rows16" and ref.layout == "aten"
    # unpack the layout independently: bytes (N/16, K/32, 4, 16, 4), low nibble = k 8c+b, high = 8c+4+b
    b = fast.packed.view(6, 48, 4, 16, 4)
    q_back = torch.stack([b & 15, b >> 4], dim=3).permute(0, 4, 1, 2, 3, 5).reshape(96, 1536)
    assert torch.equal(q_back.int(), q)
    d, m = fast.dm.float().permute(0, 3, 1, 2).reshape(96, 48, 2).unbind(-1)  # per row, per group of 32
    assert torch.equal(d, s.repeat_interleave(2, dim=1))  # fp16-exact by construction (quantize_int4)
    assert torch.allclose(m, (z - 8 * s).repeat_interleave(2, 1), rtol=1e-3, atol=1e-4)  # m rounded to fp16
    for rows in (1, 3, 8, 9, 64, 65):
        x = torch.randn(rows, 1536, generator=g).bfloat16()
        got, want = fast(x).float(), ref(x).float()
        assert (got - want).abs().max() <= 0.02 * want.abs().max(), rows




@needs_smollm2
def test_smollm2_quantized_perplexity_targets():
    """The issue's quality targets on the real model, through the kernels decode uses: int8 within +1% and
    int4 / GGUF Q4_1 kept packed within +5% of fp32 perplexity on the same weights."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "inference_essay.txt").read_text()
    ppl = {}
    for method, dtype in (("none", "float32"), ("int8", "bfloat16"), ("int4", "bfloat16"), ("gguf", "bfloat16")):
        llm = LLM("smollm2-135m", dtype=dtype, quantization=method, kv_cache_memory=0.2, max_model_len=1024)
        ids = llm.tokenizer.encode(text)[:1024]
        ppl[method], _ = perplexity(llm.engine, ids, context=512, stride=256)
    assert ppl["int8"] <= 1.01 * ppl["none"], ppl
    assert ppl["int4"] <= 1.05 * ppl["none"] and ppl["gguf"] <= 1.05 * ppl["none"], ppl


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_file_is_the_same_on_every_tier(tiny_hf, tmp_path, method):
    """`inferd quantize` writes one format whatever the CPU: a file written under the best tier loads under every
    other tier this machine can run (down to torch, where aten's kernels run) with the same weights, and the
    same perplexity within 0.1%."""
    from inferd.ops.kernels import runnable_tiers, use_tier
    from inferd.quant.perplexity import perplexity

    files = {}
    for tier in (runnable_tiers()[0], "torch"):  # writer tiers: with and without our int8 kernel
        r = subprocess.run([sys.executable, "-m", "inferd.cli", "quantize", str(tiny_hf), str(tmp_path / tier),
                            "--method", method], capture_output=True, text=True, env={**os.environ, "INFERD_ISA": tier})
        assert r.returncode == 0, r.stderr
        files[tier] = (tmp_path / tier / "model.safetensors").read_bytes()
    assert len(set(files.values())) == 1  # byte-identical files
    text = "The capital of France is Paris. The capital of Germany is Berlin. " * 4
    ppl = {}
    for tier in runnable_tiers():
        with use_tier(tier):
            llm = LLM(str(tmp_path / "torch"), dtype="float32", kv_cache_memory=0.01)
            ppl[tier] = perplexity(llm.engine, llm.tokenizer.encode(text), context=64, stride=32)[0]
    best = ppl[runnable_tiers()[0]]
    assert all(abs(p / best - 1) < 1e-3 for p in ppl.values()), (method, ppl)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_streamed_quantization_equals_quantizing_the_loaded_model(tiny_hf, tiny_gguf, method, fmt):
    """int8/int4 quantize each tensor as it is read (no dense model first): the same buffers as quantizing the
    whole dense model after loading it."""
    from inferd.models.registry import load_model
    from inferd.quant.apply import QuantConfig, quantize_model

    spec = str(tiny_hf if fmt == "hf" else tiny_gguf)
    qc = QuantConfig(method, 32)
    cpu = torch.device("cpu")
    streamed = load_model(spec, torch.float32, cpu, quant=qc).model
    dense = load_model(spec, torch.float32, cpu).model
    quantize_model(dense, qc)
    a, b = dict(streamed.named_buffers()), dict(dense.named_buffers())
    assert a.keys() == b.keys() and any("qkv_proj" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pa, pb = dict(streamed.named_parameters()), dict(dense.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_row_chunked_quantization_equals_whole_matrix():
    from inferd.quant.apply import _by_rows

    w = torch.randn(37, 64)
    for fn, arg in ((quantize_int8, 32), (quantize_int8, None), (quantize_int4, 32)):
        whole, chunked = fn(w, arg), _by_rows(fn, w, arg, step=8)
        assert len(whole) == len(chunked) and all(torch.equal(a, b) for a, b in zip(whole, chunked))
