"""Token masks for the constrained rows of a batch: llguidance fills one bit per token, numpy turns the
inverted bits into a banned-token map and writes -inf into those rows in place, single-threaded (one pass per
row, no torch parallel region to synchronise). Rows without a grammar are never touched."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

PARALLEL_FROM = 64  # constrained rows from which llguidance's thread pool computes the masks (its idle threads spin, stealing a small host's cores from the forward)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[tuple[int, Any]], executor: Any) -> float:
    """logits: (B, V) float32 on the CPU, changed in place; matchers: (row, llguidance.LLMatcher).
    Returns the seconds spent."""
    from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

    t0 = time.perf_counter()
    B, V = logits.shape
    bitmask = torch.full((len(matchers), (V + 31) // 32), -1, dtype=torch.int32)  # (G, ceil(V/32)), bit = allowed
    if len(matchers) >= PARALLEL_FROM:
        fill_next_token_bitmask_par(executor, [(m, j) for j, (_, m) in enumerate(matchers)], bitmask)
    else:  # a few rows: in this thread (a hand-off to the executor's threads costs more than it saves)
        for j, (_, m) in enumerate(matchers):
            fill_next_token_bitmask(m, bitmask, j)
    banned = np.unpackbits(np.invert(bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")  # (G, 32*words)
    banned = banned[:, :V].view(np.bool_)
    ln = logits.numpy()
    rows = [r for r, _ in matchers]
    if rows == list(range(B)):  # every row constrained: one pass
        np.copyto(ln, -np.inf, where=banned)
    else:
        for j, r in enumerate(rows):
            np.copyto(ln[r], -np.inf, where=banned[j])
    return time.perf_counter() - t0
