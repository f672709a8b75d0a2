"""How many KV blocks a model gets from a memory budget, per group of layers.

Without sliding-window layers every layer holds every block of a sequence: one pool. With them (Gemma 3, Mistral)
the KV cache is hybrid (engine/hybrid_kv.py): the window layers' pool needs at most
`window_blocks_per_sequence` blocks per running sequence, so it is sized to that (or to the full pool's size when
the budget is smaller) and the rest of the budget goes to the full-attention layers, which is what lets long
sequences fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.engine.block_manager import KVCacheManager
from inferd.engine.hybrid_kv import HybridKVCacheManager, window_blocks_per_sequence
from inferd.errors import InvalidRequestError
from inferd.models.registry import LoadedModel

# memory profile → default KV budget (share of free memory, cap in GiB) when --kv-cache-memory is not given
KV_DEFAULTS = {"small": (0.25, 0.5), "balanced": (0.25, 2.0), "fast": (0.5, 4.0)}


def layer_block_bytes(lm: LoadedModel, block_size: int) -> int:
    """K and V of one block in one layer."""
    c = lm.config
    return 2 * block_size * c.num_kv_heads * c.head_dim * lm.dtype.itemsize


@dataclass
class KVPlan:
    block_size: int
    num_blocks: int  # the full-attention pool (every layer's when the model has no sliding window)
    full_layers: int
    layer_bytes: int  # one block of one layer
    window: int | None = None  # the largest sliding window (None: no window pool)
    window_blocks: int = 0
    window_layers: int = 0

    @property
    def full_block_bytes(self) -> int:
        return self.full_layers * self.layer_bytes

    @property
    def window_block_bytes(self) -> int:
        return self.window_layers * self.layer_bytes

    @property
    def max_bytes(self) -> int:
        return self.num_blocks * self.full_block_bytes + self.window_blocks * self.window_block_bytes

    def make_manager(self, enable_prefix_caching: bool, grow_before_evict: bool
                     ) -> KVCacheManager | HybridKVCacheManager:
        if self.window is None:
            return KVCacheManager(self.num_blocks, self.block_size, enable_prefix_caching, grow_before_evict)
        return HybridKVCacheManager(self.num_blocks, self.window_blocks, self.block_size, self.window,
                                    enable_prefix_caching, grow_before_evict)

    def bytes_of(self, kv: KVCacheManager | HybridKVCacheManager, what: str) -> int:
        """KV bytes of the blocks `used` now or `touched` so far (resident: the pool's pages are backed as
        written)."""
        def blocks(m: KVCacheManager) -> int:
            return m.num_used_blocks if what == "used" else m.high_water

        if isinstance(kv, HybridKVCacheManager):
            return blocks(kv.full) * self.full_block_bytes + blocks(kv.local) * self.window_block_bytes
        return blocks(kv) * self.full_block_bytes


def kv_budget_bytes(budget_gib: float | None, available: int, profile: str) -> int:
    share, cap = KV_DEFAULTS[profile]
    return int(budget_gib * (1 << 30)) if budget_gib is not None else min(int(available * share), int(cap * (1 << 30)))


def plan_kv(lm: LoadedModel, block_size: int, budget_gib: float | None, available: int, profile: str = "balanced",
            max_num_seqs: int = 64, max_chunk: int = 256, hybrid: bool = True) -> KVPlan:
    c = lm.config
    budget = kv_budget_bytes(budget_gib, available, profile)
    per_layer = layer_block_bytes(lm, block_size)
    need = -(-lm.max_model_len // block_size)  # blocks of one sequence of max_model_len
    windows = [w for w in (c.layer_windows or ()) if w is not None]
    if hybrid and windows and max(windows) < lm.max_model_len:
        window = max(windows)
        n_win = len(windows)
        n_full = c.num_layers - n_win
        per_seq = window_blocks_per_sequence(window, max_chunk, block_size)
        cap = max_num_seqs * per_seq
        if n_full == 0:  # every layer windowed: the full pool is bookkeeping only (no layer stores into it)
            win = min(cap, budget // (n_win * per_layer))
            full = max_num_seqs * need
        elif budget // (c.num_layers * per_layer) <= cap:  # small budget: both pools the same size
            full = win = budget // (c.num_layers * per_layer)
        else:
            win = cap
            full = (budget - cap * n_win * per_layer) // (n_full * per_layer)
        if win < per_seq or full < need:
            raise InvalidRequestError(
                f"KV cache of {budget / (1 << 30):.2f} GiB is too small for one sequence of "
                f"max_model_len={lm.max_model_len} ({need} blocks in the {n_full} full-attention layers and {per_seq} "
                f"in the {n_win} sliding-window layers); raise --kv-cache-memory or lower --max-model-len",
                param="kv_cache_memory")
        return KVPlan(block_size, int(full), n_full, per_layer, window, int(win), n_win)
    num_blocks = budget // (c.num_layers * per_layer)
    if num_blocks < need:
        raise InvalidRequestError(
            f"KV cache of {budget / (1 << 30):.2f} GiB holds {num_blocks * block_size} tokens, less than one "
            f"sequence of max_model_len={lm.max_model_len} ({need * c.num_layers * per_layer / (1 << 30):.2f} GiB); "
            "raise --kv-cache-memory or lower --max-model-len",
            param="kv_cache_memory",
        )
    return KVPlan(block_size, int(num_blocks), c.num_layers, per_layer)
