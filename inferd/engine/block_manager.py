"""KV cache manager: a pool of fixed-size blocks, per-request block tables, reference counts and prefix caching.

Plain Python, no torch. A block's hash is (parent block's hash, its token ids), so equal hashes mean equal
prefixes. A block is registered in the prefix cache only once its tokens are computed, so a hit never reads
K/V that is still being written. Freed blocks keep their hash until reused: the free queue is the LRU order
of eviction (uncached blocks are handed out first, then the least recently freed cached ones).
"""

from __future__ import annotations

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
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order; value unused. Uncached blocks are moved to the front.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash → block id
        self.num_hashed: dict[str, int] = {}  # request id → number of its blocks already hashed
        self.hits = 0  # prefix-cache queries/hits, in tokens (as vLLM counts them)
        self.queries = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

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
        if need + reviving > len(self.free):
            return False
        for bid in computed:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            req.block_ids.append(bid)
        if computed:
            self.num_hashed[req.request_id] = len(computed)
        for _ in range(max(need, 0)):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.block_hash is not None:  # evict from the prefix cache
                if self.cached.get(block.block_hash) == bid:
                    del self.cached[block.block_hash]
                block.block_hash, block.token_ids = None, ()
            block.ref_count = 1
            req.block_ids.append(bid)
        return True

    def free_request(self, req: Request) -> None:
        # free the tail first so that, among equal blocks, prefixes stay cached longest
        for bid in reversed(req.block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed twice"
            if block.ref_count == 0:
                self.free[bid] = None
                if block.block_hash is None:
                    self.free.move_to_end(bid, last=False)
        req.block_ids = []
        self.num_hashed.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self.cached.clear()
