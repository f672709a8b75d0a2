"""Request: one sequence's state as it flows waiting → running → finished. Only the scheduler moves it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from inferd.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class RequestTimes:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    compute_s: float = 0.0  # this request's share of step wall time
    token_times: list[float] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first
    max_tokens: int = 16  # resolved from params and the context length
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    local_block_ids: list[int] = field(default_factory=list)  # sliding-window layers' table (hybrid KV), -1: released
    wait_for: Request | None = None  # n>1 siblings wait until the first one's prompt is cached
    stop_reason: int | str | None = None
    error: str | None = None
    times: RequestTimes = field(default_factory=RequestTimes)
    num_preemptions: int = 0
    # speculative decoding: draft tokens proposed after the last token, verified in the next step
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # filled by the engine
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    grammar: Any = None  # llguidance.LLMatcher for structured outputs, advanced with every accepted token

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building all_token_ids (a decode row's one token: no copy of the
        sequence)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions after a new token was appended (stop strings are checked upstream)."""
        n = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if n >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
