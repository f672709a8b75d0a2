"""Perplexity with a sliding window (as in Hugging Face's perplexity guide): windows of `context` tokens
advancing by `stride`; each token is scored once, by the first window that predicts it with the most context."""

from __future__ import annotations

import math

import torch

from inferd.engine.llm_engine import LLMEngine, prompt_logits


def perplexity(engine: LLMEngine, ids: list[int], context: int = 512, stride: int = 256) -> tuple[float, int]:
    """Returns (perplexity, number of scored tokens)."""
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    if not 0 < stride <= context:
        raise ValueError("stride must be between 1 and context")
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        logits = prompt_logits(engine, window).float()  # (w, V)
        lp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(window[1:])
        token_lp = lp.gather(1, targets.unsqueeze(1)).squeeze(1)  # log p(window[i+1] | window[:i+1])
        first_new = max(prev_end - begin, 0)  # targets already scored by the previous window are skipped
        scored = token_lp[max(first_new - 1, 0):] if begin else token_lp
        nll -= float(scored.sum())
        count += scored.numel()
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count
