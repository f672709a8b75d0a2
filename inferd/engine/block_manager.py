"""KV cache manager: a pool of fixed-size blocks, per-request block tables, reference counts and prefix caching.

Plain Python, no torch. A block's hash is (parent block's hash, its token ids), so equal hashes mean equal
prefixes. A block is registered in the prefix cache only once its tokens are computed, so a hit never reads
K/V that is still being written. Freed blocks keep their hash until reused, in an LRU queue of eviction.

Memory: the runner's KV pool is backed by pages only once written, so the block ids handed out decide the
resident size. Uncached free blocks come from a min-heap (lowest id first), so the touched part of the pool
(`high_water` blocks) tracks the peak number of blocks held, not the pool size. When the only uncached free
blocks are untouched ones, `grow_before_evict` decides: True keeps cached prefixes and touches new memory
(more prefix hits), False evicts the least recently used cached block first (less memory).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from inferd.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 grow_before_evict: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.grow_before_evict = grow_before_evict
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks))  # min-heap of free blocks without a hash
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self.high_water = 0  # blocks 0 .. high_water-1 have been handed out at least once (their pages touched)
        self.cached: dict[int, int] = {}  # block hash → block id
        self.num_hashed: dict[str, int] = {}  # request id → number of its blocks already hashed
        self.hits = 0  # prefix-cache queries/hits, in tokens (as vLLM counts them)
        self.queries = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks of the longest computed prefix of the request's tokens (at least one token is
        always left to compute, so the last position's logits exist)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        tokens = req.all_token_ids
        max_full = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_full):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, chunk)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
            parent = h
        self.queries += len(tokens)
        self.hits += len(hits) * self.block_size
        return hits

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks (called after its tokens are computed)."""
        if not self.enable_prefix_caching:
            return
        tokens = req.all_token_ids
        n_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        start = self.num_hashed.get(req.request_id, 0)
        parent = self.blocks[req.block_ids[start - 1]].block_hash if start else None
        for i in range(start, n_full):
            block = self.blocks[req.block_ids[i]]
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            if block.block_hash is None:
                h = block_hash(parent, chunk)
                block.block_hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.block_id)
            parent = block.block_hash
        self.num_hashed[req.request_id] = max(start, n_full)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens; `computed` are prefix-cache hits for a new request.
        Returns False (and changes nothing) when there are not enough free blocks."""
        computed = computed or []
        reviving = sum(1 for b in computed if self.blocks[b].ref_count == 0)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(req.block_ids) - len(computed)
        if need + reviving > self.num_free_blocks:
            return False
        for bid in computed:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_cached[bid]
            block.ref_count += 1
            req.block_ids.append(bid)
        if computed:
            self.num_hashed[req.request_id] = len(computed)
        for _ in range(max(need, 0)):
            bid = self._take_free_block()
            self.blocks[bid].ref_count = 1
            req.block_ids.append(bid)
        return True

    def _take_free_block(self) -> int:
        """The lowest uncached free block if its memory is already touched (or growing is preferred), else the
        least recently used cached one (evicted from the prefix cache)."""
        heap = self.free_uncached
        if heap and (heap[0] < self.high_water or self.grow_before_evict or not self.free_cached):
            bid = heapq.heappop(heap)
            self.high_water = max(self.high_water, bid + 1)
            return bid
        bid, _ = self.free_cached.popitem(last=False)
        block = self.blocks[bid]
        if self.cached.get(block.block_hash) == bid:  # type: ignore[arg-type]
            del self.cached[block.block_hash]  # type: ignore[arg-type]
        block.block_hash, block.token_ids = None, ()
        return bid

    def free_request(self, req: Request) -> None:
        # free the tail first so that, among equal blocks, prefixes stay cached longest
        for bid in reversed(req.block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                if block.block_hash is None:
                    heapq.heappush(self.free_uncached, bid)
                else:
                    self.free_cached[bid] = None
        req.block_ids = []
        self.num_hashed.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self.cached.clear()
        for bid in self.free_cached:
            heapq.heappush(self.free_uncached, bid)
        self.free_cached.clear()
