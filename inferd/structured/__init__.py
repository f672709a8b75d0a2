"""Structured outputs: JSON schema, regex, choice and grammar constraints compiled by llguidance
(compile cache off the engine thread; masks applied by the sampler for constrained rows only)."""

from inferd.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
