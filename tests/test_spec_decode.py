"""Speculative decoding (prompt lookup): proposals, the adaptive policy, and lossless verification in the engine."""

from __future__ import annotations

import random

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.config import SpeculativeConfig
from inferd.engine.llm_engine import prompt_logits
from inferd.engine.spec_decode import NgramProposer, SpecPolicy
from inferd.engine.spec_decode.policy import StepTimeModel
from inferd.errors import InvalidRequestError


@pytest.fixture
def always_propose(monkeypatch):
    """Verify every available proposal, so the tests exercise verification whatever the timings say."""
    monkeypatch.setattr(SpecPolicy, "plan", lambda self, available, n, mixed, pass_s=0.0, first=None, critical=None: dict(available))
    monkeypatch.setattr(SpecPolicy, "skip_step", lambda self, *args, **kw: False)


def _llm(tiny_hf, spec: bool, **kw) -> LLM:
    return LLM(str(tiny_hf), dtype=kw.pop("dtype", "float32"), kv_cache_memory=kw.pop("kv_cache_memory", 0.05),
               speculative=SpeculativeConfig("ngram", 4, 1, 3) if spec else None, **kw)


def _repetitive_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts with repeated spans (as a document an answer copies from), so n-grams match often."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        span = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 12))]
        out.append([t for _ in range(rng.randint(2, 5)) for t in span] + [rng.randrange(3, vocab)
                                                                            for _ in range(rng.randint(0, 6))])
    return out


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_ngram_proposer_takes_the_latest_longest_match():
    p = NgramProposer(ngram_min=1, ngram_max=3)
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2]
    # (7, 8, 1, 2)... longest suffix seen before: (1, 2) (3-gram (8, 1, 2) is new); latest earlier one at 4
    assert p.propose("a", toks, 3) == [3, 7, 8]
    assert p.propose("a", toks + [3], 2) == [7, 8]  # (1, 2, 3) → latest continuation
    assert p.propose("b", [5, 6, 7], 4) == []  # nothing repeats
    assert p.propose("b", [5, 6, 7, 5], 4) == [6, 7, 5]  # 1-gram (5): what followed it, up to the end
    assert p.propose("a", toks, 0) == []
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def test_step_time_model_fits_and_policy_switches_off_when_it_would_not_pay():
    def step_time(tokens: int, mixed: bool) -> float:  # flat while weights dominate, then grows with tokens
        return 0.010 + 0.0004 * max(tokens - 8, 0) + 0.002 * mixed

    tm = StepTimeModel()
    assert tm.predict(5, True) == tm.prior  # nothing measured yet
    for t in (1, 2, 4, 16, 64, 200):
        tm.observe(t, False, step_time(t, False))
    # mixed steps not measured at this size: the pure-decode curve stands in (so verification gets tried)
    assert tm.predict(3, True) == pytest.approx(step_time(3, False))
    rng = random.Random(0)
    for _ in range(300):
        tokens, mixed = rng.randint(1, 256), rng.random() < 0.5
        tm.observe(tokens, mixed, step_time(tokens, mixed))
    for tokens, mixed in [(1, False), *((t, m) for t in (5, 12, 40, 100, 250) for m in (False, True))]:
        assert tm.predict(tokens, mixed) == pytest.approx(step_time(tokens, mixed), rel=0.1)
    for _ in range(3):  # steps stalled by another process on the machine do not move the estimate
        tm.observe(1, False, 1.0)
    assert tm.predict(1, False) == pytest.approx(step_time(1, False))
    pol = SpecPolicy(4)
    pol.time_model = tm
    for rid in ("x", "y"):
        for _ in range(20):
            pol.record(rid, 4, 1)  # one of two tested positions accepted: alpha → 0.5
    assert abs(pol.alpha("x") - 0.5) < 0.01
    assert pol.plan({"x": 4}, num_decoding=1, mixed_anyway=False)["x"] >= 2  # one stream: worth it
    # 200 streams: a step's time grows with its tokens, verification would cost more than it saves
    assert pol.plan({"x": 4, "y": 4}, num_decoding=200, mixed_anyway=True) == {}
    for _ in range(10):
        pol.record("y", 4, 0)  # always rejected: alpha → ~0
    assert "y" not in pol.plan({"x": 4, "y": 4}, num_decoding=2, mixed_anyway=False)
    # verifying nothing for explore_every steps in a row: one proposal, once, to keep measuring; of the sequence
    # likeliest to accept it, so the probe is one row however large the batch
    plans = [pol.plan({"x": 4, "y": 4}, num_decoding=200, mixed_anyway=True) for _ in range(pol.explore_every)]
    assert plans[:-1] == [{}] * (pol.explore_every - 1) and plans[-1] == {"x": 1}
    a0 = pol.alpha("y")
    pol.record("y", 0, 0)  # not tried: drifts back toward the workload's rate, so it is tried again later
    assert pol.alpha("y") > a0


def test_policy_never_verifies_into_an_unmeasured_larger_step_and_stops_at_a_row_cliff():
    """A fused kernel that takes at most 16 rows: 17 rows cost half a step more. Nothing in the measurements up to
    16 rows foresees that, so a plan may go one row past the largest measured step, never further; once that row
    is measured the batch at the limit stops speculating (nothing proposed, the step counted as skipped), and
    re-probes one row only every reprobe_every such steps."""
    def step_time(tokens: int) -> float:
        return 0.016 + 0.0001 * tokens if tokens <= 16 else 0.024 + 0.0005 * tokens

    pol = SpecPolicy(4)
    for _ in range(20):
        pol.record("warm", 4, 4)  # proposals always land: only the step time can stop verification
    for t in (1, 2, 3):  # a single-stream warm-up
        pol.time_model.observe(t, False, step_time(t))
    avail = {f"s{i}": 4 for i in range(16)}
    assert pol.plan(avail, 16, False) == {}  # 16 rows never measured: no verification there yet
    assert not pol.time_model.within_reach(16, False) and pol.time_model.within_reach(4, False)
    pol.reprobe_every = 50  # so the 200 steps below see re-probes
    grown, steps = [], 0
    while steps < 200:
        if pol.skip_step(16, False, 64, 16):  # the step runs its 16 rows anyway, and is measured
            pol.time_model.observe(16, False, step_time(16))
            steps += 1
            continue
        plan = pol.plan(avail, 16, False)
        rows = 16 + sum(plan.values())
        assert rows <= pol.time_model.largest[False] + 1  # at most one row past what was measured
        grown.append(rows)
        pol.time_model.observe(rows, False, step_time(rows))
        for rid, k in plan.items():
            pol.record(rid, k, k)
        steps += 1
    assert grown.count(17) >= 1  # the cliff was measured once, on one extra row
    assert max(grown) == 17  # and never more rows there
    # after that: no step verifies, nearly all are skipped without proposing, re-probes are rare
    assert pol.skipped_steps >= 180
    assert 2 <= grown[1:].count(17) <= 200 // pol.reprobe_every  # re-probes after the first: one per 50 skipped
    # fewer sequences than the limit: the spare rows are within what was measured and verification pays again
    assert pol.could_pay(12, False, 48, 12)
    assert 0 < sum(pol.plan({f"s{i}": 4 for i in range(12)}, 12, False).values()) <= 5


def test_step_time_model_sees_each_small_step_size():
    """The bf16 GEMM's row chunks (at most 5 rows per pass over a weight block) make a step's cost move in steps at
    a few rows (16 rows: four passes against 15's three). The model keeps each small size apart, so 14 decoding sequences get one verification row
    (15 rows, as cheap as 14), not two (16 rows, costing more than the second proposal is likely to give)."""
    def step_time(rows: int) -> float:
        return 0.010 + 0.003 * -(-rows // 5)

    pol = SpecPolicy(4)
    for _ in range(20):
        pol.record("warm", 4, 3)  # 3 of 4 tested positions land: alpha 0.75
    for rows in range(1, 18):
        pol.time_model.observe(rows, False, step_time(rows))
    assert pol.time_model.predict(15, False) == pytest.approx(step_time(15))
    assert pol.time_model.predict(16, False) == pytest.approx(step_time(16))
    assert sum(pol.plan({f"s{i}": 4 for i in range(14)}, 14, False).values()) == 1
    # the old power-of-two buckets pooled 9..16 rows into one median: 16 rows looked as cheap as 14
    coarse = SpecPolicy(4)
    coarse._workload, coarse.time_model = pol._workload, StepTimeModel(exact_upto=0)
    for rows in range(1, 18):
        coarse.time_model.observe(rows, False, step_time(rows))
    assert sum(coarse.plan({f"s{i}": 4 for i in range(14)}, 14, False).values()) >= 2


def test_closed_batch_values_tokens_off_its_critical_path_at_a_rows_cost():
    """Nothing waiting: the batch lasts as long as its sequences with the most tokens left. A token accepted for
    another one spares a later row, not a step: valued at the step time's slope per row against the average time
    per sequence, so at best it pays for the row it costs, and is not verified however cheap rows are."""
    pol = SpecPolicy(4)
    for _ in range(20):
        pol.record("warm", 4, 4)  # alpha ~1: every proposal lands
    for rows in range(1, 10):
        pol.time_model.observe(rows, False, 0.010 + 0.001 * rows)  # a row costs 1 ms, a sequence 3.5 ms on average
    avail = {"long": 1, "short": 1}
    assert pol.plan(avail, 4, False) == avail  # tokens all count (a request waiting, or no budgets known)
    assert pol.plan(avail, 4, False, critical={"long"}) == {"long": 1}
    assert pol.plan(avail, 4, False, critical={"long", "short"}) == avail
    flat = SpecPolicy(4)
    flat._workload = pol._workload
    for rows in range(1, 10):
        flat.time_model.observe(rows, False, 0.010 + 0.00002 * rows)  # rows nearly free
    assert flat.plan(avail, 4, False, critical={"long"}) == {"long": 1}
    assert flat.plan(avail, 4, False) == avail


def test_one_stalled_step_does_not_price_a_step_size_out():
    """A shared machine stalls a step now and then (only ever adding time). A size measured once, stalled, would
    make verification look hopeless for good: below 3 steps the fastest stands in for the median; a re-probe that
    finds no proposal to verify stays due until one is made."""
    pol = SpecPolicy(4)
    for _ in range(20):
        pol.record("warm", 4, 3)
    for _ in range(5):
        pol.time_model.observe(1, False, 0.010)
    pol.time_model.observe(2, False, 0.080)  # the first 2-row step, stalled by another process
    assert pol.skip_step(1, False, 4, 1)  # one stalled sample: verification looks hopeless for now
    pol.time_model.observe(2, False, 0.0105)  # re-measured
    assert not pol.skip_step(1, False, 4, 1) and pol.plan({"a": 4}, 1, False)
    pol.time_model.observe(2, False, 0.080)
    pol.time_model.observe(2, False, 0.080)
    assert pol.skip_step(1, False, 4, 1)  # stalled most of the time: the median says so
    for _ in range(pol.reprobe_every + 5):
        pol.skip_step(1, False, 4, 1)
    assert not pol.skip_step(1, False, 4, 1)  # due
    assert pol.plan({}, 1, False) == {}  # no proposal this step
    assert not pol.skip_step(1, False, 4, 1) and pol.plan({"a": 4}, 1, False) == {"a": 1}  # still due: probed
    assert pol.skip_step(1, False, 4, 1)


def test_a_proposer_that_fails_everywhere_is_priced_by_its_measured_rate():
    """A weak draft model: once its runs across sequences are measured, a new sequence starts from that rate, not
    the optimistic prior, and a proposal whose draft pass costs more than its expected gain is not made; an
    untried sequence drifts back only to the workload's rate."""
    pol = SpecPolicy(4)
    for t in (1, 2, 4, 8):
        pol.time_model.observe(t, False, 0.010)  # flat: the verification rows themselves are nearly free
    draft_pass = 0.005  # half a target step
    assert pol.plan({"first": 4}, 1, False, draft_pass)  # nothing measured: the prior says try
    rng = random.Random(1)
    for i in range(80):  # each proposed token lands with chance 0.25
        run = 0
        while run < 4 and rng.random() < 0.25:
            run += 1
        pol.record(f"old{i}", 4, run)
    assert 0.1 < pol.alpha("new") < 0.4
    assert pol.plan({"new": 4}, 1, False, draft_pass) == {}  # the draft pass is not worth 0.25 tokens
    assert pol.plan({"new": 4}, 1, False, 0.0) == {"new": 1}  # free proposals (prompt lookup) still are
    for _ in range(100):
        pol.record("new", 0, 0)
    assert pol.alpha("new") <= pol.workload_alpha + 1e-9
    for i in range(60):  # now nothing lands at all: below min_chance, yet still probed now and then (the
        pol.record(f"none{i}", 4, 0)  # workload may change): one draft pass (half a step) every 0.5 / 0.02 steps
    assert pol.workload_alpha < pol.min_chance
    plans = [pol.plan({"new": 4}, 1, False, draft_pass) for _ in range(25)]
    assert plans[:-1] == [{}] * 24 and plans[-1] == {"new": 1}
    # a draft that must first catch its cache up with a long sequence (a whole prompt) costs that too: of two
    # equally likely sequences only the caught-up one drafts, and a probe that costs 4 steps waits until probes
    # cost at most probe_share of the time (4.1 / 0.02 = 205 steps)
    good = SpecPolicy(4)
    for t in (1, 2, 4, 8):
        good.time_model.observe(t, False, 0.010)
    catch_up = {"near": 0.0, "far": 0.040}
    assert good.plan({"near": 4, "far": 4}, 2, False, 0.001, catch_up).keys() == {"near"}
    assert good.plan({"far": 4}, 1, False, 0.001, catch_up) == {}
    plans = [good.plan({"far": 4}, 1, False, 0.001, catch_up) for _ in range(210)]
    assert 200 <= plans.index({"far": 1}) <= 205


def test_bad_speculative_settings():
    with pytest.raises(InvalidRequestError, match="unknown speculative method"):
        SpeculativeConfig("eagle")
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)
    with pytest.raises(InvalidRequestError, match="ngram_min"):
        SpeculativeConfig("ngram", 4, 3, 2)


def test_greedy_identical_with_speculation_in_mixed_batches(tiny_hf, tiny_llm, always_propose):
    vocab = tiny_llm.tokenizer.vocab_size
    rng = random.Random(1)
    ps = _repetitive_prompts(vocab, 10) + [[rng.randrange(3, vocab) for _ in range(40)] for _ in range(4)]
    params = [SamplingParams(max_tokens=rng.randint(8, 40), temperature=0, ignore_eos=True) for _ in ps]
    ref = _ids(tiny_llm.generate(ps, params))
    spec = _llm(tiny_hf, True)
    outs = spec.generate(ps, params)
    assert _ids(outs) == ref
    eng = spec.engine
    assert eng.spec_draft_tokens > 0 and 0 < eng.spec_accepted_tokens < eng.spec_draft_tokens
    assert sum(o.metrics.spec_accepted_tokens for o in outs) == eng.spec_accepted_tokens
    assert eng.kv.num_free_blocks == eng.kv.num_blocks  # rejected proposals left no blocks behind
    # alone, each one the same as in the batch
    for i in (0, 3, 12):
        assert _ids(spec.generate([ps[i]], params[i]))[0] == ref[i]
    # a second pass hits the prefix cache: the verified blocks it registered hold the right K/V
    hits0 = eng.kv.hits
    assert _ids(spec.generate(ps[:5], params[:5])) == ref[:5]
    assert eng.kv.hits > hits0


def test_stops_inside_an_accepted_run_end_where_they_would_without(tiny_hf, tiny_llm, always_propose):
    vocab = tiny_llm.tokenizer.vocab_size
    ps = _repetitive_prompts(vocab, 3, seed=2)
    base = _ids(tiny_llm.generate(ps, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    spec = _llm(tiny_hf, True)
    for p, toks in zip(ps, base):
        stop_tok = toks[9]
        text = tiny_llm.tokenizer.decode(toks)
        stop_str = text[len(text) // 2 : len(text) // 2 + 3]
        for sp in (SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]),
                   SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop_str]),
                   SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=30, temperature=0, logprobs=2, ignore_eos=True)):
            want, got = tiny_llm.generate([p], sp)[0].outputs[0], spec.generate([p], sp)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
                (want.token_ids, want.text, want.finish_reason, want.stop_reason)
            if sp.logprobs is not None:  # the target's logprobs, token for token
                assert len(got.logprobs) == len(want.logprobs)
                for g, w in zip(got.logprobs, want.logprobs):
                    assert g.keys() == w.keys()
                    assert all(abs(g[t] - w[t]) < 1e-4 for t in g)
    assert spec.engine.spec_accepted_tokens > 0


def test_preemption_with_speculation_gives_same_output(tiny_hf, tiny_llm, always_propose):
    ps = _repetitive_prompts(tiny_llm.tokenizer.vocab_size, 8, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = _ids(tiny_llm.generate(ps, params))
    small = _llm(tiny_hf, True, max_model_len=128, kv_cache_memory=12 * 16 * 512 / (1 << 30), block_size=16)
    outs = small.generate(ps, params)
    assert sum(o.metrics.num_preemptions for o in outs) > 0 and small.engine.spec_accepted_tokens > 0
    assert _ids(outs) == ref
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def test_seeded_sampling_identical_with_speculation(tiny_hf, tiny_llm, always_propose):
    ps = _repetitive_prompts(tiny_llm.tokenizer.vocab_size, 6, seed=4)
    params = [SamplingParams(max_tokens=24, temperature=0.3, top_p=0.9, seed=s, ignore_eos=True) for s in range(6)]
    ref = _ids(tiny_llm.generate(ps, params))
    spec = _llm(tiny_hf, True)
    assert _ids(spec.generate(ps, params)) == ref  # the noise of a position is keyed by (seed, position)
    assert spec.engine.spec_accepted_tokens > 0


def test_sampled_distribution_is_the_targets(tiny_hf, always_propose):
    """Unseeded sampling through verification: the joint distribution of the first three tokens (top_k=3, so 27
    outcomes; the third one comes from a verification row whenever the proposal for the second was accepted)
    matches the target model's exact one. Chi-square with 3,200 samples: a shift of 2% of the mass between two
    cells of probability ~0.04 gives a noncentrality of ~60, detected at the 0.1% level almost surely."""
    spec = _llm(tiny_hf, True, max_num_seqs=64)
    eng = spec.engine
    vocab = spec.tokenizer.vocab_size
    # a prompt that ends in the model's own greedy continuation, so the lookup proposes likely tokens
    seed_prompt = _repetitive_prompts(vocab, 1, seed=6)[0]
    cont = spec.generate([seed_prompt], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    prompt = seed_prompt + cont[0].outputs[0].token_ids
    sp = SamplingParams(n=16, max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)

    def top3(ids: list[int]) -> dict[int, float]:
        vals, idx = prompt_logits(eng, ids)[-1, :vocab].topk(3)
        return dict(zip(idx.tolist(), vals.softmax(-1).tolist()))

    exact = {(t0, t1, t2): p0 * p1 * p2 for t0, p0 in top3(prompt).items()
             for t1, p1 in top3(prompt + [t0]).items() for t2, p2 in top3(prompt + [t0, t1]).items()}
    torch.manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    for o in spec.generate([prompt] * 200, sp):
        for co in o.outputs:
            key = tuple(co.token_ids)
            counts[key] = counts.get(key, 0) + 1
    n = sum(counts.values())
    assert n == 3200 and set(counts) <= set(exact)
    assert eng.spec_accepted_tokens > 300  # a good share of third tokens came through accepted proposals
    chi2 = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
    assert chi2 < 54.1, (chi2, counts, exact)  # the 0.1% critical value for 26 degrees of freedom


def test_server_speculates_and_reports_it(tiny_hf, tiny_llm):
    import httpx

    from tests.server_utils import run_server

    prompt = _repetitive_prompts(tiny_llm.tokenizer.vocab_size, 1, seed=7)[0]
    want = tiny_llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
                    "--speculative", "ngram", "--num-speculative-tokens", "3", "--ngram-min", "1") as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                                          "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == want.outputs[0].text
        usage = body["usage"]["inferd"]
        # proposals exist (the prompt repeats), so some are verified: by the policy or by its exploration
        assert usage["spec_draft_tokens"] > 0 and 0 <= usage["spec_accepted_tokens"] <= usage["spec_draft_tokens"]
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text

    def value(name: str) -> float:
        line = next(x for x in metrics.splitlines() if x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("vllm:spec_decode_num_draft_tokens_total") == usage["spec_draft_tokens"]
    assert value("vllm:spec_decode_num_accepted_tokens_total") == usage["spec_accepted_tokens"]
    assert value("vllm:spec_decode_num_drafts_total") >= 1
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny-llama",position="2"}' in metrics


def test_draft_model_speculation_is_lossless(tiny_hf, tiny_llm, tmp_path, always_propose):
    from tests.tiny_models import write_hf

    vocab = tiny_llm.tokenizer.vocab_size
    ps = _repetitive_prompts(vocab, 5, seed=8) + [[3 + i % 50 for i in range(30)]]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 5 + \
        [SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)]
    ref = _ids(tiny_llm.generate(ps, params))
    # a different random model with the same tokenizer (one layer): proposals are often wrong
    other = write_hf(tmp_path / "draft", seed=5, config={"num_hidden_layers": 1})
    for draft, min_acceptance in ((str(other), 0.0), (str(tiny_hf), 0.9)):  # the target as its own draft: ~all
        llm = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.05,
                  speculative=SpeculativeConfig("draft", 3, draft_model=draft))
        outs = llm.generate(ps, params)
        assert _ids(outs) == ref
        eng = llm.engine
        assert eng.spec_draft_tokens > 0
        greedy_drafts = sum(o.metrics.spec_draft_tokens for o in outs[:5])
        assert sum(o.metrics.spec_accepted_tokens for o in outs[:5]) >= min_acceptance * greedy_drafts
        assert not eng.proposer.mirrors and eng.proposer.kv.num_free_blocks == eng.proposer.kv.num_blocks


def test_draft_model_needs_the_same_vocabulary(tiny_hf, tiny_llm):
    from inferd.engine.spec_decode import DraftModelProposer

    with pytest.raises(InvalidRequestError, match="--draft-model goes with --speculative draft"):
        SpeculativeConfig("ngram", draft_model=str(tiny_hf))
    with pytest.raises(InvalidRequestError, match="--draft-model goes with --speculative draft"):
        SpeculativeConfig("draft")
    with pytest.raises(InvalidRequestError, match="same vocabulary"):
        DraftModelProposer(tiny_llm.engine.lm, tiny_llm.engine.lm.config.vocab_size + 1, 8, 16)


@pytest.mark.parametrize("method", ["int4", "int8", "bf16"])
def test_verification_rows_run_in_the_fused_decoder(tiny_hf, tiny_llm, method, always_propose):
    """A verifying sequence's k + 1 rows are decode rows (each sees the cache up to its own position), so a step
    of decodes and verifications is one fused C call, and the tokens equal the plain path's: the layer-by-layer one
    for the packed formats; for dense bf16 (the multi-row gemm_bf16, whose rows equal one-row calls bit for bit)
    the fused one-row-per-sequence decode."""
    from inferd.ops import cpu_kernels
    from inferd.ops.fused_decode import DENSE_ROWS
    from inferd.ops.kernels import get_kernels

    if method == "bf16":
        if not get_kernels().dense_gemm:
            pytest.skip(f"kernel tier {get_kernels().tier} has no bf16 GEMM: no fused bf16 decoder")
        kw: dict = {"dtype": "bfloat16"}
    else:
        if not cpu_kernels.has_quant_gemm():
            pytest.skip(f"kernel tier {get_kernels().tier} has no quantized GEMMs: no fused decoder")
        kw = {"dtype": "float32", "quantization": method}
    ps = _repetitive_prompts(tiny_llm.tokenizer.vocab_size, 6, seed=7)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = LLM(str(tiny_hf), kv_cache_memory=0.05, device="cpu", **kw)
    if method != "bf16":
        plain.engine.lm.model._fused = None
    spec = _llm(tiny_hf, True, device="cpu", **kw)
    rows_seen: list[tuple[int, int]] = []  # (rows, sequences) of each step the fused decoder ran
    runner = spec.engine.runner
    execute = runner.execute

    def counting(batch):
        decoder = spec.engine.lm.model._fused
        before = decoder.steps if decoder else 0
        out = execute(batch)
        decoder = spec.engine.lm.model._fused
        if decoder and decoder.steps > before:
            rows_seen.append((batch.meta.num_decode, len(batch.sample_rows)))
        elif not batch.meta.prefills:
            pytest.fail(f"a decode step of {batch.meta.num_decode} rows left the fused decoder")
        return out

    runner.execute = counting
    # bf16: at most max_rows // 5 sequences of 1 + 4 rows, so every decode step fits the fused decoder
    fit = DENSE_ROWS[get_kernels().bf16_dot] // 5 if method == "bf16" else len(ps)
    for group in (ps[:1], ps[:fit]):
        assert _ids(spec.generate(group, params)) == _ids(plain.generate(group, params))
    assert any(rows > seqs for rows, seqs in rows_seen)  # verification rows went through the fused call
    assert spec.engine.spec_accepted_tokens > 0
