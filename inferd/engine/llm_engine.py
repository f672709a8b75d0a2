"""LLMEngine: the synchronous core. add_request() → step() → RequestOutputs, until nothing is left.

A step is: schedule → one forward over every scheduled token → sample → append tokens, detokenize,
check stops → outputs. Each step's wall time is divided over the tokens it computed, giving every request
its compute seconds (and so its cost).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from inferd.config import EngineConfig
from inferd.engine.block_manager import KVCacheManager
from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inferd.engine.request import Request, RequestStatus
from inferd.engine.runner import ModelRunner, kv_bytes_per_block, plan_num_blocks
from inferd.engine.sampler import Sampler, prompt_logprobs
from inferd.engine.scheduler import Scheduler
from inferd.errors import InvalidRequestError
from inferd.hardware import available_memory_bytes, pick_device, pick_dtype
from inferd.models.registry import LoadedModel, load_model, weight_bytes
from inferd.quant.apply import QuantConfig
from inferd.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """One user request: n sequences sharing a prompt."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    reported: set[int] = field(default_factory=set)  # children whose finish was already reported
    logprob_cursor: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        quant = QuantConfig(config.quantization, config.group_size, config.quant_dense_rows, config.memory_profile)
        self.lm = loaded or load_model(config.model, dtype, device, config.scheduler.max_model_len, quant)
        self.tokenizer = self.lm.tokenizer
        self.max_model_len = self.lm.max_model_len
        cc = config.cache
        num_blocks = plan_num_blocks(self.lm, cc.block_size, cc.kv_cache_memory_gib,
                                     available_memory_bytes(self.lm.device), config.memory_profile)
        self.kv = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching,
                                 grow_before_evict=config.memory_profile != "small")
        sc = replace(config.scheduler, max_model_len=self.max_model_len)
        sc.max_num_batched_tokens = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        self.scheduler = Scheduler(sc, self.kv)
        self.runner = ModelRunner(self.lm, num_blocks, cc.block_size,
                                  cuda_graphs=not config.enforce_eager, max_num_seqs=sc.max_num_seqs,
                                  # 64 streams: 565-620 tok/s with 4 KiB KV pages, 797 with 2 MiB ones (Zen 4)
                                  kv_huge_pages=config.memory_profile != "small")
        self.sampler = Sampler(self.lm.config.vocab_size)
        self.groups: dict[str, _Group] = {}
        self.child_of: dict[str, tuple[_Group, int]] = {}
        self.num_steps = 0
        self.total_compute_s = 0.0
        self.kv_bytes_per_block = kv_bytes_per_block(self.lm, cc.block_size)
        self.weight_bytes, dense_copies = weight_bytes(self.lm.model)
        log.info("engine ready: %d KV blocks of %d tokens", num_blocks, cc.block_size)
        log.info("memory (%s profile, %s): weights %.0f MB, of which bf16 copies %.0f MB; KV max %.0f MB "
                 "(%d tokens, backed as used)", config.memory_profile, self.lm.quantization, self.weight_bytes / 1e6,
                 dense_copies / 1e6, num_blocks * self.kv_bytes_per_block / 1e6, num_blocks * cc.block_size)

    @property
    def model_name(self) -> str:
        return self.lm.name

    # ---- requests ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        vocab = self.lm.config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]!r} is out of range [0, {vocab})", param="prompt")
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, arrival: float | None = None) -> list[int]:
        if request_id in self.groups:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        ids = self.encode_prompt(prompt)
        n_prompt = len(ids)
        room = self.max_model_len - n_prompt
        if room < 1:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{n_prompt} tokens", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n_prompt} "
                f"tokens and max_tokens is {max_tokens} ({n_prompt + max_tokens} in all); reduce the prompt or "
                "max_tokens", param="max_tokens")
        children, detoks = [], []
        for i in range(params.n):
            p = params if params.seed is None else replace(params, seed=params.seed + i)
            req = Request(f"{request_id}#{i}", ids, p, eos_token_ids=self.tokenizer.eos_token_ids,
                          priority=priority, max_tokens=max_tokens)
            if arrival is not None:
                req.times.arrival = arrival
            if i and params.n > 1:
                req.wait_for = children[0]
            children.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                                 params.include_stop_str_in_output))
        group = _Group(request_id, ids, params, children, detoks, logprob_cursor=[0] * params.n)
        self.groups[request_id] = group
        for i, req in enumerate(children):
            self.child_of[req.request_id] = (group, i)
            self.scheduler.add_request(req)
        return ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.get(request_id)
        if group is None:
            return None
        for req in group.children:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return self._finish_group_output(group, set(range(len(group.children))))

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty():
            return []
        t0 = time.perf_counter()
        changed: dict[str, set[int]] = {}
        try:
            batch = self.runner.prepare(out)
            logits = self.runner.execute(batch)
            sampled = self.scheduler.update_after_step(out)
            sample_reqs = [r for r, row in zip(out.requests, batch.sample_rows) if row >= 0]
            rows = [row for row in batch.sample_rows if row >= 0]
            so = self.sampler(logits[rows], sample_reqs) if rows else None
            by_id = {r.request_id: r for r in out.requests}
            for rid, (first, count, pos0) in batch.prompt_lp_rows.items():
                req = by_id[rid]
                nxt = req.prompt_token_ids[pos0 + 1 : pos0 + 1 + count]
                req.prompt_logprobs.extend(prompt_logprobs(logits[first : first + count], nxt,
                                                           req.params.prompt_logprobs or 0))
        except Exception as exc:  # the affected requests get the error; the engine keeps going
            log.exception("engine step failed")
            for req in out.requests:
                req.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
                group, idx = self.child_of[req.request_id]
                changed.setdefault(group.request_id, set()).add(idx)
            return self._collect(changed)
        now = time.monotonic()
        dt = time.perf_counter() - t0
        self.num_steps += 1
        self.total_compute_s += dt
        total = out.total_tokens
        for req in out.requests:
            req.times.compute_s += dt * out.num_tokens[req.request_id] / total
        assert so is not None or not sample_reqs
        for j, req in enumerate(sample_reqs):
            assert req in sampled, "sampled a request whose prompt is not computed"
            group, idx = self.child_of[req.request_id]
            tok = so.token_ids[j]
            req.output_token_ids.append(tok)
            if so.logprobs[j] is not None:
                req.logprobs.append(so.logprobs[j])
            if req.times.first_token is None:
                req.times.first_token = now
            req.times.last_token = now
            req.times.token_times.append(now)
            status = req.check_stop()
            stop_str = group.detoks[idx].add(tok)
            if stop_str is not None and status is None:
                req.stop_reason, status = stop_str, RequestStatus.FINISHED_STOPPED
            if status is not None:
                if stop_str is None:  # text cut at a stop string is final; otherwise emit any held bytes
                    group.detoks[idx].flush()
                self.scheduler.finish(req, status)
                self.sampler.forget(req.request_id)
            changed.setdefault(group.request_id, set()).add(idx)
        return self._collect(changed)

    # ---- outputs -------------------------------------------------------------------------------
    def _collect(self, changed: dict[str, set[int]]) -> list[RequestOutput]:
        return [self._finish_group_output(self.groups[gid], idxs) for gid, idxs in changed.items()
                if gid in self.groups]

    def _finish_group_output(self, group: _Group, idxs: set[int]) -> RequestOutput:
        outs = []
        itl: list[float] = []
        for i in sorted(idxs):
            req, det = group.children[i], group.detoks[i]
            fin = req.status.finished
            if fin and i in group.reported:
                continue
            if fin:
                group.reported.add(i)
            tt = req.times.token_times
            if len(tt) >= 2 and req.status is not RequestStatus.FINISHED_ABORTED:
                itl.append(tt[-1] - tt[-2])
            cur = group.logprob_cursor[i]
            group.logprob_cursor[i] = len(req.logprobs)
            outs.append(CompletionOutput(
                index=i, text=det.text, token_ids=list(req.output_token_ids),
                delta_text=det.take_delta(fin), delta_token_ids=req.output_token_ids[-1:] if req.output_token_ids
                else [], finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=req.logprobs if req.params.logprobs is not None else None,
                delta_logprobs=req.logprobs[cur:] if req.params.logprobs is not None else None,
                error=req.error,
            ))
        finished = group.finished
        first = group.children[0]
        t = first.times
        m = RequestMetrics(
            queue_s=(t.first_scheduled - t.arrival) if t.first_scheduled else 0.0,
            ttft_s=(t.first_token - t.arrival) if t.first_token else None,
            compute_s=sum(c.times.compute_s for c in group.children),
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(c.num_preemptions for c in group.children),
            itl_s=itl,
        )
        if t.first_token and t.last_token and len(first.output_token_ids) > 1:
            m.tpot_s = (t.last_token - t.first_token) / (len(first.output_token_ids) - 1)
        if finished:
            m.e2e_s = max((c.times.finished or time.monotonic()) for c in group.children) - t.arrival
            del self.groups[group.request_id]
            for c in group.children:
                self.child_of.pop(c.request_id, None)
        plp = None
        if group.params.prompt_logprobs is not None:
            plp = [None, *first.prompt_logprobs]
        return RequestOutput(group.request_id, group.prompt_ids, outs, finished, plp, m)

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.queries,
            "prefix_cache_hits": self.kv.hits,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_used": self.kv.num_used_blocks * self.kv_bytes_per_block,
            "kv_bytes_touched": self.kv.high_water * self.kv_bytes_per_block,  # resident: blocks ever written
            "kv_bytes_max": self.kv.num_blocks * self.kv_bytes_per_block,
        }


@torch.inference_mode()
def run_to_completion(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Drive the engine until every request ends; the last output of each request, by id."""
    final: dict[str, RequestOutput] = {}
    merged: dict[str, dict[int, CompletionOutput]] = {}
    while engine.has_unfinished_requests():
        for ro in engine.step():
            slot = merged.setdefault(ro.request_id, {})
            for co in ro.outputs:
                slot[co.index] = co
            if ro.finished:
                ro.outputs = [slot[i] for i in sorted(slot)]
                final[ro.request_id] = ro
    return final


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits (T, V) at every position of one sequence, in one forward through the paged cache
    (used for parity tests and perplexity)."""
    req = Request("__logits__", list(token_ids), SamplingParams(max_tokens=1))
    if not engine.kv.allocate_slots(req, len(token_ids)):
        raise InvalidRequestError("not enough KV cache for this sequence")
    try:
        from inferd.engine.scheduler import SchedulerOutput

        out = SchedulerOutput({req.request_id: len(token_ids)}, [req])
        batch = engine.runner.prepare(out)
        batch.logit_rows = torch.arange(len(token_ids), device=engine.lm.device)
        return engine.runner.execute(batch)
    finally:
        engine.kv.free_request(req)
