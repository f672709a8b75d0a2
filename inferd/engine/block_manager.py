"""KV cache manager: a pool of fixed-size blocks, per-request block tables, reference counts and prefix caching.

Plain Python, no torch. A block's hash is (parent block's hash, its token ids), so equal hashes mean equal
prefixes. A block is registered in the prefix cache only once its tokens are computed, so a hit never reads
K/V that is still being written. Freed blocks keep their hash until reused, in an LRU queue of eviction.

Memory: the runner's KV pool is backed by pages only once written, so the block ids handed out decide the
resident size. Uncached free blocks come from a min-heap (lowest id first), so the touched part of the pool
(`high_water` blocks) tracks the peak number of blocks held, not the pool size. When the only uncached free
blocks are untouched ones, `grow_before_evict` decides: True keeps cached prefixes and touches new memory
(more prefix hits), False evicts the least recently used cached block first (less memory).

Sliding-window layers (Mistral, Gemma 3's local layers) need only the last `window` tokens' K/V. A manager made
with `window` keeps its own table per request (`table`, e.g. `local_block_ids`) and releases the blocks that lie
wholly before every future query's window (entry -1 in the table; a released block keeps its hash, so a later
prefix hit can still revive it): a sequence holds about (window + chunk) / block_size blocks there however long it
grows. HybridKVCacheManager (engine/hybrid_kv.py) pairs one with the full-attention layers' manager.
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
                 grow_before_evict: bool = True, window: int | None = None, table: str = "block_ids"):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.window = window  # sliding window of the layers this pool serves (None: they see the whole context)
        self.table = table  # the Request attribute holding this pool's block table
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.grow_before_evict = grow_before_evict
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks))  # min-heap of free blocks without a hash
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self.high_water = 0  # blocks 0 .. high_water-1 have been handed out at least once (their pages touched)
        self.cached: dict[int, int] = {}  # block hash → block id
        # request id → (number of its blocks already hashed, the last one's hash)
        self.hashed: dict[str, tuple[int, int | None]] = {}
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
    def prefix_chain(self, req: Request) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of each full block of the request's tokens that a prefix hit may cover (at least one
        token is always left to compute, so the last position's logits exist)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        tokens = req.all_token_ids
        chain, parent = [], None
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            parent = block_hash(parent, chunk)
            chain.append((parent, chunk))
        return chain

    def lookup(self, h: int, chunk: tuple[int, ...]) -> int | None:
        bid = self.cached.get(h)
        return bid if bid is not None and self.blocks[bid].token_ids == chunk else None

    def count_query(self, num_tokens: int, hit_blocks: int) -> None:
        self.queries += num_tokens
        self.hits += hit_blocks * self.block_size

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks of the longest computed prefix of the request's tokens."""
        hits: list[int] = []
        for h, chunk in self.prefix_chain(req):
            bid = self.lookup(h, chunk)
            if bid is None:
                break
            hits.append(bid)
        if self.enable_prefix_caching and req.params.prompt_logprobs is None:
            self.count_query(len(req.all_token_ids), len(hits))
        return hits

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly filled blocks (called after its tokens are computed)."""
        if not self.enable_prefix_caching:
            return
        tokens, ids = req.all_token_ids, getattr(req, self.table)
        n_full = min(req.num_computed_tokens // self.block_size, len(ids))
        start, parent = self.hashed.get(req.request_id, (0, None))
        for i in range(start, n_full):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, chunk)
            block = self.blocks[ids[i]] if ids[i] >= 0 else None  # -1: released, hashed before it was
            if block is not None and block.block_hash is None:
                block.block_hash, block.token_ids = h, chunk
                self.cached.setdefault(h, block.block_id)
            parent = h if block is None else block.block_hash
        if n_full > start:
            self.hashed[req.request_id] = (n_full, parent)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[int] | None = None,
                       computed_hash: int | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens; `computed` are prefix-cache hits for a new request (-1:
        a block a sliding window no longer needs), `computed_hash` the hash of the last one. Returns False (and
        changes nothing but releasing out-of-window blocks) when there are not enough free blocks."""
        computed = computed or []
        self.release_out_of_window(req)
        if not self.can_allocate(req, num_new_tokens, computed):
            return False
        self.commit(req, num_new_tokens, computed, computed_hash)
        return True

    def _need(self, req: Request, num_new_tokens: int, computed: list[int]) -> tuple[int, int]:
        """(new blocks, cached free blocks revived) that the allocation takes from the free pool."""
        reviving = sum(1 for b in computed if b >= 0 and self.blocks[b].ref_count == 0)
        total = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        return max(self.blocks_needed(total) - len(getattr(req, self.table)) - len(computed), 0), reviving

    def can_allocate(self, req: Request, num_new_tokens: int, computed: list[int]) -> bool:
        return sum(self._need(req, num_new_tokens, computed)) <= self.num_free_blocks

    def commit(self, req: Request, num_new_tokens: int, computed: list[int], computed_hash: int | None) -> None:
        need, _ = self._need(req, num_new_tokens, computed)
        ids = getattr(req, self.table)
        for bid in computed:
            if bid >= 0:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    del self.free_cached[bid]
                block.ref_count += 1
            ids.append(bid)
        if computed:
            if computed_hash is None and computed[-1] >= 0:
                computed_hash = self.blocks[computed[-1]].block_hash
            self.hashed[req.request_id] = (len(computed), computed_hash)
        for _ in range(need):
            bid = self._take_free_block()
            self.blocks[bid].ref_count = 1
            ids.append(bid)

    def first_needed_block(self, num_computed: int) -> int:
        """The first block a query at position >= num_computed can see (0 without a window)."""
        return 0 if self.window is None else max(num_computed - self.window + 1, 0) // self.block_size

    def release_out_of_window(self, req: Request) -> None:
        """Sliding window: give back the blocks wholly before every future query's window (table entry -1)."""
        if self.window is None:
            return
        ids = getattr(req, self.table)
        for i in range(min(self.first_needed_block(req.num_computed_tokens), len(ids))):
            if ids[i] >= 0:
                self._release(ids[i])
                ids[i] = -1

    def _release(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {bid} freed twice"
        if block.ref_count == 0:
            if block.block_hash is None:
                heapq.heappush(self.free_uncached, bid)
            else:
                self.free_cached[bid] = None

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
        ids = getattr(req, self.table)
        for bid in reversed(ids):
            if bid >= 0:
                self._release(bid)
        setattr(req, self.table, [])
        self.hashed.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self.cached.clear()
        for bid in self.free_cached:
            heapq.heappush(self.free_uncached, bid)
        self.free_cached.clear()
