"""Discrete-event simulation of a cluster of inferd replicas behind the router (`inferd simulate`).

Each replica runs continuous batching as the engine does: a step decodes one token for every running sequence and
spends what is left of the token budget on prefill chunks of waiting requests (FIFO, up to max_num_seqs), and its
duration comes from the `ServiceModel`. A request's cached prefix (the replica's LRU of prompt segments, full blocks
only) is skipped at prefill. Events are arrivals, prefill steps and the ends of decode stretches: between two of them
a replica's batch does not change, so a stretch of identical decode steps is one event (an arrival cuts it short
after the step in flight). This keeps 1,000 replicas and 100k requests to seconds of Python.

The router is `inferd.cluster.router.Router`, the same object the Ray Serve ingress uses.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inferd.cluster.router import Router, RouterConfig
from inferd.cluster.service_model import ServiceModel
from inferd.cluster.workload import SimRequest, WorkloadConfig, conversations, next_request

_ARRIVAL, _WAKE, _DELIVER = 0, 1, 2


class SimReplica:
    def __init__(self, idx: int, svc: ServiceModel, seed: int = 0):
        self.idx, self.svc = idx, svc
        self.rng = random.Random(seed * 1_000_003 + idx)  # the step-time jitter's draws (svc.step_jitter)
        self.cache: OrderedDict[int, int] = OrderedDict()  # segment chain key -> its tokens (LRU)
        self.cache_used = 0
        self.waiting: deque[SimRequest] = deque()
        self.running: list[tuple[int, int, SimRequest]] = []  # heap of (finish step, rid, request)
        self.step = 0  # steps completed
        self.busy = False
        self.version = 0  # bumps invalidate a scheduled wake
        self.seg_t0 = 0.0
        self.seg_steps = 0
        self.seg_dt = 0.0
        self.seg_chunks: list[tuple[SimRequest, int]] = []
        self.busy_s = 0.0

    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def admit(self, req: SimRequest) -> None:
        """Prefix-cache lookup when the request first gets prefill budget (as the engine's scheduler does)."""
        cached = 0
        for key, end in req.segments:
            if key not in self.cache:
                break
            self.cache.move_to_end(key)
            cached = end
        bs = self.svc.block_size
        req.cached_tokens = min(cached // bs * bs, (req.prompt_tokens - 1) // bs * bs)
        req.prefill_left = req.prompt_tokens - req.cached_tokens
        prev = 0
        for key, end in req.segments:
            self._insert(key, end - prev)
            prev = end

    def _insert(self, key: int, tokens: int) -> None:
        if key in self.cache:
            self.cache.move_to_end(key)
            return
        self.cache[key] = tokens
        self.cache_used += tokens
        while self.cache_used > self.svc.cache_tokens and len(self.cache) > 1:
            _, t = self.cache.popitem(last=False)
            self.cache_used -= t

    def plan(self, now: float) -> float | None:
        """Start the next segment at `now`; returns its end time (None: idle)."""
        svc = self.svc
        n_run = len(self.running)
        chunks: list[tuple[SimRequest, int]] = []
        budget = svc.token_budget - n_run
        slots = svc.max_num_seqs - n_run
        for req in self.waiting:
            if budget <= 0 or slots <= 0:
                break
            if req.prefill_left < 0:
                self.admit(req)
            take = min(budget, req.prefill_left)
            chunks.append((req, take))
            budget -= take
            slots -= 1
        if chunks:
            steps, dt = 1, svc.step_s(n_run, sum(t for _, t in chunks))
        elif n_run:
            steps, dt = self.running[0][0] - self.step, svc.step_s(n_run, 0)
        else:
            self.busy = False
            return None
        if svc.step_jitter:
            dt *= self.rng.choice(svc.step_jitter)
        self.busy, self.seg_t0, self.seg_steps, self.seg_dt, self.seg_chunks = True, now, steps, dt, chunks
        self.version += 1
        return now + steps * dt

    def cut_short(self, now: float) -> float | None:
        """A request arrived during a decode stretch: end it after the step in flight. Returns the new end time,
        or None when the segment ends at that step anyway."""
        if not self.busy or self.seg_steps <= 1:
            return None
        done = int((now - self.seg_t0) / self.seg_dt)
        if done + 1 >= self.seg_steps:
            return None
        self.seg_steps = done + 1
        self.version += 1
        return self.seg_t0 + self.seg_steps * self.seg_dt

    def finish_segment(self, now: float) -> list[SimRequest]:
        """Account the segment that ends at `now`; returns the requests that finished."""
        self.step += self.seg_steps
        self.busy_s += self.seg_steps * self.seg_dt
        done: list[SimRequest] = []
        for req, take in self.seg_chunks:
            req.prefill_left -= take
            if req.prefill_left == 0:
                self.waiting.remove(req)
                req.first_token_s = now
                if req.output_tokens <= 1:
                    req.finish_s = now
                    done.append(req)
                else:
                    heapq.heappush(self.running, (self.step + req.output_tokens - 1, req.rid, req))
        self.seg_chunks = []
        while self.running and self.running[0][0] <= self.step:
            req = heapq.heappop(self.running)[2]
            req.finish_s = now
            done.append(req)
        for req in done:  # the reply's blocks are cached too (the next turn's prompt starts with them)
            self._insert(req.reply_key, req.output_tokens)
        return done


@dataclass(frozen=True)
class SimResult:
    policy: str
    replicas: int
    requests: int
    requests_per_s: float  # measured arrivals after the warm-up (later turns follow earlier replies)
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    hit_rate: float  # prompt tokens served from the prefix cache / prompt tokens
    out_tok_s: float
    utilization: float  # mean share of time replicas were stepping
    cost_per_1m_out: float  # USD per million output tokens, every replica paid for the whole run

    def row(self) -> dict:
        return self.__dict__.copy()


def simulate(replicas: int, workload: WorkloadConfig | None, router: RouterConfig, service: ServiceModel | None = None,
             duration_s: float = 120.0, warmup_s: float = 20.0, price_per_hour: float = 0.10,
             requests: Iterable[SimRequest] | None = None,
             on_finish: Callable[[SimRequest], None] | None = None) -> SimResult:
    """Run the cluster for `duration_s` of arrivals (then drain) and report requests that arrived after
    `warmup_s`. `requests` replaces the chat workload with a fixed list of (single-turn) requests."""
    if replicas < 1:
        raise ValueError("the cluster needs at least one replica")
    svc = service or ServiceModel()
    reps = [SimReplica(i, svc, router.seed) for i in range(replicas)]
    loads = [0] * replicas
    rt = Router(router)
    events: list[tuple[float, int, int, object]] = []
    seq = 0

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    rid = 0
    if requests is None:
        if workload is None:
            raise ValueError("simulate needs a workload or a list of requests")
        for conv in conversations(workload, duration_s):
            push(conv.start_s, _ARRIVAL, next_request(conv, rid, conv.start_s))
            rid += 1
    else:
        for req in requests:
            push(req.arrival, _ARRIVAL, req)
            rid = max(rid, req.rid + 1)

    measured: list[SimRequest] = []
    out_tokens = 0
    last_t = 0.0
    while events:
        t, _, kind, payload = heapq.heappop(events)
        last_t = t
        if kind == _ARRIVAL and svc.request_overhead_s > 0:  # the hops first; TTFT still counts from the arrival
            push(t + svc.request_overhead_s, _DELIVER, payload)
            continue
        if kind in (_ARRIVAL, _DELIVER):
            req = payload  # type: ignore[assignment]
            r = rt.choose(req.prefix_hashes, loads)
            req.replica = r
            rep = reps[r]
            rep.waiting.append(req)
            loads[r] += 1
            end = rep.plan(t) if not rep.busy else rep.cut_short(t)
            if end is not None:
                push(end, _WAKE, (r, rep.version))
            continue
        r, version = payload  # type: ignore[misc]
        rep = reps[r]
        if version != rep.version:
            continue  # superseded by a cut-short
        for req in rep.finish_segment(t):
            loads[r] -= 1
            if req.arrival >= warmup_s:
                measured.append(req)
            if req.arrival < duration_s:
                out_tokens += req.output_tokens
            if on_finish is not None:
                on_finish(req)
            conv = req.conv
            if conv is not None and conv.next_turn < len(conv.turns):
                at = t + conv.thinks[conv.next_turn - 1]
                if at < duration_s:
                    push(at, _ARRIVAL, next_request(conv, rid, at))
                    rid += 1
        end = rep.plan(t)
        if end is not None:
            push(end, _WAKE, (r, rep.version))
    return _summarize(router.policy, reps, measured, out_tokens, duration_s, warmup_s, last_t, price_per_hour)


def _summarize(policy: str, reps: list[SimReplica], measured: list[SimRequest], out_tokens: int, duration_s: float,
               warmup_s: float, end_s: float, price_per_hour: float) -> SimResult:
    ttft = sorted(r.first_token_s - r.arrival for r in measured)
    tpot = sorted((r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in measured if r.output_tokens > 1)
    prompt = sum(r.prompt_tokens for r in measured)
    hit = sum(r.cached_tokens for r in measured) / prompt if prompt else 0.0
    n = len(reps)
    cost = n * price_per_hour * duration_s / 3600 / out_tokens * 1e6 if out_tokens else math.inf
    rps = len(measured) / max(duration_s - warmup_s, 1e-9)
    return SimResult(policy, n, len(measured), rps, quantile(ttft, 0.5), quantile(ttft, 0.99), quantile(tpot, 0.5),
                     quantile(tpot, 0.99), hit, out_tokens / duration_s,
                     sum(r.busy_s for r in reps) / (n * max(end_s, 1e-9)), cost)


def quantile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list (nan when empty)."""
    if not sorted_xs:
        return math.nan
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


def replicas_for_slo(run: Callable[[int], SimResult], ttft_p99_s: float, lo: int, hi: int,
                     rel_tol: float = 0.05, tpot_p99_s: float | None = None) -> int | None:
    """Fewest replicas (to within rel_tol) whose simulated TTFT p99 (and TPOT p99, when given) meet the SLO:
    bisection on a log scale (assumes more replicas never hurt). None when even `hi` misses it."""
    def ok(m: int) -> bool:
        r = run(m)
        return r.ttft_p99_s <= ttft_p99_s and (tpot_p99_s is None or r.tpot_p99_s <= tpot_p99_s)

    if not ok(hi):
        return None
    lo = max(1, lo)
    if ok(lo):
        return lo
    while hi > lo + 1 and hi > lo * (1 + rel_tol):
        mid = int(round(math.sqrt(lo * hi)))
        mid = min(max(mid, lo + 1), hi - 1)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
