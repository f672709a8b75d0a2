"""Gemma 3's decode step as one C call (ops/fused_decode.py: q/k RMSNorm, the four norms, tanh-GELU MLP, per-layer
rotary tables and sliding windows) gives exactly the tokens of the layer-by-layer Python path, for one and for several
sequences, generating past 2x the window (window 8 over KV blocks of 4, every other layer), on this process's kernel
tier and (4-bit bf16) on the lower tiers this CPU runs."""

from __future__ import annotations

import pytest

from inferd.ops.kernels import get_kernels, runnable_tiers, use_tier
from tests.tiny_archs import build_hf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    build_hf("gemma3", root / "hf")
    return root / "hf"


def _llm(path, dtype, method):
    from inferd import LLM

    return LLM(str(path), dtype=dtype, quantization=method, kv_cache_memory=0.02, device="cpu", block_size=4)


DEFAULT = get_kernels().tier
# every layer kind on this process's tier; the 4-bit bf16 case (the default for a GGUF) on the lower tiers too
CASES = [(DEFAULT, "float32", "int8"), (DEFAULT, "bfloat16", "none"), (DEFAULT, "bfloat16", "int4")] + \
    [(t, "bfloat16", "int4") for t in runnable_tiers() if t not in (DEFAULT, "torch")]


@pytest.mark.parametrize("tier,dtype,method", CASES)
def test_fused_gemma3_equals_python_layers(gemma_dir, tier, dtype, method):
    from inferd import SamplingParams
    from inferd.ops import cpu_kernels

    with use_tier(tier) as kern:
        if method != "none" and not kern.quant_gemm:
            pytest.skip(f"tier {tier} has no quantized GEMMs: the fused path does not run aten's")
        if method == "none" and dtype == "bfloat16" and not kern.dense_gemm:
            pytest.skip(f"tier {tier} has no bf16 GEMV: no fused path for dense bf16 layers")
        fused, plain = _llm(gemma_dir, dtype, method), _llm(gemma_dir, dtype, method)
        plain.engine.lm.model._fused = None
        sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        prompts = ["hello world", "the quick brown fox jumps", "a b c d e f g"]
        for ps in (prompts[:1], prompts):
            assert [o.outputs[0].token_ids for o in fused.generate(ps, sp)] == \
                [o.outputs[0].token_ids for o in plain.generate(ps, sp)]
        decoder = fused.engine.lm.model._fused
        assert cpu_kernels.available() and decoder is not None and decoder.steps > 0
