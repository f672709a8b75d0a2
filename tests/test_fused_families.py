"""Gemma 3's decode step as one C call (ops/fused_decode.py: q/k RMSNorm, the four norms, tanh-GELU MLP, per-layer
rotary tables and sliding windows) gives exactly the tokens of the layer-by-layer Python path, for one and for several
sequences, generating past 2x the window (window 8 over KV blocks of 4, every other layer), on this process's kernel
tier and (4-bit bf16) on the lower tiers this CPU runs. Qwen3 (q/k RMSNorm) and Mistral (a window on every layer)
take the same fused path and are checked once each."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.ops.kernels import get_kernels, runnable_tiers, use_tier
from tests.tiny_archs import build_hf

pytest.importorskip("transformers")

DEFAULT = get_kernels().tier
# every layer kind on this process's tier; the 4-bit bf16 case (the default for a GGUF) on the lower tiers too
CASES = [("gemma3", DEFAULT, "float32", "int8"), ("gemma3", DEFAULT, "bfloat16", "none"),
         ("gemma3", DEFAULT, "bfloat16", "int4")] + \
    [("gemma3", t, "bfloat16", "int4") for t in runnable_tiers() if t not in (DEFAULT, "torch")] + \
    [("qwen3", DEFAULT, "bfloat16", "int4"), ("mistral", DEFAULT, "bfloat16", "int4")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            build_hf(name, root / name)
            made[name] = root / name
        return made[name]

    return get


def _llm(path, dtype, method):
    from inferd import LLM

    return LLM(str(path), dtype=dtype, quantization=method, kv_cache_memory=0.02, device="cpu", block_size=4)


@pytest.mark.parametrize("arch,tier,dtype,method", CASES)
def test_fused_decode_equals_python_layers(model_dirs, arch, tier, dtype, method):
    from inferd import SamplingParams
    from inferd.ops import cpu_kernels

    with use_tier(tier) as kern:
        if method != "none" and not kern.quant_gemm:
            pytest.skip(f"tier {tier} has no quantized GEMMs: the fused path does not run aten's")
        if method == "none" and dtype == "bfloat16" and not kern.dense_gemm:
            pytest.skip(f"tier {tier} has no bf16 GEMV: no fused path for dense bf16 layers")
        path = model_dirs(arch)
        fused, plain = _llm(path, dtype, method), _llm(path, dtype, method)
        plain.engine.lm.model._fused = None
        sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        prompts = ["hello world", "the quick brown fox jumps", "a b c d e f g"]
        for ps in (prompts[:1], prompts):
            assert [o.outputs[0].token_ids for o in fused.generate(ps, sp)] == \
                [o.outputs[0].token_ids for o in plain.generate(ps, sp)]
        decoder = fused.engine.lm.model._fused
        assert cpu_kernels.available() and decoder is not None and decoder.steps > 0
