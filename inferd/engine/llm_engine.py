"""LLMEngine: the synchronous core. add_request() → step() → RequestOutputs, until nothing is left.

A step is: propose (speculative decoding, when on) → schedule → one forward over every scheduled token →
sample (and verify proposals) → the output processor appends tokens, detokenizes, checks stops → outputs.
Each step's wall time is divided over the tokens it computed, giving every request its compute seconds (and so
its cost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from inferd.config import EngineConfig
from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.kv_plan import plan_kv
from inferd.engine.output_processor import OutputProcessor, RequestGroup
from inferd.engine.outputs import CompletionOutput, RequestOutput
from inferd.engine.request import Request, RequestStatus
from inferd.engine.runner import ModelRunner
from inferd.engine.sampler import Sampler, prompt_logprobs
from inferd.engine.scheduler import Scheduler, SchedulerOutput
from inferd.engine.spec_decode import DraftModelProposer, NgramProposer, SpecPolicy
from inferd.engine.spec_decode.verify import accept, sampler_rows
from inferd.errors import InvalidRequestError
from inferd.hardware import available_memory_bytes, pick_device, pick_dtype
from inferd.loader.repack_cache import release_dense_pages
from inferd.models.registry import LoadedModel, load_model, weight_bytes
from inferd.quant.apply import QuantConfig
from inferd.sampling_params import SamplingParams
from inferd.structured.compiler import GrammarCompiler

log = logging.getLogger(__name__)


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
        sc = replace(config.scheduler, max_model_len=self.max_model_len)
        sc.max_num_batched_tokens = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        self.kv_plan = plan_kv(self.lm, cc.block_size, cc.kv_cache_memory_gib, available_memory_bytes(self.lm.device),
                               config.memory_profile, sc.max_num_seqs, sc.max_num_batched_tokens)
        num_blocks = self.kv_plan.num_blocks
        self.kv = self.kv_plan.make_manager(cc.enable_prefix_caching,
                                            grow_before_evict=config.memory_profile != "small")
        self.scheduler = Scheduler(sc, self.kv)
        self.runner = ModelRunner(self.lm, num_blocks, cc.block_size,
                                  cuda_graphs=not config.enforce_eager, max_num_seqs=sc.max_num_seqs,
                                  # 2 MiB KV pages: fewer TLB misses at many streams, up to 2 MiB per layer's K
                                  # and V more memory; only the fast profile takes that trade (see README, Memory)
                                  kv_huge_pages=config.memory_profile == "fast",
                                  window_blocks=self.kv_plan.window_blocks)
        self.sampler = Sampler(self.lm.config.vocab_size)
        self.output = OutputProcessor(self._finish)
        spec = config.speculative
        self.proposer: NgramProposer | DraftModelProposer | None = None
        if spec.method == "ngram":
            self.proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
        elif spec.method == "draft":
            draft = load_model(spec.draft_model, dtype, device, self.max_model_len, quant)
            # as many blocks as the target's pool: a mirror never holds more tokens than its sequence (+ k)
            self.proposer = DraftModelProposer(draft, self.lm.config.vocab_size, num_blocks, cc.block_size)
        self.spec_policy = SpecPolicy(spec.num_speculative_tokens) if self.proposer else None
        self.spec_drafts = 0  # verification runs, proposed and accepted tokens (vLLM's spec_decode counters)
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.spec_accepted_per_pos = [0] * spec.num_speculative_tokens
        self.structured: GrammarCompiler | None = None  # built on the first constrained request
        self.jump_forward = True  # append grammar-forced tokens without sampling them (they then run as a chunk)
        self.num_steps = 0
        self.total_compute_s = 0.0
        self.copy_releases = 0  # times release_idle_memory advised mapped bf16 copies out of RSS
        self.copy_bytes_released = 0  # bytes advised (madvise reports the range, resident or not)
        # True while an offline driver (run_to_completion, LLM.generate) runs a batch submitted at once: its wall
        # time is what counts, so speculation values tokens off the batch's critical path at a row's cost (see
        # _critical). A server (AsyncLLM) leaves it False: there each request's own latency counts.
        self.closed_batch = False
        self.weight_bytes, dense_copies = weight_bytes(self.lm.model)
        kp = self.kv_plan
        window_note = "" if kp.window is None else (
            f"; sliding-window layers ({kp.window_layers}, window {kp.window}): own pool of {kp.window_blocks} blocks")
        log.info("engine ready: %d KV blocks of %d tokens%s", num_blocks, cc.block_size, window_note)
        mapped = any(getattr(m, "_dense_pages", None) for m in self.lm.model.modules())
        log.info("memory (%s profile, %s): weights %.0f MB, of which bf16 copies %.0f MB%s; KV max %.0f MB "
                 "(%d tokens, backed as used)", config.memory_profile, self.lm.quantization, self.weight_bytes / 1e6,
                 dense_copies / 1e6, " (mapped, released while serve is idle)" if mapped else "", kp.max_bytes / 1e6,
                 num_blocks * cc.block_size)

    @property
    def model_name(self) -> str:
        return self.lm.name

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler (thread-safe; the server awaits compiles on it off this thread)."""
        if self.structured is None:
            self.structured = GrammarCompiler(self.tokenizer.hf.to_str(), self.lm.config.vocab_size,
                                              self.tokenizer.eos_token_ids)
            self.sampler.structured = self.structured
        return self.structured

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
        compiled = None
        if params.structured_outputs is not None:  # cached when the server awaited it; else compiled here
            compiled = self.grammar_compiler().compile(params.structured_outputs)
            with self.grammar_compiler().stats.lock:
                self.grammar_compiler().stats.requests += 1
        children, detoks = [], []
        for i in range(params.n):
            p = params if params.seed is None else replace(params, seed=params.seed + i)
            req = Request(f"{request_id}#{i}", ids, p, eos_token_ids=self.tokenizer.eos_token_ids,
                          priority=priority, max_tokens=max_tokens)
            if arrival is not None:
                req.times.arrival = arrival
            if compiled is not None:
                req.grammar = compiled.matcher()
            if i and params.n > 1:
                req.wait_for = children[0]
            children.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                                 params.include_stop_str_in_output))
        self.output.add(RequestGroup(request_id, ids, params, children, detoks))
        for req in children:
            self.scheduler.add_request(req)
        return ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.output.groups.get(request_id)
        if group is None:
            return None
        for req in group.children:
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        return self.output.group_output(group, set(range(len(group.children))))

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.groups)

    def release_idle_memory(self) -> int:
        """Called when the engine goes idle (AsyncLLM: the last request finished): the bf16 copies used from the
        repack cache's mapping (`balanced`; `fast` prepacks private ones and keeps them) leave this process's
        RSS; they stay in the page cache and the next big step maps them again (~230 minor faults for SmolLM2's
        212 MB, docs/benchmarks.md). Returns the bytes released."""
        n = release_dense_pages(self.lm.model)
        if n:
            self.copy_releases += 1
            self.copy_bytes_released += n
        return n

    @property
    def groups(self) -> dict[str, RequestGroup]:
        return self.output.groups

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.sampler.forget(req.request_id)
        if self.proposer is not None:
            self.proposer.forget(req.request_id)
            self.spec_policy.forget(req.request_id)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        out = self.scheduler.schedule()
        if out.is_empty():
            return []
        t0 = time.perf_counter()
        changed: dict[str, set[int]] = {}
        try:
            batch = self.runner.prepare(out)
            logits = self.runner.execute(batch)
            sampled = self.scheduler.update_after_step(out)
            sample_reqs, rows, views = [], [], []
            for req, first, count in zip(out.requests, batch.sample_rows, batch.num_sample_rows):
                if first >= 0:
                    sample_reqs.append(req)
                    rows.extend(range(first, first + count))
                    views.extend(sampler_rows(req))
            # every row in order (a decode step): the sampler takes the logits as they are, no (B, V) gather copy
            # (its grammar masks change them in place: no prompt-logprob rows are left to read then)
            every_row = rows == list(range(logits.shape[0]))
            so = self.sampler(logits if every_row else logits[rows], views) if rows else None
            by_id = {r.request_id: r for r in out.requests}
            for rid, (first, count, pos0) in batch.prompt_lp_rows.items():
                req = by_id[rid]
                nxt = req.prompt_token_ids[pos0 + 1 : pos0 + 1 + count]
                req.prompt_logprobs.extend(prompt_logprobs(logits[first : first + count], nxt,
                                                           req.params.prompt_logprobs or 0))
        except Exception as exc:  # the affected requests get the error; the engine keeps going
            log.exception("engine step failed")
            for req in out.requests:
                req.spec_token_ids = []
                self.output.fail(req, f"{type(exc).__name__}: {exc}")
                self.output.mark(changed, req)
            return self.output.collect(changed)
        now = time.monotonic()
        dt = time.perf_counter() - t0
        self.num_steps += 1
        self.total_compute_s += dt
        total = out.total_tokens
        for req in out.requests:
            req.times.compute_s += dt * out.num_tokens[req.request_id] / total
        if self.spec_policy is not None:
            # verification rows are decode rows: a step is "mixed" only when it carries prefill chunks
            self.spec_policy.time_model.observe(total, bool(batch.meta.prefills), dt)
        assert so is not None or not sample_reqs
        j = 0
        for req in sample_reqs:
            assert req in sampled, "sampled a request whose prompt is not computed"
            spec, k = req.spec_token_ids, len(req.spec_token_ids)
            decided, lps = so.token_ids[j : j + k + 1], so.logprobs[j : j + k + 1]
            j += k + 1
            n_acc = accept(spec, decided) if k else 0
            if k:
                self._count_spec(req, k, n_acc)
            req.spec_token_ids = []
            # the accepted proposals' K/V, written this step, is now the sequence's own
            req.num_computed_tokens += n_acc
            applied = self.output.append(req, decided[: n_acc + 1], lps[: n_acc + 1], now)
            if not req.status.finished:
                assert applied == n_acc + 1
                if req.grammar is not None:  # constrained sequences never speculate: one decided token
                    self._advance_grammar(req, decided[0], now)
            if not req.status.finished:
                self.kv.cache_full_blocks(req)
            self.output.mark(changed, req)
        return self.output.collect(changed)

    def _advance_grammar(self, req: Request, tok: int, now: float) -> None:
        """Advance a constrained sequence's matcher with its sampled token, then append the tokens the grammar
        forces (jump-forward: no sampling decision; the next step computes them as one chunk)."""
        m = req.grammar
        if not m.consume_token(tok):
            self.output.fail(req, f"the grammar rejected token {tok}: {m.get_error()}")
            return
        # logprobs: one by one; jump_forward off: forced tokens are sampled (masked to one choice) like any other
        forced = m.compute_ff_tokens() if self.jump_forward and req.params.logprobs is None else []
        forced = forced[: req.max_tokens - len(req.output_token_ids)]
        if forced and not m.consume_tokens(forced):
            self.output.fail(req, f"the grammar rejected its own forced tokens {forced}: {m.get_error()}")
            return
        if forced:
            self.output.append(req, forced, [None] * len(forced), now)
        if not req.status.finished and m.is_stopped():  # the grammar admits nothing more, not even EOS
            group, idx = self.output.group_of(req)
            group.detoks[idx].flush()
            self._finish(req, RequestStatus.FINISHED_STOPPED)

    # ---- speculative decoding ------------------------------------------------------------------
    def _propose(self) -> None:
        """Give decoding sequences proposals for the coming step, as many as the policy finds worth verifying."""
        decoding, mixed = [], bool(self.scheduler.waiting)
        for req in self.scheduler.running:
            if req.grammar is not None:  # constrained: its next token's mask needs the matcher's state
                continue
            if req.num_tokens - req.num_computed_tokens == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                decoding.append(req)
            else:
                mixed = True
        policy, proposer = self.spec_policy, self.proposer
        wanted = {}
        for r in decoding:  # room: k proposals can emit k+1 tokens, within max_tokens and the context
            k = min(policy.max_tokens, r.max_tokens - len(r.output_token_ids) - 1, self.max_model_len - r.num_tokens - 1)
            if k > 0:
                wanted[r.request_id] = (r.all_token_ids, k)
        first_pass = None if proposer.cheap else proposer.first_pass_seconds(wanted)
        if policy.skip_step(len(decoding), mixed, sum(k for _, k in wanted.values()), len(wanted),
                            proposer.pass_seconds, min(first_pass.values(), default=0.0) if first_pass else 0.0):
            plan, proposals = {}, {}  # not even proposals that all land could pay: propose nothing
        elif proposer.cheap:  # prompt lookup: propose, then verify what pays
            proposals = proposer.propose_batch(wanted)
            plan = policy.plan({rid: len(p) for rid, p in proposals.items()}, len(decoding), mixed,
                               critical=self._critical(decoding, mixed))
        else:  # a draft model: decide how many first, then draft only those
            plan = policy.plan({rid: k for rid, (_, k) in wanted.items()}, len(decoding), mixed,
                               proposer.pass_seconds, first_pass, self._critical(decoding, mixed))
            proposals = proposer.propose_batch({rid: (wanted[rid][0], k) for rid, k in plan.items()})
        for req in decoding:
            k = plan.get(req.request_id, 0)
            req.spec_token_ids = proposals.get(req.request_id, [])[:k] if k else []
            k = len(req.spec_token_ids)
            if not k:
                self.spec_policy.record(req.request_id, 0, 0)

    def _critical(self, decoding: list[Request], mixed: bool) -> set[str] | None:
        """In an offline closed batch (`closed_batch`) with nothing waiting for a slot or prefilling: the sequences
        with the most tokens left in their budgets, whose length the batch lasts (see SpecPolicy.plan); else None."""
        if not self.closed_batch or mixed or len(decoding) < 2:
            return None
        left = {r.request_id: r.max_tokens - len(r.output_token_ids) for r in decoding}
        most = max(left.values())
        return {rid for rid, n in left.items() if n == most}

    def _count_spec(self, req: Request, proposed: int, accepted: int) -> None:
        self.spec_policy.record(req.request_id, proposed, accepted)
        req.spec_draft_tokens += proposed
        req.spec_accepted_tokens += accepted
        self.spec_drafts += 1
        self.spec_draft_tokens += proposed
        self.spec_accepted_tokens += accepted
        for pos in range(accepted):
            self.spec_accepted_per_pos[pos] += 1

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_queries": self.kv.queries,
            "prefix_cache_hits": self.kv.hits,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_used": self.kv_plan.bytes_of(self.kv, "used"),
            "kv_bytes_touched": self.kv_plan.bytes_of(self.kv, "touched"),  # resident: blocks ever written
            "kv_bytes_max": self.kv_plan.max_bytes,
            "spec_drafts": self.spec_drafts,
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
        }


@torch.inference_mode()
def run_to_completion(engine: LLMEngine,
                      on_finished: Callable[[RequestOutput], None] | None = None) -> dict[str, RequestOutput]:
    """Drive the engine until every request ends; the last output of each request, by id (`on_finished`: called
    with each as it ends, e.g. a progress bar)."""
    final: dict[str, RequestOutput] = {}
    merged: dict[str, dict[int, CompletionOutput]] = {}
    engine.closed_batch = True
    try:
        while engine.has_unfinished_requests():
            for ro in engine.step():
                slot = merged.setdefault(ro.request_id, {})
                for co in ro.outputs:
                    slot[co.index] = co
                if ro.finished:
                    ro.outputs = [slot[i] for i in sorted(slot)]
                    final[ro.request_id] = ro
                    if on_finished is not None:
                        on_finished(ro)
    finally:
        engine.closed_batch = False
    return final


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits (T, V) at every position of one sequence, in one forward through the paged cache
    (used for parity tests and perplexity)."""
    req = Request("__logits__", list(token_ids), SamplingParams(max_tokens=1))
    if not engine.kv.allocate_slots(req, len(token_ids)):
        raise InvalidRequestError("not enough KV cache for this sequence")
    try:
        out = SchedulerOutput({req.request_id: len(token_ids)}, [req])
        batch = engine.runner.prepare(out)
        batch.logit_rows = torch.arange(len(token_ids), device=engine.lm.device)
        return engine.runner.execute(batch)
    finally:
        engine.kv.free_request(req)
