"""CUDA graphs for decode steps: a small model's decode step is ~1,400 short kernels, and launching them from
Python costs ~8x the GPU time (H100, SmolLM2-135M: 25.8 ms eager vs 3.4 ms replayed,
benchmarks/cuda_graphs_probe.py). A pure-decode step is replayed from a graph captured for its bucket:
(batch size rounded up to a bucket, block-table width rounded up to a power of two). Graphs are captured
lazily, the first time a bucket is needed, into one shared memory pool.

Padding rows of a bucket write their K/V into a scratch block that the KV cache manager never hands out,
and attend over one token of block 0; their logits are dropped.
"""

from __future__ import annotations

import torch

from inferd.ops.attention import AttnMetadata

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, scratch_block: int,
                 max_batch: int, max_blocks: int):
        dev = kv_caches[0].device
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_block * block_size
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.long, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _bucket(self, nd: int, nblk: int) -> tuple[int, int] | None:
        b = next((b for b in self.buckets if b >= nd), None)
        w = 4
        while w < nblk:
            w *= 2
        w = min(w, self.max_blocks)
        return None if b is None or nblk > w else (b, w)

    def _forward(self, b: int, w: int) -> torch.Tensor:
        meta = AttnMetadata(slot_mapping=self.slots[:b], num_decode=b, decode_block_tables=self.tables[:b, :w],
                            decode_ctx_lens=self.lens[:b])
        hidden = self.model(self.ids[:b], self.positions[:b], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits and kernel choices happen outside the capture
                self._forward(b, w)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # server threads
            out = self._forward(b, w)
        return graph, out

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor | None:
        """Logits (nd, V) of a pure-decode step, or None when no bucket fits (the caller runs it eagerly)."""
        nd = meta.num_decode
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        key = self._bucket(nd, tables.shape[1])
        if key is None:
            return None
        b, w = key
        self.ids[:nd].copy_(input_ids)
        self.positions[:nd].copy_(positions)
        self.slots[:nd].copy_(meta.slot_mapping)
        self.tables[:nd, : tables.shape[1]].copy_(tables)
        self.tables[:nd, tables.shape[1] : w].zero_()
        self.lens[:nd].copy_(lens)
        # padding rows: K/V into the scratch slot, one token of context
        self.ids[nd:b].zero_()
        self.positions[nd:b].zero_()
        self.slots[nd:b].fill_(self.scratch_slot)
        self.tables[nd:b, :w].zero_()
        self.lens[nd:b].fill_(1)
        if key not in self.graphs:
            self.graphs[key] = self._capture(b, w)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:nd]
