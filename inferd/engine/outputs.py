"""What the engine hands back: per-request outputs with text deltas, logprobs, timings and cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    queue_s: float = 0.0  # arrival → first scheduled
    ttft_s: float | None = None  # arrival → first token
    tpot_s: float | None = None  # mean time per output token after the first
    e2e_s: float | None = None
    compute_s: float = 0.0  # share of step wall time spent on this request
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps before the tokens delivered in this output
    spec_draft_tokens: int = 0  # speculative decoding: tokens proposed for this request ...
    spec_accepted_tokens: int = 0  # ... and how many of them the target model accepted


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    delta_logprobs: list[dict[int, float]] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
