"""Prometheus metrics with vLLM's names (so existing dashboards work) plus inferd's cost counters."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferd.engine.llm_engine import LLMEngine
from inferd.engine.outputs import RequestOutput
from inferd.server.stats import RecentWindow

_LAT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)


REJECT_REASONS = ("queue_full", "draining", "unauthorized", "body_too_large", "client_disconnect", "model_loading")


class Metrics:
    def __init__(self, price_per_hour: float = 0.0):
        self.registry = CollectorRegistry()
        self.price_per_hour = price_per_hour
        self._compute_series: dict[str, tuple[Any, Any, Any]] = {}  # observe_compute's labelled children per model
        r, lbl = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", lbl, buckets=_LAT_BUCKETS,
                              registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", lbl,
                             buckets=_LAT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", lbl,
                             buckets=_LAT_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting before first scheduled", lbl,
                               buckets=_LAT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", lbl, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", lbl, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests", lbl + ["finished_reason"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests running", lbl, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", lbl, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (0-1)", lbl, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens", lbl,
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens", lbl, registry=r)
        self.cost = Counter("inferd_request_cost_usd", "Cost attributed to requests, USD", lbl, registry=r)
        self.compute = Counter("inferd_compute_seconds", "Engine step seconds attributed to requests", lbl,
                               registry=r)
        self.embed_cache_hits = Counter("inferd_embedding_cache_hits", "Embedding cache hits (inputs)", lbl,
                                        registry=r)
        self.embed_cache_misses = Counter("inferd_embedding_cache_misses", "Embedding cache misses (inputs)", lbl,
                                          registry=r)
        # memory (issue 21): weights as loaded; KV in use (blocks held), resident (blocks ever written: the pool's
        # pages are backed on first use) and the pool's maximum
        self.weight_bytes = Gauge("inferd_model_weight_bytes", "Bytes of model weights (incl. bf16 copies)", lbl,
                                  registry=r)
        self.kv_bytes = Gauge("inferd_kv_cache_bytes", "KV cache bytes: used, resident, max", lbl + ["kind"],
                              registry=r)
        # speculative decoding (vLLM's names): verification runs, proposed and accepted tokens, and acceptance by
        # position in the run (position 0 is the first proposal)
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Speculative runs verified", lbl, registry=r)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Tokens proposed", lbl, registry=r)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted", lbl,
                                     registry=r)
        self.spec_accepted_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                         "Proposed tokens accepted, by position in the run", lbl + ["position"],
                                         registry=r)
        # structured outputs (issue 14): constrained requests, grammar compile time, mask time per engine step
        self.structured_requests = Counter("inferd_structured_output_requests", "Requests with a structured-output "
                                           "constraint (JSON schema, regex, choice, grammar, tool call)", lbl,
                                           registry=r)
        self.grammar_compile = Histogram("inferd_grammar_compile_seconds", "Grammar compile time (cache misses)",
                                         lbl, buckets=_LAT_BUCKETS, registry=r)
        self.grammar_mask = Histogram("inferd_grammar_mask_seconds", "Time per engine step to compute and apply "
                                      "the token masks of the constrained rows", lbl,
                                      buckets=(0.0001, 0.0005, *_LAT_BUCKETS), registry=r)
        self.audio_seconds = Counter("inferd_audio_seconds", "Seconds of audio transcribed", lbl, registry=r)
        self.rejected = Counter("inferd_requests_rejected", "Requests refused or cut short", ["reason"], registry=r)
        for reason in REJECT_REASONS:  # every series exists from the start, at 0
            self.rejected.labels(reason)
        self._seen_prefix: dict[str, tuple[int, int]] = {}
        self._seen_spec: dict[str, tuple[int, ...]] = {}
        self._tok_count: dict[str, int] = {}
        self.recent = RecentWindow()  # the last minute, for /stats

    def add_model(self, name: str, engine: LLMEngine | None = None) -> None:
        """Create every per-model series at load (value 0), so dashboards and scrapes see them before traffic."""
        if engine is not None:
            self._memory(name, engine.stats())
        for m in (self.running, self.waiting, self.kv_usage, self.prefix_queries, self.prefix_hits,
                  self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue,
                  self.compute, self.cost, self.structured_requests, self.grammar_compile, self.grammar_mask):
            m.labels(name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(name, reason)
        if engine is not None and engine.proposer is not None:
            for m in (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted):
                m.labels(name)
            for pos in range(len(engine.spec_accepted_per_pos)):
                self.spec_accepted_pos.labels(name, str(pos))

    def _memory(self, name: str, s: dict[str, float]) -> None:
        self.weight_bytes.labels(name).set(s["weight_bytes"])
        for kind in ("used", "touched", "max"):
            self.kv_bytes.labels(name, "resident" if kind == "touched" else kind).set(s[f"kv_bytes_{kind}"])

    def cost_usd(self, compute_s: float) -> float:
        return compute_s * self.price_per_hour / 3600.0

    def observe_compute(self, name: str, compute_s: float, e2e_s: float | None = None) -> float:
        """Compute seconds (and so cost) of one request of a batched model (encoder, tabular, audio); its cost."""
        cost = self.cost_usd(compute_s)
        series = self._compute_series.get(name)
        if series is None:  # labels() hashes and locks on every call: look the children up once per model
            series = self._compute_series[name] = (self.compute.labels(name), self.cost.labels(name),
                                                   self.e2e.labels(name))
        series[0].inc(compute_s)
        series[1].inc(cost)
        if e2e_s is not None:
            series[2].observe(e2e_s)
        return cost

    def on_step(self, name: str, engine: LLMEngine) -> None:
        s = engine.stats()
        self.running.labels(name).set(s["num_running"])
        self.waiting.labels(name).set(s["num_waiting"])
        self.kv_usage.labels(name).set(s["kv_cache_usage"])
        self._memory(name, s)
        q0, h0 = self._seen_prefix.get(name, (0, 0))
        q, h = int(s["prefix_cache_queries"]), int(s["prefix_cache_hits"])
        if q > q0:
            self.prefix_queries.labels(name).inc(q - q0)
        if h > h0:
            self.prefix_hits.labels(name).inc(h - h0)
        self._seen_prefix[name] = (q, h)
        if engine.proposer is not None:
            now = (engine.spec_drafts, engine.spec_draft_tokens, engine.spec_accepted_tokens,
                   *engine.spec_accepted_per_pos)
            before = self._seen_spec.get(name, (0,) * len(now))
            for counter, d in zip((self.spec_drafts, self.spec_draft_tokens, self.spec_accepted),
                                  (a - b for a, b in zip(now, before))):
                if d:
                    counter.labels(name).inc(d)
            for pos, (a, b) in enumerate(zip(now[3:], before[3:])):
                if a > b:
                    self.spec_accepted_pos.labels(name, str(pos)).inc(a - b)
            self._seen_spec[name] = now
        if engine.structured is not None:
            n, compiles, masks = engine.structured.stats.drain()
            if n:
                self.structured_requests.labels(name).inc(n)
            for dt in compiles:
                self.grammar_compile.labels(name).observe(dt)
            for dt in masks:
                self.grammar_mask.labels(name).observe(dt)

    def on_output(self, name: str, ro: RequestOutput) -> None:
        self.recent.on_output(name, ro)
        for co in ro.outputs:
            if co.delta_token_ids:
                self.generation_tokens.labels(name).inc(len(co.delta_token_ids))
        for gap in ro.metrics.itl_s:
            self.itl.labels(name).observe(gap)
        if not ro.finished:
            return
        m = ro.metrics
        self.prompt_tokens.labels(name).inc(len(ro.prompt_token_ids))
        for co in ro.outputs:
            self.success.labels(name, co.finish_reason or "abort").inc()
        if m.ttft_s is not None:
            self.ttft.labels(name).observe(m.ttft_s)
        if m.e2e_s is not None:
            self.e2e.labels(name).observe(m.e2e_s)
        self.queue.labels(name).observe(m.queue_s)
        self.compute.labels(name).inc(m.compute_s)
        self.cost.labels(name).inc(self.cost_usd(m.compute_s))
