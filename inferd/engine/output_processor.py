"""OutputProcessor: each sequence's new tokens of a step → appended, stop-checked, detokenized → RequestOutputs.

It runs after the sampler (and, with speculation, after verification): a sequence may get several tokens in one
step, and they are applied one at a time exactly as single-token steps would apply them, so EOS, stop token ids,
max_tokens and stop strings end a run inside an accepted draft at the same token. It owns the user-request groups
(n sequences sharing a prompt), their detokenizers and the per-output deltas (text, token ids, logprobs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from inferd.engine.request import Request, RequestStatus
from inferd.sampling_params import SamplingParams


@dataclass
class RequestGroup:
    """One user request: n sequences sharing a prompt."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    reported: set[int] = field(default_factory=set)  # children whose finish was already reported
    logprob_cursor: list[int] = field(default_factory=list)  # per child: logprobs already sent
    token_cursor: list[int] = field(default_factory=list)  # per child: token ids already sent

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


class OutputProcessor:
    def __init__(self, finish: Callable[[Request, RequestStatus], None]):
        self.finish = finish  # ends a sequence in the scheduler (frees its blocks) and forgets its sampler state
        self.groups: dict[str, RequestGroup] = {}
        self.child_of: dict[str, tuple[RequestGroup, int]] = {}

    def add(self, group: RequestGroup) -> None:
        group.logprob_cursor = [0] * len(group.children)
        group.token_cursor = [0] * len(group.children)
        self.groups[group.request_id] = group
        for i, req in enumerate(group.children):
            self.child_of[req.request_id] = (group, i)

    def group_of(self, req: Request) -> tuple[RequestGroup, int]:
        return self.child_of[req.request_id]

    # ---- tokens --------------------------------------------------------------------------------
    def append(self, req: Request, tokens: list[int], logprobs: list[dict[int, float] | None],
               now: float) -> int:
        """Apply a step's new tokens to one sequence, in order, stopping at the first stop condition.
        Returns how many were applied."""
        group, idx = self.child_of[req.request_id]
        applied = 0
        for tok, lp in zip(tokens, logprobs):
            req.output_token_ids.append(tok)
            applied += 1
            if lp is not None:
                req.logprobs.append(lp)
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
                self.finish(req, status)
                break
        return applied

    def fail(self, req: Request, error: str) -> None:
        req.error = error
        self.finish(req, RequestStatus.FINISHED_ERROR)

    def mark(self, changed: dict[str, set[int]], req: Request) -> None:
        """Note that `req` has news for its group's next output (see collect)."""
        group, idx = self.child_of[req.request_id]
        changed.setdefault(group.request_id, set()).add(idx)

    # ---- outputs -------------------------------------------------------------------------------
    def collect(self, changed: dict[str, set[int]]) -> list[RequestOutput]:
        return [self.group_output(self.groups[gid], idxs) for gid, idxs in changed.items() if gid in self.groups]

    def group_output(self, group: RequestGroup, idxs: set[int]) -> RequestOutput:
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
            lp_cur, tok_cur = group.logprob_cursor[i], group.token_cursor[i]
            group.logprob_cursor[i] = len(req.logprobs)
            group.token_cursor[i] = len(req.output_token_ids)
            want_lp = req.params.logprobs is not None
            outs.append(CompletionOutput(
                index=i, text=det.text, token_ids=list(req.output_token_ids),
                delta_text=det.take_delta(fin), delta_token_ids=req.output_token_ids[tok_cur:],
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=req.logprobs if want_lp else None,
                delta_logprobs=req.logprobs[lp_cur:] if want_lp else None,
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
            spec_draft_tokens=sum(c.spec_draft_tokens for c in group.children),
            spec_accepted_tokens=sum(c.spec_accepted_tokens for c in group.children),
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
