"""Sampler: logits → next tokens for a whole batch at once, plus logprobs.

Order (as vLLM): penalties on raw logits → logit_bias added → logprobs taken from the penalised logits → temperature →
top-k → top-p → min-p → sample. Greedy rows take the argmax. Sampling uses the exponential race
(argmax of p / E, E ~ Exp(1)), so each seeded request draws its noise from its own generator and gets the
same tokens whatever else is in the batch. A row stands for a sequence state: the engine passes views of a
speculating sequence with its proposals appended (anything with params, request_id, eos_token_ids,
output_token_ids and all_token_ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from inferd.engine.request import Request
from inferd.ops import cpu_kernels
from inferd.structured.masks import apply_grammar_masks


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: chosen token + top alternatives, when asked


class Sampler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.generators: dict[str, torch.Generator] = {}
        self.structured: Any = None  # the engine's GrammarCompiler, once a constrained request arrived

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator | None:
        """A seeded request's noise for its next token is keyed by (seed, output position), not drawn from a
        running stream: the same seed gives the same tokens whatever the batch, and whether or not the token was
        reached through a verified speculative run (which samples several positions in one step)."""
        if req.params.seed is None:
            return None
        g = self.generators.get(req.request_id)
        if g is None:
            g = self.generators[req.request_id] = torch.Generator()
        pos = len(req.output_token_ids)
        return g.manual_seed((req.params.seed * 0x9E3779B97F4A7C15 + pos * 0xBF58476D1CE4E5B9) & (2**63 - 1))

    @staticmethod
    def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(reqs) if r.params.presence_penalty or r.params.frequency_penalty
                or r.params.repetition_penalty != 1.0]
        if not rows:
            return logits
        V = logits.shape[1]
        for i in rows:  # few rows use penalties; each is a handful of vector ops
            p = reqs[i].params
            out_ids = torch.tensor(reqs[i].output_token_ids, dtype=torch.long)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool)
                seen[torch.tensor(reqs[i].all_token_ids, dtype=torch.long)] = True
                row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty,
                                                    row * p.repetition_penalty), row)
            if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(out_ids, minlength=V)[:V].to(row.dtype)
                row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
            logits[i] = row
        return logits

    @staticmethod
    def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Add each request's OpenAI-style logit_bias ({token id: value}) to its row; ids past the vocabulary
        were refused at the edge, and are skipped here."""
        V = logits.shape[1]
        for i, r in enumerate(reqs):
            bias = r.params.logit_bias
            if not bias:
                continue
            ids = [t for t in bias if t < V]
            if ids:
                logits[i, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype)
        return logits

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits: (B, V) float32, one row per request in `reqs`."""
        B = logits.shape[0]
        params = [r.params for r in reqs]
        if self.structured is not None:  # grammar masks first, on the constrained rows only
            constrained = [(i, g) for i, r in enumerate(reqs) if (g := getattr(r, "grammar", None)) is not None]
            if constrained:
                logits = logits[:, : self.vocab_size]
                dt = apply_grammar_masks(logits, constrained, self.structured.executor)
                with self.structured.stats.lock:
                    self.structured.stats.mask_s.append(dt)
                    self.structured.stats.mask_rows += len(constrained)
        if all(p.greedy and p.logprobs is None and not p.min_tokens and p.repetition_penalty == 1.0
               and not p.presence_penalty and not p.frequency_penalty and not p.logit_bias for p in params):
            # fast path (the common serving case): one argmax over the batch, no copies
            view = logits[:, : self.vocab_size]
            best = cpu_kernels.argmax_rows(view)  # torch's argmax exactly, one C call (ops/csrc/argmax_rows.c)
            return SamplerOutput((view.argmax(dim=-1) if best is None else best).tolist(), [None] * B)
        # the steps below change rows in place: the engine hands over logits no one reads after this (its gathered
        # rows, or all of a step's logits), but an inference-mode tensor cannot be changed outside inference mode
        logits = logits[:, : self.vocab_size]
        if torch.is_inference(logits) and not torch.is_inference_mode_enabled():
            logits = logits.clone()
        logits = self.apply_penalties(logits, reqs)
        logits = self.apply_logit_bias(logits, reqs)
        for i, r in enumerate(reqs):  # min_tokens: EOS and stop tokens are banned until reached
            if len(r.output_token_ids) < r.params.min_tokens:
                eos = () if r.params.ignore_eos else r.eos_token_ids
                banned = [t for t in (*eos, *r.params.stop_token_ids) if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")
        want_lp = [p.logprobs for p in params]
        logprobs_full = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None

        greedy = torch.tensor([p.greedy for p in params])
        token_ids = torch.empty(B, dtype=torch.long)
        if greedy.any():
            token_ids[greedy] = logits[greedy].argmax(dim=-1)
        if not greedy.all():
            idx = (~greedy).nonzero().flatten()
            sub = logits[idx]
            temps = torch.tensor([params[i].temperature for i in idx.tolist()]).unsqueeze(1)
            sub = sub / temps
            top_k = torch.tensor([params[i].top_k for i in idx.tolist()])
            top_p = torch.tensor([params[i].top_p for i in idx.tolist()])
            min_p = torch.tensor([params[i].min_p for i in idx.tolist()])
            if (top_k > 0).any() or (top_p < 1).any():
                sorted_logits, order = sub.sort(dim=-1, descending=True)
                ranks = torch.arange(sub.shape[1]).unsqueeze(0)
                drop = (top_k.unsqueeze(1) > 0) & (ranks >= top_k.unsqueeze(1))
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                probs = sorted_logits.softmax(dim=-1)
                cum = probs.cumsum(dim=-1) - probs  # mass before this token
                sorted_logits = sorted_logits.masked_fill(cum >= top_p.unsqueeze(1), float("-inf"))
                sub = torch.full_like(sub, float("-inf")).scatter_(1, order, sorted_logits)
            probs = sub.softmax(dim=-1)
            if (min_p > 0).any():
                thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
                probs = probs.masked_fill(probs < thresh, 0.0)
            noise = torch.empty_like(probs)
            for j, i in enumerate(idx.tolist()):
                g = self._generator(reqs[i])
                noise[j].exponential_(generator=g)
            token_ids[idx] = (probs / noise).argmax(dim=-1)

        ids = token_ids.tolist()
        lps: list[dict[int, float] | None] = [None] * B
        if logprobs_full is not None:
            for i, k in enumerate(want_lp):
                if k is None:
                    continue
                row = logprobs_full[i]
                entry = {ids[i]: row[ids[i]].item()}
                if k:
                    vals, tops = row.topk(k)
                    for t, v in zip(tops.tolist(), vals.tolist()):
                        entry.setdefault(t, v)
                lps[i] = entry
        return SamplerOutput(ids, lps)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[dict[int, float]]:
    """logits: (n, V) at prompt positions p; next_ids: the tokens at p+1. One dict per position."""
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(next_ids, dtype=torch.long)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    out = [{t: v} for t, v in zip(next_ids, chosen)]
    if k:
        vals, tops = lp.topk(k, dim=-1)
        for entry, ts, vs in zip(out, tops.tolist(), vals.tolist()):
            for t, v in zip(ts, vs):
                entry.setdefault(t, v)
    return out
