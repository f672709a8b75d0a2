"""KV cache for models that mix full-attention and sliding-window layers (Gemma 3, Mistral): two block pools.

Full-attention layers keep every block of a sequence (`Request.block_ids`, as for any model). Sliding-window layers
have their own, smaller pool and table (`Request.local_block_ids`): blocks wholly before every future query's
window are released as the sequence advances, so a long sequence holds about (window + chunk) / block_size blocks
there. A model whose layers are all windowed (Mistral) keeps the full group as pure bookkeeping: its layers are
zero, so its blocks cost no memory.

Prefix caching stays exact: a hit of M blocks is taken only when the full group has all M and the window group
still has the blocks that the next query's window reaches (released blocks keep their hash until reused, so they
can be revived); otherwise the hit shrinks to the longest M for which both hold.

The scheduler sees the interface of one KVCacheManager; an allocation succeeds in both pools or changes neither.
"""

from __future__ import annotations

from inferd.engine.block_manager import KVCacheManager
from inferd.engine.request import Request


def window_blocks_per_sequence(window: int, max_chunk: int, block_size: int) -> int:
    """The most window-pool blocks one sequence holds during a step: those its queries' windows reach, plus the
    chunk being written (a chunk at [C, C + n) sees keys from C - window + 1 up to C + n - 1)."""
    return -(-(window - 1 + max_chunk) // block_size) + 1


class HybridKVCacheManager:
    def __init__(self, full_blocks: int, window_blocks: int, block_size: int, window: int,
                 enable_prefix_caching: bool = True, grow_before_evict: bool = True):
        self.full = KVCacheManager(full_blocks, block_size, enable_prefix_caching, grow_before_evict)
        self.local = KVCacheManager(window_blocks, block_size, enable_prefix_caching, grow_before_evict,
                                    window=window, table="local_block_ids")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hits: dict[str, tuple[list[int], int | None]] = {}  # request id → window-pool hits, last hash

    # the full group answers capacity questions (it holds the most blocks per sequence)
    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def usage(self) -> float:
        return max(self.full.usage, self.local.usage)

    @property
    def hits(self) -> int:
        return self.full.hits

    @property
    def queries(self) -> int:
        return self.full.queries

    def get_computed_blocks(self, req: Request) -> list[int]:
        chain = self.full.prefix_chain(req)
        full_hits: list[int] = []
        for h, chunk in chain:
            bid = self.full.lookup(h, chunk)
            if bid is None:
                break
            full_hits.append(bid)
        m = len(full_hits)
        while m > 0:  # the longest hit whose next query's window blocks are all still in the window pool
            first = self.local.first_needed_block(m * self.block_size)
            local = [self.local.lookup(*chain[i]) for i in range(first, m)]
            if all(b is not None for b in local):
                self._hits[req.request_id] = ([-1] * first + local, chain[m - 1][0])  # type: ignore[list-item]
                break
            m -= 1
        if self.enable_prefix_caching and req.params.prompt_logprobs is None:
            self.full.count_query(len(req.all_token_ids), m)
        return full_hits[:m]

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        computed = computed or []
        local_hits, last_hash = self._hits.pop(req.request_id, ([], None)) if computed else ([], None)
        assert len(local_hits) == len(computed), "allocate_slots(computed) follows get_computed_blocks"
        self.local.release_out_of_window(req)
        if not (self.full.can_allocate(req, num_new_tokens, computed)
                and self.local.can_allocate(req, num_new_tokens, local_hits)):
            return False
        self.full.commit(req, num_new_tokens, computed, last_hash)
        self.local.commit(req, num_new_tokens, local_hits, last_hash)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        self.full.cache_full_blocks(req)
        self.local.cache_full_blocks(req)

    def free_request(self, req: Request) -> None:
        self.full.free_request(req)
        self.local.free_request(req)
        self._hits.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        self.full.reset_prefix_cache()
        self.local.reset_prefix_cache()
