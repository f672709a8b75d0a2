"""Verification of proposals against the target model's own decisions.

A speculating sequence's step has 1 + k sampled rows: row j holds the target's next-token logits for the sequence
extended by its first j proposals. The sampler decides a token for every row (argmax, or a sample with the
request's own settings); proposals are accepted while they equal those decisions, and the decision after the last
accepted one is kept too. For greedy requests that is the longest prefix equal to the argmax. For sampled
requests with a deterministic proposer this is rejection sampling with q = a point mass: proposal x is kept with
probability p(x) = min(1, p(x)/q(x)), and on rejection the kept token is a draw from p conditioned on ≠ x, the
normalized residual max(0, p − q); so the output distribution is the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.engine.request import Request
from inferd.sampling_params import SamplingParams


@dataclass
class ProposalView:
    """The sampler's view of verification row j: the sequence as if its first j proposals were accepted."""

    req: Request
    extra: list[int]

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.req.eos_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.req.output_token_ids + self.extra

    @property
    def all_token_ids(self) -> list[int]:
        return self.req.all_token_ids + self.extra


def sampler_rows(req: Request) -> list[Request | ProposalView]:
    """One entry per sampled row of a sequence this step: itself, then one view per proposal."""
    spec = req.spec_token_ids
    return [req, *(ProposalView(req, spec[:j]) for j in range(1, len(spec) + 1))]


def accept(proposals: list[int], decided: list[int]) -> int:
    """How many proposals equal the target's decisions, from the first; decided has len(proposals) + 1."""
    n = 0
    while n < len(proposals) and proposals[n] == decided[n]:
        n += 1
    return n
