"""GET /stats: the dashboard's numbers as one JSON document, for the web page and any other tool.

Lifetime figures (tokens, cost, cache hits, gauges) are read back from the Prometheus registry, so /stats and
/metrics never disagree. What Prometheus cannot give — percentiles and rates over the last minute — comes from
`RecentWindow`, which the metrics hook feeds from the engine thread: one record per finished request and a
per-second count of generated tokens, both dropped once older than the window."""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferd.engine.outputs import RequestOutput
    from inferd.server.state import ModelSlot, ServerState

WINDOW_S = 60  # latency percentiles, rates and the sparkline cover this many seconds
RATE_S = 5  # "output tokens/s now" is the mean over the last RATE_S whole seconds


@dataclass(frozen=True)
class Finished:
    """One finished request, as the window keeps it."""

    t: float  # wall-clock time it finished
    ttft_s: float | None
    tpot_s: float | None
    prompt_tokens: int
    output_tokens: int
    compute_s: float
    aborted: bool


class RecentWindow:
    """Per model: finished requests and generated tokens per second over the last WINDOW_S seconds.
    Written by the engine thread (on_output), read by the event loop (snapshot): every access holds the lock."""

    def __init__(self, window_s: int = WINDOW_S, clock=time.time):
        self.window_s, self.clock = window_s, clock
        self._lock = threading.Lock()
        self._done: dict[str, collections.deque[Finished]] = {}
        self._tokens: dict[str, dict[int, int]] = {}  # model → {unix second: tokens generated in it}
        self._trimmed: dict[str, int] = {}  # model → the second it was last trimmed (once a second is enough)

    def on_output(self, name: str, ro: RequestOutput) -> None:
        now = self.clock()
        n = sum(len(co.delta_token_ids) for co in ro.outputs)
        with self._lock:
            if n:
                sec = self._tokens.setdefault(name, {})
                sec[int(now)] = sec.get(int(now), 0) + n
            if ro.finished:
                m = ro.metrics
                out = sum(len(co.token_ids) for co in ro.outputs)
                aborted = any(co.finish_reason == "abort" for co in ro.outputs)
                self._done.setdefault(name, collections.deque()).append(
                    Finished(now, m.ttft_s, m.tpot_s, len(ro.prompt_token_ids), out, m.compute_s, aborted))
            if self._trimmed.get(name) != int(now):  # a hot path (every output of every request): trim once a second
                self._trimmed[name] = int(now)
                self._trim(name, now)

    def _trim(self, name: str, now: float) -> None:
        done = self._done.get(name)
        while done and done[0].t < now - self.window_s:
            done.popleft()
        sec = self._tokens.get(name)
        if sec:
            for s in [s for s in sec if s < int(now) - self.window_s]:  # the history's oldest second stays
                del sec[s]

    def snapshot(self, name: str) -> tuple[list[Finished], list[int]]:
        """(finished requests in the window, tokens per second for each of the last WINDOW_S whole seconds,
        oldest first; the current, unfinished second is left out)."""
        now = self.clock()
        with self._lock:
            self._trim(name, now)
            done = list(self._done.get(name, ()))
            sec = dict(self._tokens.get(name, {}))
        last = int(now) - 1
        return done, [sec.get(s, 0) for s in range(last - self.window_s + 1, last + 1)]


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not b or a is None else a / b


class _Reader:
    """Values of one model's series in the Prometheus registry (0 when a series does not exist yet)."""

    def __init__(self, state: ServerState, name: str):
        self.registry, self.name = state.metrics.registry, name

    def __call__(self, metric: str, **labels: str) -> float:
        v = self.registry.get_sample_value(metric, {"model_name": self.name, **labels})
        return 0.0 if v is None else v


def _chat_model(state: ServerState, slot: ModelSlot, window: RecentWindow) -> dict[str, Any]:
    get = _Reader(state, slot.name)
    done, per_sec = window.snapshot(slot.name)
    ttft = [d.ttft_s for d in done if d.ttft_s is not None]
    tpot = [d.tpot_s for d in done if d.tpot_s is not None]
    compute = sum(d.compute_s for d in done)
    out_tokens = sum(d.output_tokens for d in done)
    all_tokens = out_tokens + sum(d.prompt_tokens for d in done)
    cost = state.metrics.cost_usd(compute)
    total_cost = get("inferd_request_cost_usd_total")
    total_out = get("vllm:generation_tokens_total")
    total_prompt = get("vllm:prompt_tokens_total")
    queries, hits = get("vllm:prefix_cache_queries_total"), get("vllm:prefix_cache_hits_total")
    entry: dict[str, Any] = {
        "requests_running": int(get("vllm:num_requests_running")),
        "requests_waiting": int(get("vllm:num_requests_waiting")),
        "output_tokens_per_s": sum(per_sec[-RATE_S:]) / RATE_S,
        "output_tokens_per_s_history": per_sec,
        "last_minute": {
            "requests": len(done),
            "aborted": sum(d.aborted for d in done),
            "prompt_tokens": sum(d.prompt_tokens for d in done),
            "output_tokens": out_tokens,
            "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p95": _ms(percentile(ttft, 95))},
            "tpot_ms": {"p50": _ms(percentile(tpot, 50)), "p95": _ms(percentile(tpot, 95))},
            "compute_s": round(compute, 6),
            "busy": round(compute / window.window_s, 6),
            "cost_usd": cost,
            "cost_usd_per_hour": cost * 3600 / window.window_s,
            "cost_usd_per_1m_tokens": None if not all_tokens else cost / all_tokens * 1e6,
        },
        "kv_cache_usage": get("vllm:kv_cache_usage_perc"),
        "prefix_cache": {"queries": int(queries), "hits": int(hits), "hit_rate": _ratio(hits, queries)},
        "totals": {
            "requests": int(sum(get("vllm:request_success_total", finished_reason=r) for r in ("stop", "length",
                                                                                             "abort"))),
            "aborted": int(get("vllm:request_success_total", finished_reason="abort")),
            "prompt_tokens": int(total_prompt),
            "output_tokens": int(total_out),
            "cost_usd": total_cost,
            "cost_usd_per_1m_tokens": _ratio(total_cost * 1e6, total_prompt + total_out),
        },
        "memory": {"weight_bytes": int(get("inferd_model_weight_bytes")),
                   "kv_cache_bytes_used": int(get("inferd_kv_cache_bytes", kind="used")),
                   "kv_cache_bytes_max": int(get("inferd_kv_cache_bytes", kind="max"))},
    }
    if slot.llm is not None:
        lm = slot.llm.engine.lm
        entry.update(quantization=lm.quantization, dtype=str(lm.dtype).removeprefix("torch."),
                     device=str(lm.device), max_model_len=slot.llm.engine.max_model_len)
    return entry


def _embed_model(state: ServerState, slot: ModelSlot) -> dict[str, Any]:
    get = _Reader(state, slot.name)
    hits, misses = get("inferd_embedding_cache_hits_total"), get("inferd_embedding_cache_misses_total")
    entry: dict[str, Any] = {"embedding_cache": {"hits": int(hits), "misses": int(misses),
                                                 "hit_rate": _ratio(hits, hits + misses)}}
    if slot.embedder is not None:
        e = slot.embedder.embedder
        nbytes = sum(p.numel() * p.element_size() for p in e.model.parameters())
        entry.update(memory={"weight_bytes": int(nbytes)}, quantization="none",
                     dtype=str(e.dtype).removeprefix("torch."), device=str(e.device), dim=e.dim)
    return entry


def stats(state: ServerState, window: RecentWindow) -> dict[str, Any]:
    models = []
    for slot in state.slots:
        entry: dict[str, Any] = {"name": slot.name, "kind": "chat" if slot.kind == "generate" else "embedding",
                                 "status": slot.status}
        if slot.status == "ready":
            entry.update(_chat_model(state, slot, window) if slot.kind == "generate" else _embed_model(state, slot))
        models.append(entry)
    return {"object": "stats", "time": time.time(), "window_s": window.window_s,
            "price_per_hour": state.metrics.price_per_hour, "draining": state.draining, "models": models}
