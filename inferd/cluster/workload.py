"""Synthetic chat traffic with realistic prefix sharing, for the cluster simulator.

Conversations start as a Poisson process (or a bursty one: gamma inter-arrival times with a coefficient of variation
`burst_cv` > 1); each picks one of `system_prompts` shared system prompts (Zipf popularity) and runs a few turns.
Turn k's prompt is the system prompt + every earlier user message and reply + the new user message, so a later turn
shares its whole history with the previous one. The next turn arrives a think time after the previous reply ends.

Prompts are described by segments: (chain key, cumulative tokens), one per system prompt / message. The chain key
of a segment identifies the whole prompt up to its end (like the KV cache's chained block hashes), and the keys are
what the router sees as prefix hashes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_SYS, _USER, _REPLY = 1, 2, 3


@dataclass(frozen=True)
class WorkloadConfig:
    conversations_per_s: float = 10.0
    system_prompts: int = 50
    system_prompt_tokens: tuple[int, int] = (300, 1200)  # uniform range
    zipf_s: float = 1.1  # popularity of the system prompts
    mean_turns: float = 3.0  # geometric, at least 1
    max_turns: int = 8
    user_tokens: tuple[int, int] = (20, 200)
    reply_tokens: tuple[int, int] = (30, 300)
    think_s: float = 8.0  # mean (exponential) pause between a reply and the next user message
    arrival: str = "poisson"  # poisson | bursty
    burst_cv: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "bursty"):
            raise ValueError(f"unknown arrival process {self.arrival!r}; choose poisson or bursty")
        if self.conversations_per_s <= 0 or self.system_prompts < 1 or self.mean_turns < 1:
            raise ValueError("the workload needs a positive rate, at least one system prompt and mean_turns >= 1")

    @property
    def requests_per_s(self) -> float:
        return self.conversations_per_s * self.mean_turns


@dataclass
class Conversation:
    cid: int
    start_s: float
    system: int
    system_tokens: int
    turns: list[tuple[int, int]]  # (user tokens, reply tokens)
    thinks: list[float]
    next_turn: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)  # the history so far


@dataclass(slots=True)
class SimRequest:
    rid: int
    arrival: float
    segments: list[tuple[int, int]]
    prompt_tokens: int
    output_tokens: int
    reply_key: int  # chain key of the prompt + this reply (cached on the replica when it finishes)
    conv: Conversation | None = None
    replica: int = -1
    cached_tokens: int = 0
    prefill_left: int = -1  # -1: not admitted yet
    first_token_s: float = -1.0
    finish_s: float = -1.0

    @property
    def prefix_hashes(self) -> list[int]:
        return [k for k, _ in self.segments]


def conversations(cfg: WorkloadConfig, duration_s: float) -> list[Conversation]:
    """Every conversation that starts in [0, duration_s), with all its turn sizes drawn up front (seeded)."""
    rng = random.Random(cfg.seed)
    sys_tokens = [rng.randint(*cfg.system_prompt_tokens) for _ in range(cfg.system_prompts)]
    weights = [1.0 / (i + 1) ** cfg.zipf_s for i in range(cfg.system_prompts)]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    mean_gap = 1.0 / cfg.conversations_per_s
    shape = 1.0 / cfg.burst_cv ** 2
    p_more = 1.0 - 1.0 / cfg.mean_turns
    out: list[Conversation] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mean_gap) if cfg.arrival == "poisson" else rng.gammavariate(shape, mean_gap / shape)
        if t >= duration_s:
            return out
        system = _bisect(cum, rng.random() * acc)
        n = 1
        while n < cfg.max_turns and rng.random() < p_more:
            n += 1
        turns = [(rng.randint(*cfg.user_tokens), rng.randint(*cfg.reply_tokens)) for _ in range(n)]
        thinks = [rng.expovariate(1.0 / cfg.think_s) for _ in range(n)]
        out.append(Conversation(len(out), t, system, sys_tokens[system], turns, thinks))


def next_request(conv: Conversation, rid: int, arrival: float) -> SimRequest:
    """The conversation's next turn as a request (its history grows by the user message and, later, the reply)."""
    # int-only tuples: their hashes do not depend on PYTHONHASHSEED, so runs repeat across processes
    if not conv.segments:
        conv.segments = [(hash((_SYS, conv.system)), conv.system_tokens)]
    else:  # the previous reply joins the history
        key, total = conv.segments[-1]
        conv.segments.append((hash((key, _REPLY)), total + conv.turns[conv.next_turn - 1][1]))
    user, reply = conv.turns[conv.next_turn]
    key, total = conv.segments[-1]
    conv.segments.append((hash((key, _USER, conv.cid, conv.next_turn)), total + user))
    reply_key = hash((conv.segments[-1][0], _REPLY))
    conv.next_turn += 1
    return SimRequest(rid, arrival, list(conv.segments), total + user, reply, reply_key, conv)


def _bisect(cum: list[float], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
