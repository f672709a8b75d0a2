"""Speculative decoding: proposers (prompt lookup, a draft model) and the policy that decides how many tokens to propose.

Verification lives in the engine step: a speculating sequence's last token and its k proposals are k+1 query rows
of the step, the sampler decides a token for every row, and the longest prefix of proposals equal to those
decisions is accepted, plus the decision after it (see LLMEngine._verify).
"""

from inferd.engine.spec_decode.draft import DraftModelProposer
from inferd.engine.spec_decode.ngram import NgramProposer
from inferd.engine.spec_decode.policy import SpecPolicy

__all__ = ["DraftModelProposer", "NgramProposer", "SpecPolicy"]
