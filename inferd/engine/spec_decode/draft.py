"""Draft-model proposals: a smaller model with the same vocabulary (e.g. a student made by `inferd distill`, or
a pruned copy) runs greedily in the same process on its own paged KV cache and proposes k tokens per sequence.

Proposals for all speculating sequences are made together: the first pass catches each sequence's draft cache up
with the tokens the target accepted since the last step (a multi-token chunk) and proposes the first token; then
k−1 single-token passes (a batched decode) propose the rest. Each sequence's draft mirror remembers which tokens
its cache holds; after verification the shared prefix with the real sequence is kept and the rest (rejected
proposals) is simply recomputed next time.
"""

from __future__ import annotations

import time

import torch

from inferd.engine.block_manager import KVCacheManager
from inferd.engine.request import Request
from inferd.engine.runner import ModelRunner
from inferd.engine.scheduler import SchedulerOutput
from inferd.errors import InvalidRequestError
from inferd.models.registry import LoadedModel
from inferd.sampling_params import SamplingParams

_DRAFT_PARAMS = SamplingParams(max_tokens=None, temperature=0)


class DraftModelProposer:
    cheap = False  # proposing costs forwards: the policy plans first, then only the planned tokens are drafted

    def __init__(self, draft: LoadedModel, target_vocab_size: int, num_blocks: int, block_size: int):
        if draft.config.vocab_size != target_vocab_size:
            raise InvalidRequestError(
                f"draft model {draft.name!r} has a vocabulary of {draft.config.vocab_size} tokens, the target "
                f"{target_vocab_size}: speculative decoding needs the same vocabulary", param="draft_model")
        self.lm = draft
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(draft, num_blocks, block_size)
        self.mirrors: dict[str, Request] = {}  # request id → the draft cache's view of that sequence
        self.pass_seconds = 0.0  # measured time of one drafting pass after the first (exponential average)
        # measured time per catch-up token of the first pass beyond one per sequence: the first pass catches each
        # sequence's draft cache up (a whole prompt for a sequence never drafted before), which makes an occasional
        # draft for a long sequence expensive
        self.token_seconds = 0.0

    def forget(self, request_id: str) -> None:
        m = self.mirrors.pop(request_id, None)
        if m is not None:
            self.kv.free_request(m)

    def first_pass_seconds(self, wanted: dict[str, tuple[list[int], int]]) -> dict[str, float]:
        """request id → the estimated extra time of its catch-up in the first drafting pass (its tokens not yet in
        the draft cache beyond the one a pass takes anyway, at the measured time per token); the policy adds it to
        what the sequence's first proposal costs."""
        out = {}
        for rid, (tokens, _) in wanted.items():
            m = self.mirrors.get(rid)
            behind = len(tokens) - (min(m.num_computed_tokens, len(tokens) - 1) if m else 0)
            out[rid] = (behind - 1) * self.token_seconds
        return out

    def _mirror(self, request_id: str, tokens: list[int]) -> Request:
        """The mirror with its cache's tokens trimmed to the longest prefix shared with `tokens`."""
        m = self.mirrors.get(request_id)
        if m is None:
            m = self.mirrors[request_id] = Request(f"draft:{request_id}", [], _DRAFT_PARAMS)
        have = m.all_token_ids[: m.num_computed_tokens]
        keep = 0
        limit = min(len(have), len(tokens) - 1)  # the last token is always (re)computed: it gives the logits
        if limit > 0 and have[:limit] == tokens[:limit]:
            keep = limit
        else:
            while keep < limit and have[keep] == tokens[keep]:
                keep += 1
        m.prompt_token_ids, m.output_token_ids = list(tokens), []
        m.num_computed_tokens = keep
        return m

    @torch.inference_mode()
    def propose_batch(self, wanted: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        """wanted: request id → (its tokens so far, how many to propose). Greedy proposals, made in
        max(k) passes over all of them at once."""
        t0 = time.perf_counter()
        active: list[tuple[str, Request, int]] = []
        for rid, (tokens, k) in wanted.items():
            if k <= 0 or len(tokens) + k > self.lm.max_model_len:
                continue
            m = self._mirror(rid, tokens)
            if not self.kv.allocate_slots(m, len(tokens) + k - 1 - m.num_computed_tokens):
                continue  # the draft cache is full: this sequence does not speculate this step
            active.append((rid, m, k))
        out: dict[str, list[int]] = {rid: [] for rid, _, _ in active}
        passes, t_first, first_tokens = 0, 0.0, 0
        while active:
            sched = SchedulerOutput({m.request_id: m.num_tokens - m.num_computed_tokens for _, m, _ in active},
                                    [m for _, m, _ in active])
            # decodes (one new token past the prompt) must come first in a batch
            sched.requests.sort(key=lambda m: not (sched.num_tokens[m.request_id] == 1
                                                   and m.num_computed_tokens >= m.num_prompt_tokens))
            if passes == 0:
                t_first, first_tokens = time.perf_counter(), sum(sched.num_tokens.values())
            batch = self.runner.prepare(sched)
            logits = self.runner.execute(batch)
            if passes == 0:
                t_first = time.perf_counter() - t_first
            passes += 1
            order = {m.request_id: i for i, m in enumerate(sched.requests)}
            nxt = logits[:, : self.lm.config.vocab_size].argmax(dim=-1).tolist()
            still = []
            for rid, m, k in active:
                m.num_computed_tokens = m.num_tokens
                tok = nxt[batch.sample_rows[order[m.request_id]]]
                out[rid].append(tok)
                if len(out[rid]) < k:
                    m.output_token_ids.append(tok)
                    still.append((rid, m, k))
            active = still
        if passes:
            ema = lambda old, new: new if not old else 0.8 * old + 0.2 * new  # noqa: E731
            extra = first_tokens - len(out)  # catch-up tokens beyond one per sequence
            if passes > 1:  # single-token passes: the pass cost
                self.pass_seconds = ema(self.pass_seconds, (time.perf_counter() - t0 - t_first) / (passes - 1))
            elif extra < 8:  # a first pass with little catching up is a single-token pass too
                self.pass_seconds = ema(self.pass_seconds, t_first)
            if extra >= 8 and self.pass_seconds:
                self.token_seconds = ema(self.token_seconds, max(t_first - self.pass_seconds, 0.0) / extra)
        return out
