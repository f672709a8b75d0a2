"""Prompt-lookup (n-gram) proposals: the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (n from ngram_max down to ngram_min) in its prompt + output.

Each sequence keeps an index {n-gram: position after its latest occurrence}, updated as tokens are appended, so a
proposal costs a few dict lookups whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Index:
    synced: int = 0  # tokens of the sequence already indexed
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram → start of what followed it


class NgramProposer:
    cheap = True  # proposing costs a few dict lookups: propose first, then let the policy pick what to verify
    pass_seconds = 0.0

    def __init__(self, ngram_min: int = 2, ngram_max: int = 4):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.indexes: dict[str, _Index] = {}

    def forget(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)

    def _sync(self, request_id: str, tokens: list[int]) -> _Index:
        idx = self.indexes.get(request_id)
        if idx is None or len(tokens) < idx.synced:  # a sequence only grows; shorter means a new one
            idx = self.indexes[request_id] = _Index()
        for end in range(max(idx.synced, 1), len(tokens)):
            # every n-gram ending just before `end` now has a continuation starting at `end`
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                idx.latest[tuple(tokens[end - n : end])] = end
        idx.synced = len(tokens)
        return idx

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens predicted to follow `tokens` (the sequence so far); [] when no n-gram matches."""
        if k <= 0:
            return []
        idx = self._sync(request_id, tokens)
        L = len(tokens)
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            start = idx.latest.get(tuple(tokens[L - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []

    def propose_batch(self, wanted: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        """wanted: request id → (its tokens so far, the most to propose); sequences without a match are left out."""
        out = {}
        for rid, (tokens, k) in wanted.items():
            prop = self.propose(rid, tokens, k)
            if prop:
                out[rid] = prop
        return out
