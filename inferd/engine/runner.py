"""ModelRunner: a scheduled step → flat tensors → one forward → logits of the rows that need them.

Owns the paged KV cache tensors (one (2, num_blocks, block_size, Hkv, D) tensor per layer). On the CPU the pool
is one anonymous mmap: its pages are zero and take no memory until first written, so with the block manager
handing out low block ids first, resident KV memory follows the blocks actually used, up to the pool size.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

from inferd.engine.cuda_graphs import DecodeGraphs
from inferd.engine.request import Request
from inferd.engine.scheduler import SchedulerOutput
from inferd.models.registry import LoadedModel
from inferd.ops.attention import AttnMetadata, PrefillChunk, plan_prefill_kernel
from inferd.ops.kernels import get_kernels


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool = False) -> torch.Tensor:
    """A zero CPU tensor whose pages are backed by memory only when first written (an anonymous mmap).

    huge_pages: ask for 2 MiB transparent huge pages (fewer TLB misses when many sequences' KV is read each
    step) at the price of backing memory 2 MiB at a time; False forbids them, so backing follows use by 4 KiB."""
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        try:
            buf.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: its pages are small anyway
            pass
    # the tensor keeps `buf` alive (frombuffer holds a reference to the exporting object)
    return torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).view(shape)


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device, huge_pages: bool = False) -> list[torch.Tensor]:
    """One (2, blocks, block_size, Hkv, D) tensor per layer. CPU: views of one lazily backed pool."""
    if num_layers == 0:
        return []
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    return list(lazy_zeros((num_layers, *shape), dtype, huge_pages).unbind(0))


def decode_table(reqs: list[Request], table: str) -> torch.Tensor:
    """One block-table row per decode row (`reqs`: the sequence of each row; a verifying sequence has several
    rows), zero-padded, built from Python lists in one tensor. Released entries (-1, hybrid KV) read as block 0:
    they lie before every row's window and are never read."""
    tables = [getattr(r, table) for r in reqs]
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).clamp_(min=0)


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttnMetadata
    logit_rows: torch.Tensor  # (R,) rows of the flat batch whose logits are needed, strictly increasing
    sample_rows: list[int]  # per request: index into logit_rows of its first sampled row, or -1
    num_sample_rows: list[int]  # per request: rows sampled (1, or 1 + its proposals when speculating)
    prompt_lp_rows: dict[str, tuple[int, int, int]]  # request id → (first logit row, count, first position)


class ModelRunner:
    def __init__(self, lm: LoadedModel, num_blocks: int, block_size: int, cuda_graphs: bool = False,
                 max_num_seqs: int = 64, kv_huge_pages: bool = False, window_blocks: int = 0):
        """window_blocks > 0: a hybrid KV cache (engine/hybrid_kv.py): the sliding-window layers get a pool of
        that many blocks, addressed through `Request.local_block_ids`."""
        self.lm = lm
        self.block_size = block_size
        self.window_blocks = window_blocks
        c = lm.config
        # the C attention's limits (exported by the library); anything larger uses the torch path
        self.use_c_kernel = lm.device.type == "cpu" and get_kernels().attention_fits(c.num_heads, c.head_dim,
                                                                                      block_size)
        # sliding-window layers plan their window per step on the host: no CUDA graph replay for those models
        use_graphs = cuda_graphs and lm.device.type == "cuda" and not c.layer_windows
        # with CUDA graphs, one more block than the KV manager hands out: the padding rows' scratch block
        shape = (2, num_blocks + use_graphs, block_size, c.num_kv_heads, c.head_dim)
        if window_blocks:
            windowed = [c.window(i) is not None for i in range(c.num_layers)]
            full = iter(allocate_kv_caches(windowed.count(False), shape, lm.dtype, lm.device, kv_huge_pages))
            local = iter(allocate_kv_caches(windowed.count(True), (2, window_blocks, *shape[2:]), lm.dtype, lm.device,
                                            kv_huge_pages))
            self.kv_caches = [next(local) if w else next(full) for w in windowed]
        else:
            self.kv_caches = allocate_kv_caches(c.num_layers, shape, lm.dtype, lm.device, kv_huge_pages)
        self.graphs = (DecodeGraphs(lm.model, self.kv_caches, block_size, num_blocks, max_num_seqs,
                                    -(-lm.max_model_len // block_size)) if use_graphs else None)

    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        """The KV cache slot of each position in [start, end): block_ids[p // block_size] · block_size + the offset
        (Python ints: a decode row's one slot costs no tensor ops)."""
        bs = self.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sample_rows: list[int] = []
        num_sample_rows: list[int] = []
        prompt_lp_rows: dict[str, tuple[int, int, int]] = {}
        meta = AttnMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        decode_rows: list[tuple[Request, int]] = []  # (sequence, context length including the row's token)
        row = 0
        for req in out.requests:
            n = out.num_tokens[req.request_id]
            start = req.num_computed_tokens
            end = start + n
            spec = req.spec_token_ids  # proposals after the sequence's tokens (verified in this step)
            ids.extend(req.token_ids_between(start, end - len(spec)) + spec if spec else req.token_ids_between(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(req.block_ids, start, end))
            # a decode row per new token: one, or 1 + the proposals being verified (each row sees the cache up
            # to its own position, so the step needs no multi-token attention)
            is_decode = n == 1 + len(spec) and start >= req.num_prompt_tokens
            if is_decode:
                assert not meta.prefills, "the scheduler puts decodes before prefills"
                decode_rows.extend((req, start + i + 1) for i in range(n))
            else:
                mask = None
                if start > 0:  # cached prefix or earlier chunks: causal with an offset
                    mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
                blocks = torch.tensor(req.block_ids[: -(-end // self.block_size)], dtype=torch.long)
                meta.prefills.append(PrefillChunk(row, n, end, blocks, mask))
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                last = min(end, req.num_prompt_tokens - 1)  # positions whose next token is a prompt token
                prompt_lp_rows[req.request_id] = (len(logit_rows), last - start, start)
                logit_rows.extend(range(row, row + last - start))
            if end == req.num_tokens + len(spec):
                sample_rows.append(len(logit_rows))
                num_sample_rows.append(1 + len(spec))
                logit_rows.extend(range(row + n - 1 - len(spec), row + n))
            else:
                sample_rows.append(-1)
                num_sample_rows.append(0)
            row += n
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long)
        if meta.prefills and self.use_c_kernel:
            plan_prefill_kernel(meta)
        meta.num_decode = len(decode_rows)
        if decode_rows:
            dev = self.lm.device
            meta.decode_block_tables = decode_table([r for r, _ in decode_rows], "block_ids").to(dev)
            meta.decode_ctx_lens = torch.tensor([n for _, n in decode_rows], dtype=torch.int32, device=dev)
            meta.use_c_kernel = self.use_c_kernel
        if self.window_blocks:
            meta.local = self._window_meta(meta, out, [r for r, _ in decode_rows])
        dev = self.lm.device
        if dev.type != "cpu":
            for m in (meta, meta.local) if meta.local is not None else (meta,):
                m.slot_mapping = m.slot_mapping.to(dev, non_blocking=True)
                for p in m.prefills:
                    p.blocks = p.blocks.to(dev, non_blocking=True)
                    p.mask = None if p.mask is None else p.mask.to(dev, non_blocking=True)
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            meta=meta,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            sample_rows=sample_rows,
            num_sample_rows=num_sample_rows,
            prompt_lp_rows=prompt_lp_rows,
        )

    def _window_meta(self, meta: AttnMetadata, out: SchedulerOutput, decode_reqs: list[Request]) -> AttnMetadata:
        """The sliding-window layers' view of the step: the same rows, addressed through `local_block_ids` (entries
        before the window are released, -1; they are never read, so tables show them as block 0). `decode_reqs`:
        the sequence of each decode row (a verifying sequence has several)."""
        bs = self.block_size
        slots: list[int] = []
        tables = []
        for req in out.requests:
            start = req.num_computed_tokens
            slots.extend(self._slots(req.local_block_ids, start, start + out.num_tokens[req.request_id]))
            tables.append(torch.tensor(req.local_block_ids, dtype=torch.long).clamp(min=0))
        local = AttnMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long),
                             num_decode=meta.num_decode, decode_ctx_lens=meta.decode_ctx_lens,
                             use_c_kernel=meta.use_c_kernel)
        by_id = dict(zip((r.request_id for r in out.requests), tables))
        if decode_reqs:
            local.decode_block_tables = decode_table(decode_reqs, "local_block_ids").to(self.lm.device)
        decoding = {r.request_id for r in decode_reqs}
        prefill_reqs = [r for r in out.requests if r.request_id not in decoding]
        for p, r in zip(meta.prefills, prefill_reqs):
            local.prefills.append(PrefillChunk(p.q_start, p.q_len, p.ctx_len, by_id[r.request_id][: -(-p.ctx_len // bs)],
                                               p.mask))
        if local.prefills and self.use_c_kernel:
            plan_prefill_kernel(local)
        return local

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Returns float32 logits (R, V) for batch.logit_rows."""
        meta = batch.meta
        if self.graphs is not None and meta.num_decode == len(batch.sample_rows) and not meta.prefills \
                and not batch.prompt_lp_rows:  # pure decode: every row is sampled, in order
            logits = self.graphs.run(batch.input_ids, batch.positions, meta)
            if logits is not None:
                return logits.cpu()
        hidden = self.lm.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        rows = batch.logit_rows  # strictly increasing: as many as the batch's rows is every row, in order
        return self.lm.model.compute_logits(hidden if rows.shape[0] == hidden.shape[0] else hidden[rows]).cpu()
