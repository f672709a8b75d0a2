"""The decode step's small C helpers outside the GEMMs: the greedy sampler's argmax (ops/csrc/argmax_rows.c)
equals torch.argmax on every kernel tier, ties and NaN included; the runner's batch building in Python ints
gives the slots and block tables the torch formulas give."""

from __future__ import annotations

import pytest
import torch

from inferd.engine.request import Request
from inferd.engine.runner import decode_table
from inferd.engine.sampler import Sampler
from inferd.ops import cpu_kernels
from inferd.ops.kernels import runnable_tiers, use_tier
from inferd.sampling_params import SamplingParams


def _hard_rows(v: int) -> torch.Tensor:
    """16 rows of width v (a column slice of wider logits) with NaNs, ties, infinities and extremes at the ends."""
    x = torch.randn(16, v + 5, generator=torch.Generator().manual_seed(v))[:, :v]
    x[3, v // 2] = float("nan")
    x[4, :] = float("-inf")
    x[5, -1] = float("nan")
    x[5, 0] = float("nan")
    x[6, :] = 1.0  # all tied: the first index
    x[7, -1] = 1e30
    x[8, 0] = 1e30
    x[9, :] = 0.0
    x[9, v // 3] = -0.0
    x[10, -1] = float("inf")
    return x


@pytest.mark.parametrize("tier", [t for t in runnable_tiers() if t != "torch"])
def test_argmax_rows_equals_torch(tier):
    with use_tier(tier):
        for v in (1, 7, 16, 17, 33, 1000, 49155):
            x = _hard_rows(v)
            got = cpu_kernels.argmax_rows(x)
            assert got is not None and torch.equal(got, x.argmax(dim=-1)), (tier, v)
        assert cpu_kernels.argmax_rows(torch.zeros(2, 8, dtype=torch.bfloat16)) is None  # fp32 only


def test_greedy_sampler_fast_path_is_the_argmax():
    vocab = 1000
    logits = _hard_rows(vocab + 24)  # wider than the vocabulary (padded head): only the first `vocab` count
    logits[11, vocab + 3] = 1e35
    reqs = [Request(f"r{i}", [1, 2], SamplingParams(temperature=0), eos_token_ids=[0]) for i in range(16)]
    want = logits[:, :vocab].argmax(dim=-1).tolist()
    assert Sampler(vocab)(logits.clone(), reqs).token_ids == want


def test_slots_and_decode_tables_from_python_ints():
    class Row:
        def __init__(self, table: list[int]):
            self.block_ids = table

    tables = [[5, 2, 9], [7], [3, -1, 4, 8], [5, 2, 9]]  # -1: a released block (hybrid KV) reads as block 0
    got = decode_table([Row(t) for t in tables], "block_ids")
    want = torch.zeros(4, 4, dtype=torch.long)
    for i, t in enumerate(tables):
        want[i, : len(t)] = torch.tensor(t).clamp(min=0)
    assert got.dtype == torch.long and torch.equal(got, want)

    from inferd.engine.runner import ModelRunner

    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size = 16
    table = [4, 1, 7, 3]
    for start, end in ((0, 40), (17, 18), (33, 64), (50, 51)):
        pos = torch.arange(start, end)
        ref = torch.tensor(table)[pos // 16] * 16 + pos % 16
        assert runner._slots(table, start, end) == ref.tolist()


def test_token_ids_between_is_a_slice_of_all_token_ids():
    req = Request("r", [10, 11, 12, 13], SamplingParams())
    req.output_token_ids = [20, 21, 22]
    for start in range(8):
        for end in range(start, 8):
            assert req.token_ids_between(start, end) == req.all_token_ids[start:end], (start, end)


def test_decode_steps_outside_inference_mode_with_logit_changes(tiny_llm):
    """The engine hands the sampler its logits without a gather copy when every row is sampled (a decode step);
    the sampler's slow path (penalties, logit_bias, min_tokens) then works on its own copy, so steps run outside
    inference mode, as the server runs them, give the tokens LLM.generate gives."""
    from inferd import SamplingParams

    eng = tiny_llm.engine
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={5: -100.0, 7: 50.0}),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.5, min_tokens=3),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    prompts = [[1, 2, 3, 4], [9, 8, 7], [11, 12, 13, 14, 15]]
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params)]
    assert not torch.is_inference_mode_enabled()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"outside-{i}", p, sp)
    got: dict[str, list[int]] = {}
    for _ in range(50):
        for out in eng.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        if len(got) == 3:
            break
    assert [got[f"outside-{i}"] for i in range(3)] == want
    assert all(t == 7 for t in want[0])  # the +50 bias wins every step


def test_fused_final_norm_equals_the_norm_after_the_call(tiny_hf):
    """The fused decoder's final norm (run(final_norm=True)) gives what model.norm.add_forward gives after the
    plain call, bit for bit (a decode step rewrites the same K/V, so the step can be run twice)."""
    from inferd import LLM, SamplingParams
    from inferd.engine.scheduler import SchedulerOutput

    llm = LLM(str(tiny_hf), dtype="bfloat16", quantization="int8", kv_cache_memory=0.02, device="cpu")
    eng, model = llm.engine, llm.engine.lm.model
    for i, p in enumerate(([1, 2, 3, 4, 5], [7, 8, 9])):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for _ in range(3):
        eng.step()
    if not model._fused:
        pytest.skip("no fused decoder on this tier")
    reqs = list(eng.scheduler.running)
    for r in reqs:
        assert eng.kv.allocate_slots(r, 1)
    batch = eng.runner.prepare(SchedulerOutput({r.request_id: 1 for r in reqs}, reqs))
    with torch.inference_mode():
        x = model.model.embed_tokens(batch.input_ids)
        args = (batch.positions, eng.runner.kv_caches, batch.meta)
        folded = model._fused.run(x, *args, final_norm=True)
        assert folded is not None
        folded_hidden, folded_residual = folded[0].clone(), folded[1].clone()
        plain = model._fused.run(x, *args)
        assert plain is not None
        want = model.model.norm.add_forward(*plain)
    assert torch.equal(folded_hidden, want[0]) and torch.equal(folded_residual, want[1])
