"""The CUDA path (skipped where no GPU is visible; the rest of the suite also runs on CUDA there, since
the engine's device default is `auto`): CPU fp32 vs CUDA parity for the model, the engine and the packed
int8 / int4 layers, including GGUF Q4_1 blocks kept packed."""

from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.llm_engine import prompt_logits
from inferd.quant.linear import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8
from tests.tiny_models import write_gguf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

PROMPTS = ["hello world", "the quick brown fox jumps", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def test_engine_cuda_fp32_matches_cpu(tiny_hf):
    cpu = LLM(str(tiny_hf), dtype="float32", device="cpu", kv_cache_memory=0.05)
    gpu = LLM(str(tiny_hf), dtype="float32", device="cuda", kv_cache_memory=0.05)
    assert gpu.engine.lm.device.type == "cuda"
    ids = cpu.engine.lm.tokenizer.encode(PROMPTS[2])
    a, b = prompt_logits(cpu.engine, ids), prompt_logits(gpu.engine, ids)
    assert (a - b).abs().max() < 1e-3
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    # batched decode, chunked prefill (small budget) and the paged cache on the device
    outs_cpu = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, sp)]
    outs_gpu = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, sp)]
    assert outs_cpu == outs_gpu


def test_engine_cuda_bf16_and_seeded_sampling(tiny_hf):
    gpu = LLM(str(tiny_hf), dtype="bfloat16", device="cuda", kv_cache_memory=0.05, max_num_batched_tokens=8)
    sp = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = gpu.generate(PROMPTS, sp)
    b = gpu.generate(PROMPTS[::-1], sp)[::-1]
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 16 for o in a)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_cuda_packed_layers_match_dequantized(rows):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(192, 256, generator=g), torch.randn(rows, 256, generator=g)
    q8, s8 = quantize_int8(w)
    ref8 = x.bfloat16().float() @ (q8.float() * s8.bfloat16().float()[:, None]).t()
    got8 = Int8Linear(q8.cuda(), s8.cuda())(x.cuda()).float().cpu()
    assert (got8 - ref8).abs().max() <= 0.01 * ref8.abs().max()
    for group in (32, 64, 128):
        q4, s4, z4 = quantize_int4(w, group)
        ref4 = x.bfloat16().float() @ dequantize_int4(q4, s4.bfloat16().float(), z4.bfloat16().float(), group).t()
        got4 = Int4Linear(q4.cuda(), s4.cuda(), z4.cuda(), group)(x.cuda()).float().cpu()
        assert (got4 - ref4).abs().max() <= 0.01 * ref4.abs().max(), group


@pytest.mark.parametrize("method", ["int8", "int4", "gguf"])
def test_quantized_model_on_cuda_matches_cpu(tiny_hf, tmp_path, method):
    src = str(write_gguf(tmp_path / "q41.gguf", tiny_hf, quant="Q4_1")) if method == "gguf" else str(tiny_hf)
    kw = dict(dtype="bfloat16", kv_cache_memory=0.05, quantization=method)
    cpu, gpu = LLM(src, device="cpu", **kw), LLM(src, device="cuda", **kw)
    ids = cpu.engine.lm.tokenizer.encode(PROMPTS[1])
    a, b = prompt_logits(cpu.engine, ids), prompt_logits(gpu.engine, ids)
    # same packed weights, different kernels: bf16 accumulation order differs
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.995
