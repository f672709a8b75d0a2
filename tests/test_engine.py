"""Engine on a tiny random Llama: batching, prefix caching, preemption, sampling, stops, n>1, abort."""

from __future__ import annotations

import random

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.llm_engine import prompt_logits
from inferd.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(tok, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = tok.vocab_size
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 70))] for _ in range(n)]


def texts(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_alone_equals_in_batch_of_32(tiny_llm):
    ps = prompts(tiny_llm.tokenizer, 32)
    batch = texts(tiny_llm.generate(ps, GREEDY))
    for i in (0, 7, 31):
        assert texts(tiny_llm.generate([ps[i]], GREEDY))[0] == batch[i]


def test_small_token_budget_chunks_prefill_with_same_output(tiny_hf, tiny_llm):
    ps = prompts(tiny_llm.tokenizer, 6, seed=1)
    ref = texts(tiny_llm.generate(ps, GREEDY))
    chunked = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.05, max_num_batched_tokens=16, max_num_seqs=4)
    assert texts(chunked.generate(ps, GREEDY)) == ref


@pytest.mark.parametrize("method", ["int8", "none"])
def test_chunked_prefill_with_a_step_that_needs_no_logits(tiny_hf, method):
    """A prompt longer than the token budget: its first chunks produce no logits (zero rows for the lm_head,
    packed or dense), the last one samples; same tokens as one unchunked prefill."""
    kw = dict(dtype="bfloat16", quantization=method, kv_cache_memory=0.05, device="cpu")
    chunked = LLM(str(tiny_hf), max_num_batched_tokens=16, **kw)
    whole = LLM(str(tiny_hf), max_num_batched_tokens=256, **kw)
    prompt = list(range(5, 60))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a, b = chunked.generate([prompt], sp)[0].outputs[0], whole.generate([prompt], sp)[0].outputs[0]
    assert a.finish_reason == "length" and a.token_ids == b.token_ids


def test_prefix_cache_hit_gives_same_output(tiny_llm):
    eng = tiny_llm.engine
    p = (prompts(tiny_llm.tokenizer, 1, seed=2)[0] * 50)[:50]  # three full blocks
    eng.kv.reset_prefix_cache()
    first = texts(tiny_llm.generate([p], GREEDY))[0]
    hits0 = eng.kv.hits
    second = tiny_llm.generate([p], GREEDY)[0]
    assert eng.kv.hits > hits0 and second.metrics.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first


def test_preemption_gives_same_output(tiny_hf, tiny_llm):
    ps = prompts(tiny_llm.tokenizer, 8, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = texts(tiny_llm.generate(ps, params))
    # 12 blocks of 16 tokens (512 bytes of K/V per token): room for ~2 of these sequences at once
    small = LLM(str(tiny_hf), dtype="float32", max_model_len=128, kv_cache_memory=12 * 16 * 512 / (1 << 30),
                block_size=16)
    assert small.engine.kv.num_blocks == 12
    outs = small.generate(ps, params)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert texts(outs) == ref
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def test_seeded_sampling_reproducible_regardless_of_batch(tiny_llm):
    p = prompts(tiny_llm.tokenizer, 1, seed=4)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    alone = texts(tiny_llm.generate([p], sp))[0]
    others = prompts(tiny_llm.tokenizer, 7, seed=5)
    mixed = tiny_llm.generate([*others[:3], p, *others[3:]], [SamplingParams(max_tokens=16, temperature=1.0)] * 3
                              + [sp] + [SamplingParams(max_tokens=16, temperature=1.0)] * 4)
    assert mixed[3].outputs[0].token_ids == alone
    different = texts(tiny_llm.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=7,
                                                            ignore_eos=True)))[0]
    assert different != alone


def test_stop_string_cut_and_not_leaked(tiny_llm):
    p = prompts(tiny_llm.tokenizer, 1, seed=6)[0]
    full = tiny_llm.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    out = tiny_llm.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0]
    co = out.outputs[0]
    assert co.finish_reason == "stop" and co.stop_reason == stop
    assert co.text == text[: text.find(stop)]
    # streamed deltas never contain the stop string
    eng = tiny_llm.engine
    eng.add_request("stream-stop", p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    streamed = ""
    while eng.has_unfinished_requests():
        for ro in eng.step():
            streamed += "".join(c.delta_text for c in ro.outputs)
    assert streamed == co.text


def test_stop_token_ids_max_tokens_min_tokens(tiny_llm):
    p = prompts(tiny_llm.tokenizer, 1, seed=8)[0]
    ref = tiny_llm.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_id = ref.token_ids[4]
    out = tiny_llm.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id and stop_id not in out.token_ids[:-1]
    assert out.stop_reason == stop_id
    out = tiny_llm.generate([p], SamplingParams(max_tokens=10, min_tokens=8, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(out.token_ids) >= 8
    assert ref.finish_reason == "length" and len(ref.token_ids) == 10


def test_n_greater_than_one_shares_prompt_blocks(tiny_llm):
    eng = tiny_llm.engine
    eng.kv.reset_prefix_cache()
    p = (prompts(tiny_llm.tokenizer, 1, seed=9)[0] * 60)[:60]
    hits0 = eng.kv.hits
    out = tiny_llm.generate([p], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert eng.kv.hits - hits0 >= 3 * (len(p) // 16) * 16  # three siblings reuse the prompt's full blocks


def test_abort_frees_blocks(tiny_llm):
    eng = tiny_llm.engine
    free0 = eng.kv.num_free_blocks
    # ignore_eos: sampled at temperature 1, a first token that is EOS would end the request in this very step
    eng.add_request("to-abort", prompts(tiny_llm.tokenizer, 1, seed=10)[0],
                    SamplingParams(max_tokens=200, ignore_eos=True))
    eng.step()
    assert eng.kv.num_free_blocks < free0
    ro = eng.abort_request("to-abort")
    assert ro.finished and ro.outputs[0].finish_reason == "abort"
    assert eng.kv.num_free_blocks == free0
    assert not eng.has_unfinished_requests()


def test_logprobs_and_prompt_logprobs_match_logits(tiny_llm):
    p = prompts(tiny_llm.tokenizer, 1, seed=11)[0][:20]
    out = tiny_llm.generate([p], SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1,
                                                ignore_eos=True))[0]
    full = torch.log_softmax(prompt_logits(tiny_llm.engine, p + out.outputs[0].token_ids), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for i in range(1, len(p)):
        assert out.prompt_logprobs[i][p[i]] == pytest.approx(full[i - 1, p[i]].item(), abs=1e-4)
    for j, (t, lp) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert lp[t] == pytest.approx(full[len(p) - 1 + j, t].item(), abs=1e-4)
        assert len(lp) <= 3


def test_prompt_logprobs_across_chunks(tiny_hf, tiny_llm):
    p = (prompts(tiny_llm.tokenizer, 1, seed=12)[0] * 60)[:60]
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    ref = tiny_llm.generate([p], sp)[0].prompt_logprobs
    chunked = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.05, max_num_batched_tokens=16)
    got = chunked.generate([p], sp)[0].prompt_logprobs
    assert len(got) == len(ref) == len(p)
    for a, b in zip(got[1:], ref[1:]):
        assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def test_bad_requests(tiny_llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_llm.generate([""])
    with pytest.raises(InvalidRequestError, match="maximum context length is 512"):
        tiny_llm.generate(["hello"], SamplingParams(max_tokens=600))
    with pytest.raises(InvalidRequestError, match="out of range"):
        tiny_llm.generate([[1, 2, 10**6]])
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=5)


def test_chat_applies_template(tiny_llm):
    conv = [{"role": "user", "content": "hi"}]
    out = tiny_llm.chat(conv, SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_kv_cache_too_small_is_a_clear_error(tiny_hf):
    with pytest.raises(InvalidRequestError, match="less than one sequence"):
        LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.00001)


def test_failed_step_fails_only_its_requests_and_engine_goes_on(tiny_hf):
    llm = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.02)
    eng = llm.engine
    real = eng.runner.execute
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel fault")
        return real(batch)

    eng.runner.execute = flaky
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    final = [o for o in outs if o.finished][0]
    assert final.outputs[0].finish_reason == "error" and "simulated kernel fault" in final.outputs[0].error
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # nothing leaked
    ok = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0))[0]
    assert ok.outputs[0].finish_reason == "length" and len(ok.outputs[0].token_ids) == 5


def test_block_size_beyond_c_kernel_limits_uses_torch_path(tiny_hf, tiny_llm):
    big = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.05, block_size=128)
    assert not big.engine.runner.use_c_kernel
    ps = prompts(tiny_llm.tokenizer, 4, seed=13)
    assert texts(big.generate(ps, GREEDY)) == texts(tiny_llm.generate(ps, GREEDY))


def test_decode_graph_buckets_pad_and_match_eager(tiny_hf, tiny_llm, monkeypatch):
    """The CUDA-graph decode path's bucketing and padding, run on CPU with a stand-in graph that re-runs the
    captured forward on replay (the real capture is exercised by tests/test_cuda.py on a GPU)."""
    from inferd.engine import cuda_graphs

    class ReplayGraph:
        def __init__(self, fn):
            self.fn, self.out = fn, fn()

        def replay(self):
            self.out.copy_(self.fn())

    def capture(self, b, w):
        g = ReplayGraph(lambda: self._forward(b, w))
        return g, g.out

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture", capture)
    llm = LLM(str(tiny_hf), dtype="float32", device="cpu", kv_cache_memory=0.05, max_num_seqs=16)
    runner = llm.engine.runner
    nb = runner.kv_caches[0].shape[1]
    runner.kv_caches[:] = [torch.cat([c, torch.zeros_like(c[:, :1])], dim=1) for c in runner.kv_caches]
    runner.graphs = cuda_graphs.DecodeGraphs(llm.engine.lm.model, runner.kv_caches, runner.block_size, nb, 16,
                                             -(-llm.engine.max_model_len // runner.block_size))
    prompts = ["hello", "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c", "the quick brown fox", "x",
               "one two three"]
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, sp)]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert got == want
    # 5 sequences pad to the 8-row bucket; block-table widths round up to powers of two (≥ 4)
    assert {b for b, _ in runner.graphs.graphs} == {8} and all(w in (4, 8) for _, w in runner.graphs.graphs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_fused_decode_step_equals_python_layers(tiny_hf, dtype, method):
    """A decode step's decoder stack as one C call (ops/fused_decode.py) gives exactly the tokens of the
    layer-by-layer path, for one and for several sequences."""
    from inferd.ops import cpu_kernels
    from inferd.ops.kernels import get_kernels

    if not cpu_kernels.has_quant_gemm() and method != "none":
        pytest.skip(f"kernel tier {get_kernels().tier} has no quantized GEMMs: the quantized layers use aten's "
                    "kernels, which the fused path does not run")
    # a CPU path: pinned to the CPU (on a GPU machine `auto` would pick CUDA)
    fused = LLM(str(tiny_hf), dtype=dtype, quantization=method, kv_cache_memory=0.05, device="cpu")
    plain = LLM(str(tiny_hf), dtype=dtype, quantization=method, kv_cache_memory=0.05, device="cpu")
    plain.engine.lm.model._fused = None
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["hello world", "the quick brown fox jumps", "a b c d e f g"]
    for ps in (prompts[:1], prompts):
        assert [o.outputs[0].token_ids for o in fused.generate(ps, sp)] == \
            [o.outputs[0].token_ids for o in plain.generate(ps, sp)]
    decoder = fused.engine.lm.model._fused
    expect_fused = cpu_kernels.available() and (method != "none" or (dtype == "bfloat16" and get_kernels().dense_gemm))
    assert (decoder is not None and decoder.steps > 0) == expect_fused
