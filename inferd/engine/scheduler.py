"""Scheduler: each step decides {request: num_tokens} under a token budget and a sequence cap.

Plain Python. Running requests go first (decodes and unfinished prefill chunks, in admission order), then
waiting ones in (priority, arrival) order; a long prompt is split into chunks so decodes never stall. When
blocks run out, the most recently admitted running request (lowest priority first) is preempted: its blocks
are freed and it is recomputed later from its prompt plus what it has generated, so its output is unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from inferd.config import SchedulerConfig
from inferd.engine.block_manager import KVCacheManager
from inferd.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    num_tokens: dict[str, int] = field(default_factory=dict)  # request id → tokens to compute this step
    requests: list[Request] = field(default_factory=list)  # in batch order: decodes first, then prefills
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())

    def is_empty(self) -> bool:
        return not self.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[tuple[int, float, int, Request]] = []  # heap by (priority, arrival, seq)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._seq = itertools.count()

    # ---- queues --------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (req.priority, req.times.arrival, next(self._seq), req))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stop, length, abort or error) and free its blocks at once."""
        assert status.finished, status
        if req.status.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif any(r is req for *_, r in self.waiting):
            self.waiting = [w for w in self.waiting if w[3] is not req]
            heapq.heapify(self.waiting)
        req.status = status
        req.times.finished = time.monotonic()
        self.kv.free_request(req)
        self.requests.pop(req.request_id, None)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> int:
        """Free the victim's blocks and requeue it; returns the tokens it had been given this step."""
        self.running.remove(victim)
        self.kv.free_request(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_cached_tokens = 0
        victim.num_preemptions += 1
        victim.spec_token_ids = []
        victim.prompt_logprobs = []  # recomputed from scratch
        heapq.heappush(self.waiting, (victim.priority, victim.times.arrival, next(self._seq), victim))
        out.preempted.append(victim)
        return out.num_tokens.pop(victim.request_id, 0)

    def _pick_victim(self) -> Request:
        return max(self.running, key=lambda r: (r.priority, r.times.arrival))

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes: list[Request] = []
        prefills: list[Request] = []
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.spec_token_ids:  # a decode with proposals: verify them in this step if budget and blocks allow
                k = min(len(req.spec_token_ids), budget - n)
                if n == 1 and k > 0 and self.kv.allocate_slots(req, n + k):
                    del req.spec_token_ids[k:]
                    out.num_tokens[req.request_id] = n + k
                    decodes.append(req)  # k + 1 decode rows, each seeing the cache up to its own position
                    budget -= n + k
                    continue
                req.spec_token_ids = []
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim()
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            out.num_tokens[req.request_id] = n
            (decodes if n == 1 and req.num_computed_tokens >= req.num_prompt_tokens else prefills).append(req)
            budget -= n
        # admit waiting requests (never while a preemption happened this step: memory is short)
        skipped: list[tuple[int, float, int, Request]] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            item = self.waiting[0]
            req = item[3]
            if req.wait_for is not None and not req.wait_for.status.finished and (
                req.wait_for.num_computed_tokens < req.wait_for.num_prompt_tokens
            ):
                skipped.append(heapq.heappop(self.waiting))  # sibling: wait until the shared prompt is cached
                continue
            computed = self.kv.get_computed_blocks(req)
            n_cached = len(computed) * self.kv.block_size
            n = min(req.num_tokens - n_cached, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            heapq.heappop(self.waiting)
            req.num_computed_tokens = n_cached
            req.num_cached_tokens = n_cached
            req.status = RequestStatus.RUNNING
            if req.times.first_scheduled is None:
                req.times.first_scheduled = time.monotonic()
            self.running.append(req)
            out.num_tokens[req.request_id] = n
            prefills.append(req)
            budget -= n
        for item in skipped:
            heapq.heappush(self.waiting, item)
        out.requests = [r for r in decodes + prefills if r.request_id in out.num_tokens]
        return out

    def update_after_step(self, out: SchedulerOutput) -> list[Request]:
        """Advance computed-token counters; returns the requests whose prompt is now fully computed and
        which therefore sampled a token this step (several, when proposals were verified)."""
        sampled = []
        for req in out.requests:
            # proposals are not the sequence's tokens yet: only the accepted ones are counted, by the engine
            req.num_computed_tokens += out.num_tokens[req.request_id] - len(req.spec_token_ids)
            self.kv.cache_full_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                sampled.append(req)
        return sampled
