"""Hybrid KV cache (engine/hybrid_kv.py): sliding-window layers keep only the blocks their window reaches, while the
output, preemption and prefix caching stay exactly what a cache keeping every block gives."""

from __future__ import annotations

import functools

import pytest

from inferd.engine.hybrid_kv import HybridKVCacheManager, window_blocks_per_sequence
from inferd.engine.request import Request
from inferd.sampling_params import SamplingParams
from tests.tiny_archs import build_hf

transformers = pytest.importorskip("transformers")


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1000))


def test_window_pool_holds_only_the_window():
    bs, window = 4, 8
    kv = HybridKVCacheManager(64, 16, bs, window)
    req = _req("a", list(range(3, 23)))  # 20 prompt tokens
    assert kv.allocate_slots(req, 8)  # first chunk
    req.num_computed_tokens = 8
    kv.cache_full_blocks(req)
    for _ in range(60):  # the rest of the prompt, then one token a step
        n = max(1, min(8, req.num_tokens - req.num_computed_tokens))
        assert kv.allocate_slots(req, n)
        held = [b for b in req.local_block_ids if b >= 0]
        assert len(held) <= window_blocks_per_sequence(window, 8, bs)
        # what the next query's window reaches is held; everything before it is released
        first = max(req.num_computed_tokens - window + 1, 0) // bs
        assert all(b >= 0 for b in req.local_block_ids[first:]) and all(b < 0 for b in req.local_block_ids[:first])
        req.num_computed_tokens += n
        if req.num_computed_tokens >= req.num_tokens:
            req.output_token_ids.append(7)
        kv.cache_full_blocks(req)
    assert len(req.block_ids) == kv.full.blocks_needed(req.num_computed_tokens)  # the full group keeps everything
    kv.free_request(req)
    assert kv.full.num_free_blocks == 64 and kv.local.num_free_blocks == 16


def test_allocation_fails_in_both_pools_or_neither():
    kv = HybridKVCacheManager(64, 3, 4, 8)  # the window pool is the tight one
    a, b = _req("a", list(range(3, 11))), _req("b", list(range(3, 11)))
    assert kv.allocate_slots(a, 8)  # 2 window blocks
    assert not kv.allocate_slots(b, 8)
    assert b.block_ids == [] and b.local_block_ids == [] and kv.full.num_free_blocks == 62


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """Gemma 3 layout: window 8 on every other layer, blocks of 4."""
    root = tmp_path_factory.mktemp("gemma3")
    build_hf("gemma3", root)
    return root


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """Every layer windowed: the full pool is bookkeeping only."""
    root = tmp_path_factory.mktemp("mistral")
    build_hf("mistral", root)
    return root


def _llm(path, **kw):
    from inferd import LLM

    return LLM(str(path), dtype="float32", quantization="none", kv_cache_memory=kw.pop("kv_cache_memory", 0.01),
               block_size=4, max_num_batched_tokens=16, max_num_seqs=4, **kw)  # chunks of at most 16


@pytest.mark.parametrize("model", ["tiny_gemma", "tiny_mistral"])
def test_same_tokens_bounded_window_pool(model, request, monkeypatch):
    from inferd.engine import kv_plan, llm_engine

    path = request.getfixturevalue(model)
    prompts = [[1, *range(5, 5 + n)] for n in (3, 20, 41)] + [[1, *range(9, 30)]] * 2  # two share a prefix
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    hybrid = _llm(path)
    eng = hybrid.engine
    assert isinstance(eng.kv, HybridKVCacheManager) and eng.kv_plan.window == 8
    peak = [0]
    step = eng.step

    def watching():
        outs = step()
        for r in eng.scheduler.running:
            peak[0] = max(peak[0], sum(b >= 0 for b in r.local_block_ids))
        return outs

    eng.step = watching
    got = [o.outputs[0].token_ids for o in hybrid.generate(prompts, params)]
    assert peak[0] <= window_blocks_per_sequence(8, 16, 4)
    assert eng.kv.local.num_free_blocks == eng.kv.local.num_blocks  # everything came back
    monkeypatch.setattr(llm_engine, "plan_kv", functools.partial(kv_plan.plan_kv, hybrid=False))
    ref = _llm(path)
    assert ref.engine.kv_plan.window is None
    assert got == [o.outputs[0].token_ids for o in ref.generate(prompts, params)]
    if model == "tiny_mistral":  # no full-attention layer: only the window pool costs memory
        assert eng.kv_plan.max_bytes == eng.kv_plan.window_blocks * eng.kv_plan.window_block_bytes


def test_prefix_hits_past_the_window_and_preemption(tiny_gemma):
    """A second request sharing a 60-token prefix (far past the window) hits the cache: the window layers' blocks
    it needs were released by the first request but kept their hashes, so they are revived; outputs equal a cold
    engine's. A pool too small for all sequences at once preempts and still gives the same tokens."""
    prefix = [1, *range(5, 64)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    warm = _llm(tiny_gemma)
    first = warm.generate([prefix + [70]], params)[0]
    second = warm.generate([prefix + [71]], params)[0]
    assert second.metrics.num_cached_tokens >= 48
    cold = _llm(tiny_gemma)
    assert cold.generate([prefix + [71]], params)[0].outputs[0].token_ids == second.outputs[0].token_ids
    assert cold.generate([prefix + [70]], params)[0].outputs[0].token_ids == first.outputs[0].token_ids
    # preemption: room for about two sequences of 100 tokens in the full pool
    prompts = [[1, *range(5 + i, 45 + i)] for i in range(4)]
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    tight = _llm(tiny_gemma, kv_cache_memory=2 * 26 * 2 * 4 * 32 * 4 * 4 / (1 << 30), max_model_len=104)
    outs = tight.generate(prompts, long)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    roomy = _llm(tiny_gemma, max_model_len=104)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy.generate(prompts, long)]
