"""Scheduler and KV cache manager with fake model outputs: no torch, milliseconds per test."""

from __future__ import annotations

import random

from inferd.config import SchedulerConfig
from inferd.engine.block_manager import KVCacheManager
from inferd.engine.request import Request, RequestStatus
from inferd.engine.scheduler import Scheduler
from inferd.sampling_params import SamplingParams


def make(rid: str, n_prompt: int, max_tokens: int = 8, base: int = 0, priority: int = 0) -> Request:
    return Request(rid, [base + i % 50 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(9999,), max_tokens=max_tokens, priority=priority)


def fake_step(s: Scheduler, token: int = 7) -> dict[str, int]:
    """schedule → pretend the model ran → append a token to every request that finished its prompt."""
    out = s.schedule()
    for req in s.update_after_step(out):
        req.output_token_ids.append(token)
        status = req.check_stop()
        if status is not None:
            s.finish(req, status)
    return out.num_tokens


def test_budget_and_seq_cap_respected():
    kv = KVCacheManager(num_blocks=1000, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100), kv)
    for i in range(10):
        s.add_request(make(f"r{i}", 60))
    step = fake_step(s)
    assert sum(step.values()) <= 100
    assert len(s.running) <= 4
    for _ in range(50):
        step = fake_step(s)
        assert sum(step.values()) <= 100 and len(step) <= 4


def test_chunked_prefill_does_not_stall_decodes():
    kv = KVCacheManager(num_blocks=1000, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv)
    s.add_request(make("short", 10, max_tokens=50))
    fake_step(s)  # short's prompt done, it is decoding now
    s.add_request(make("long", 500))
    for _ in range(5):
        step = fake_step(s)
        assert step["short"] == 1  # decode every step
        assert step["long"] == 63  # the rest of the budget goes to the long prompt's chunk
    assert s.requests["long"].num_computed_tokens == 5 * 63


def test_blocks_freed_on_finish_and_abort():
    kv = KVCacheManager(num_blocks=100, block_size=16, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), kv)
    a, b = make("a", 40, max_tokens=2), make("b", 40, max_tokens=100)
    s.add_request(a)
    s.add_request(b)
    fake_step(s)
    assert kv.num_free_blocks == 100 - 6
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 100 - 3 and b.block_ids == []
    fake_step(s)
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert kv.num_free_blocks == 100


def test_prefix_cache_hit_counts_and_reuse():
    kv = KVCacheManager(num_blocks=100, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), kv)
    a = make("a", 50, max_tokens=1)
    s.add_request(a)
    fake_step(s)
    assert a.status.finished
    b = make("b", 50, max_tokens=1)
    s.add_request(b)
    step = fake_step(s)
    assert b.num_cached_tokens == 48  # three full blocks from a's prompt
    assert step["b"] == 2
    assert kv.hits == 48


def test_prefix_blocks_only_cached_after_compute():
    kv = KVCacheManager(num_blocks=100, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), kv)
    a, b = make("a", 50), make("b", 50)
    s.add_request(a)
    s.add_request(b)
    step = fake_step(s)  # same step: b must not read a's not-yet-written blocks
    assert step == {"a": 50, "b": 50} and b.num_cached_tokens == 0


def test_lru_eviction_of_cached_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), kv)
    a = make("a", 12, max_tokens=1, base=0)
    s.add_request(a)
    fake_step(s)
    assert len(kv.cached) == 3
    first_block = a.all_token_ids[:4]
    c = make("c", 28, max_tokens=1, base=100)  # 7 blocks: the 5 never-cached ones, then 2 of a's evicted
    s.add_request(c)
    fake_step(s)
    assert c.status.finished
    left = [kv.blocks[b].token_ids for b in kv.cached.values() if kv.blocks[b].token_ids[0] < 100]
    assert left == [tuple(first_block)]  # a's tail went first; the head of the prefix stayed cached


def test_preemption_and_resume():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    a, b = make("a", 8, max_tokens=12), make("b", 8, max_tokens=12)
    s.add_request(a)
    s.add_request(b)
    preempted = 0
    for _ in range(200):
        out = s.schedule()
        preempted += len(out.preempted)
        for req in s.update_after_step(out):
            req.output_token_ids.append(5)
            st = req.check_stop()
            if st:
                s.finish(req, st)
        if not s.has_unfinished():
            break
    assert preempted >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the later arrival is the victim
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert kv.num_free_blocks == 6


def test_priority_orders_admission():
    kv = KVCacheManager(num_blocks=100, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512), kv)
    s.add_request(make("low", 10, priority=5))
    s.add_request(make("high", 10, priority=0))
    assert list(fake_step(s)) == ["high"]


def test_no_leaks_after_many_random_requests():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=8)
    s = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128), kv)
    live: list[Request] = []
    for i in range(2000):
        if rng.random() < 0.6:
            r = make(f"r{i}", rng.randint(1, 100), max_tokens=rng.randint(1, 30), base=rng.randint(0, 3))
            s.add_request(r)
            live.append(r)
        if live and rng.random() < 0.05:
            s.finish(live.pop(rng.randrange(len(live))), RequestStatus.FINISHED_ABORTED)
        step = fake_step(s)
        assert sum(step.values()) <= 128
        # every block is either free (cached or not) or held by a running request; waiting ones hold none
        held = {b for r in s.running for b in r.block_ids}
        assert kv.num_free_blocks + len(held) == kv.num_blocks, (i, kv.num_free_blocks, len(held))
        assert all(not r.block_ids for *_, r in s.waiting), i
        live = [r for r in live if not r.status.finished]
    for _ in range(5000):
        if not s.has_unfinished():
            break
        fake_step(s)
    assert not s.has_unfinished()
    assert kv.num_free_blocks == kv.num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)
