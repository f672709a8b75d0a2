"""Attention over a paged KV cache for one flat, mixed batch.

Token layout of a step (built by the runner): first the decode tokens (one per decoding sequence), then
the prefill chunks, each contiguous. The cache of one layer is a tensor (2, num_blocks, block_size, Hkv, D);
`slot = block_id * block_size + offset` addresses one token's K/V. Reads gather whole blocks
(index_select of contiguous block_size×Hkv×D rows, ~10× faster than gathering token by token).

Sliding-window layers (Mistral, Gemma 3's local layers) pass `window`: a query at position p sees keys at
positions p - window < j <= p (transformers' convention). They run on the torch path (SDPA with a window mask over
only the blocks the window touches), in decode and in (chunked) prefill; the C kernels have no window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from inferd.ops import cpu_kernels
from inferd.ops.kernels import get_kernels


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens of context after this chunk is written (cached prefix + chunk)
    blocks: torch.Tensor  # (ceil(ctx_len / block_size),) int64 block ids of the context, in order
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, None when the chunk is the whole context (plain causal)
    by_c_kernel: bool = False  # computed by the C prefill kernel with the other small chunks of the step


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: where each new token's K/V goes
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # (Bd, nblk) int64 block tables of decoding sequences, padded
    decode_ctx_lens: torch.Tensor | None = None  # (Bd,) int32 context length of each (including the new token)
    use_c_kernel: bool = False  # decode attention by the C kernel, reading the paged cache in place
    prefills: list[PrefillChunk] = field(default_factory=list)
    # the small prefill chunks (by_c_kernel) at once for the C kernel: block tables (C, nblk) int64, q_starts,
    # q_lens, ctx_lens (C,) int32; None: one SDPA call per chunk
    prefill_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # sliding-window layers: window → (decode tables and mask, per-chunk blocks and mask), built at the first such
    # layer of a step (ops.attention._window_plan)
    window_plans: dict[int, tuple] = field(default_factory=dict)
    # a hybrid KV cache (engine/hybrid_kv.py): the sliding-window layers' own slots and block tables for this step
    local: AttnMetadata | None = None


# A chunk goes to the C prefill kernel when q_len × ctx_len is at most this. Measured per layer (SmolLM2: 9
# heads, 3 KV heads, D 64, bf16, 2 threads): 8 chunks of 47 rows after a 16-token cached prefix 0.46–0.54 ms
# vs 1.1–1.25 ms as 8 SDPA calls (SDPA's fixed cost is ~100 µs a call); one chunk of 64: equal; one of 128
# rows or one of 64 rows after 1,000 cached tokens: SDPA 1.4–2x faster (its tiles use the matrix units).
C_PREFILL_MAX_WORK = 64 * 128


def plan_prefill_kernel(meta: AttnMetadata) -> None:
    """Mark the chunks the C kernel takes and build its tables (runner side, once per step). It pays off by
    replacing several SDPA calls with one: a lone small chunk (equal speed either way) stays with SDPA."""
    small = [p for p in meta.prefills if p.q_len * p.ctx_len <= C_PREFILL_MAX_WORK]
    if len(small) < 2 or not get_kernels().prefill_attention:
        return
    nblk = max(len(p.blocks) for p in small)
    tables = torch.zeros(len(small), nblk, dtype=torch.long)
    for i, p in enumerate(small):
        tables[i, : len(p.blocks)] = p.blocks
        p.by_c_kernel = True
    cols = [torch.tensor(v, dtype=torch.int32) for v in zip(*[(p.q_start, p.q_len, p.ctx_len) for p in small])]
    meta.prefill_tables = (tables, cols[0], cols[1], cols[2])


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hkv, D) → their slots in the cache."""
    _, nb, bs, hkv, d = kv_cache.shape
    flat = kv_cache.view(2, nb * bs, hkv, d)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache: (num_blocks, bs, Hkv, D); blocks: (n,) → (n * bs, Hkv, D)."""
    nb, bs, hkv, d = cache.shape
    return cache.view(nb, bs * hkv * d).index_select(0, blocks).view(-1, hkv, d)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D) of the new tokens (already written to the cache). Returns (T, H, D).
    `window`: the layer's sliding window (None: the whole context)."""
    T, H, D = q.shape
    hkv = kv_cache.shape[3]
    group = H // hkv
    nd = meta.num_decode
    if window is not None:
        return _windowed(q, k, v, kv_cache, meta, scale, window, group)
    if meta.prefill_tables is not None:  # C kernels: decode rows and the small prefill chunks, SDPA the rest
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        qc = q.contiguous()
        if cpu_kernels.paged_prefill_attention(qc, kv_cache, out, *meta.prefill_tables, scale):
            if nd:
                cpu_kernels.paged_decode_attention(qc[:nd], kv_cache, meta.decode_block_tables, meta.decode_ctx_lens,
                                                   scale, out=out[:nd])
            for p in meta.prefills:
                if not p.by_c_kernel:
                    out[p.q_start : p.q_start + p.q_len] = _prefill_sdpa(q, k, v, kv_cache, p, scale, group)
            return out
        meta.prefill_tables = None  # shape not supported: SDPA below, for this and the next layers
        for p in meta.prefills:
            p.by_c_kernel = False
    outs: list[torch.Tensor] = []
    if nd:
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        if meta.use_c_kernel:
            outs.append(cpu_kernels.paged_decode_attention(q[:nd].contiguous(), kv_cache, tables, lens, scale))
        else:
            bs = kv_cache.shape[2]
            L = tables.shape[1] * bs
            ks = _gather(kv_cache[0], tables.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)  # (Bd, Hkv, L, D)
            vs = _gather(kv_cache[1], tables.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)
            mask = (torch.arange(L, device=q.device).unsqueeze(0) < lens.unsqueeze(1)).view(nd, 1, 1, L)
            # the G query heads sharing a KV head act as G query positions: no K/V expansion for GQA
            qd = q[:nd].view(nd, hkv, group, D)
            o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=mask, scale=scale)
            outs.append(o.reshape(nd, H, D))
    for p in meta.prefills:
        outs.append(_prefill_sdpa(q, k, v, kv_cache, p, scale, group))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, p: PrefillChunk,
                  scale: float, group: int) -> torch.Tensor:
    """One prefill chunk's attention by SDPA → (q_len, H, D)."""
    qs = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
    if p.mask is None:  # the chunk is the whole context: use the fresh K/V, plain causal
        ks = k[p.q_start : p.q_start + p.q_len]
        vs = v[p.q_start : p.q_start + p.q_len]
    else:
        ks = _gather(kv_cache[0], p.blocks)[: p.ctx_len]  # (ctx, Hkv, D)
        vs = _gather(kv_cache[1], p.blocks)[: p.ctx_len]
    o = F.scaled_dot_product_attention(
        qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), attn_mask=p.mask,
        is_causal=p.mask is None, scale=scale, enable_gqa=group > 1,
    )
    return o.squeeze(0).transpose(0, 1)


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
              scale: float, window: int, group: int) -> torch.Tensor:
    """Sliding-window attention on the torch path: decode rows and every prefill chunk read only the blocks their
    window touches, with a mask p - window < j <= p. Masks are built once per step and window (meta.window_masks)."""
    T, H, D = q.shape
    hkv = kv_cache.shape[3]
    bs = kv_cache.shape[2]
    nd = meta.num_decode
    outs: list[torch.Tensor] = []
    plan = meta.window_plans.get(window)
    if plan is None:
        plan = meta.window_plans[window] = _window_plan(meta, window, bs, q.device)
    if nd:
        tables, mask = plan[0]
        n_blk = tables.shape[1]
        L = n_blk * bs
        ks = _gather(kv_cache[0], tables.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)  # (Bd, Hkv, L, D)
        vs = _gather(kv_cache[1], tables.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)
        qd = q[:nd].view(nd, hkv, group, D)
        o = F.scaled_dot_product_attention(qd, ks, vs, attn_mask=mask, scale=scale)
        outs.append(o.reshape(nd, H, D))
    for p, (blocks, mask) in zip(meta.prefills, plan[1]):
        qs = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
        ks = _gather(kv_cache[0], blocks)[: mask.shape[1]]
        vs = _gather(kv_cache[1], blocks)[: mask.shape[1]]
        o = F.scaled_dot_product_attention(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
                                           attn_mask=mask, scale=scale, enable_gqa=group > 1)
        outs.append(o.squeeze(0).transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _window_plan(meta: AttnMetadata, window: int, bs: int, device: torch.device) -> tuple[
        tuple[torch.Tensor, torch.Tensor] | tuple[None, None], list[tuple[torch.Tensor, torch.Tensor]]]:
    """For one window size: the decode rows' block tables cut to the blocks the window touches and their mask,
    and per prefill chunk (blocks from the first one its window touches, mask (q_len, keys))."""
    decode: tuple[torch.Tensor, torch.Tensor] | tuple[None, None] = (None, None)
    if meta.num_decode:
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        lens64 = lens.long()
        first = int(((lens64 - window).clamp(min=0) // bs).min())  # the earliest block any row's window touches
        t = tables[:, first:]
        pos = first * bs + torch.arange(t.shape[1] * bs, device=device)
        # a decode row's query is at position len - 1: keys len - 1 - window < j <= len - 1
        m = (pos.unsqueeze(0) < lens64.unsqueeze(1)) & (pos.unsqueeze(0) >= lens64.unsqueeze(1) - window)
        decode = (t, m.view(t.shape[0], 1, 1, -1))
    chunks = []
    for p in meta.prefills:
        start = p.ctx_len - p.q_len
        first = max(0, start - window + 1) // bs
        qpos = torch.arange(start, p.ctx_len, device=device).unsqueeze(1)
        kpos = torch.arange(first * bs, p.ctx_len, device=device).unsqueeze(0)
        chunks.append((p.blocks[first:], (kpos <= qpos) & (kpos > qpos - window)))
    return decode, chunks
