"""Which replica gets a request: the one policy function used by both the Ray Serve ingress and `inferd simulate`.

A request is described to the router by its *prefix hashes*: a chain of hashes over leading chunks of its prompt
(`prefix_hashes`, each one covering everything before it), so two prompts that share their first k chunks share their
first k hashes. The router only needs each replica's load (ongoing requests: queued + running) and its own memory of
which replica last received each prefix hash.

Policies:
- ``round-robin``: replicas in turn.
- ``least-loaded``: power of two choices (two distinct random replicas, the less loaded; all replicas when ≤ 2).
- ``prefix``: the replica that last received the request's *deepest* known prefix hash (its prefix cache holds the
  longest match), unless that replica is overloaded: more than ``imbalance_abs`` ongoing requests above the
  power-of-two choice *and* more than ``imbalance_rel`` times it. Then (or when no prefix is known) the power-of-two
  choice. Every hash of the request is then remembered as living on the chosen replica (LRU-bounded memory), so a
  popular system prompt spreads over more replicas as load grows while multi-turn chats stay where their history is.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POLICIES = ("prefix", "round-robin", "least-loaded")


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "prefix"
    imbalance_abs: int = 8  # ongoing requests above the least-loaded choice before the prefix target is skipped
    imbalance_rel: float = 1.5  # ... and this many times its load
    max_prefixes: int = 200_000  # remembered prefix hashes (LRU)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.imbalance_abs < 0 or self.imbalance_rel < 1.0:
            raise ValueError("the imbalance bound needs imbalance_abs >= 0 and imbalance_rel >= 1")


class Router:
    """Stateful router. `loads` is either a sequence (replicas are its indices: the simulator) or a mapping from
    replica keys to loads (the Ray ingress keys them by replica id); `choose` returns an index or a key."""

    def __init__(self, config: RouterConfig | None = None):
        self.config = config or RouterConfig()
        self._rng = random.Random(self.config.seed)
        self._next = 0
        self._owner: OrderedDict[int, int] = OrderedDict()  # prefix hash -> replica that last received it
        self.prefix_routed = 0  # decisions that followed a known prefix (for metrics)
        self.fallbacks = 0  # prefix targets skipped because they were overloaded

    def choose(self, prefix_hashes: Sequence[int], loads: Sequence[int] | Mapping[Any, int]) -> Any:
        if isinstance(loads, Mapping):
            keys: Sequence[Any] = list(loads)
            vals: Sequence[int] = [loads[k] for k in keys]
        else:
            keys, vals = range(len(loads)), loads
        n = len(vals)
        if n == 0:
            raise ValueError("no replica to route to")
        policy = self.config.policy
        if policy == "round-robin":
            self._next = (self._next + 1) % n
            return keys[self._next]
        if policy == "least-loaded":
            return keys[self._two_choices(vals)]
        choice = keys[self._two_choices(vals)]
        target = self._deepest_owner(prefix_hashes, loads)
        if target is not None:
            if self._overloaded(loads[target], loads[choice]):
                self.fallbacks += 1
            else:
                choice = target
                self.prefix_routed += 1
        self._remember(prefix_hashes, choice)
        return choice

    def forget_replica(self, replica: Hashable) -> None:
        """Drop what the router remembers about a replica (it died or was scaled away: its cache is gone)."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]

    def _two_choices(self, loads: Sequence[int]) -> int:
        n = len(loads)
        if n <= 2:
            return min(range(n), key=lambda i: (loads[i], self._rng.random()))
        a = self._rng.randrange(n)
        b = self._rng.randrange(n - 1)
        b += b >= a  # distinct from a
        return a if loads[a] <= loads[b] else b

    def _overloaded(self, target_load: int, best_load: int) -> bool:
        c = self.config
        return target_load - best_load > c.imbalance_abs and target_load > c.imbalance_rel * best_load

    def _deepest_owner(self, prefix_hashes: Sequence[int], loads: Sequence[int] | Mapping[Any, int]) -> Any:
        mapping = isinstance(loads, Mapping)
        for h in reversed(prefix_hashes):
            r = self._owner.get(h)
            if r is not None and (r in loads if mapping else 0 <= r < len(loads)):
                return r
        return None

    def _remember(self, prefix_hashes: Sequence[int], replica: Any) -> None:
        owner = self._owner
        for h in prefix_hashes:
            owner[h] = replica
            owner.move_to_end(h)
        while len(owner) > self.config.max_prefixes:
            owner.popitem(last=False)


def text_prefix_hashes(text: str, chunk_chars: int = 128, max_chunks: int = 32) -> list[int]:
    """Chained hashes of the leading `chunk_chars`-character chunks of a prompt (full chunks only, as the KV cache
    reuses full blocks only): hash k covers characters [0, (k+1)*chunk_chars). Stable across processes."""
    out: list[int] = []
    h = hashlib.blake2b(digest_size=8)
    for k in range(min(len(text) // chunk_chars, max_chunks)):
        h.update(text[k * chunk_chars:(k + 1) * chunk_chars].encode("utf-8", "surrogatepass"))
        out.append(int.from_bytes(h.copy().digest(), "little"))
    return out
