"""Attention over a paged KV cache for one flat, mixed batch.

Token layout of a step (built by the runner): first the decode tokens (one per decoding sequence), then
the prefill chunks, each contiguous. The cache of one layer is a tensor (2, num_blocks, block_size, Hkv, D);
`slot = block_id * block_size + offset` addresses one token's K/V. Reads gather whole blocks
(index_select of contiguous block_size×Hkv×D rows, ~10× faster than gathering token by token).

Sliding-window layers (Mistral, Gemma 3's local layers) pass `window`: a query at position p sees keys at
positions p - window < j <= p (transformers' convention). The C decode and prefill kernels take the window and read
only the blocks it touches; on the torch path SDPA gets a window mask over only those blocks (in decode and in
chunked prefill), and a chunk whose whole context fits in the window is plain causal attention.
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
    # the torch path's per-step plans, built at the first layer that needs one: ("decode", window) → (decode
    # tables cut to the blocks the window touches, mask); (chunk index, window) → (blocks, mask)
    window_plans: dict[tuple, tuple] = field(default_factory=dict)
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
    if meta.prefill_tables is not None:  # C kernels: decode rows and the small prefill chunks, SDPA the rest
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        qc = q.contiguous()
        if cpu_kernels.paged_prefill_attention(qc, kv_cache, out, *meta.prefill_tables, scale, window):
            if nd:
                cpu_kernels.paged_decode_attention(qc[:nd], kv_cache, meta.decode_block_tables, meta.decode_ctx_lens,
                                                   scale, out=out[:nd], window=window)
            for i, p in enumerate(meta.prefills):
                if not p.by_c_kernel:
                    out[p.q_start : p.q_start + p.q_len] = _prefill_sdpa(q, k, v, kv_cache, meta, i, scale, group,
                                                                         window)
            return out
        meta.prefill_tables = None  # shape not supported: SDPA below, for this and the next layers
        for p in meta.prefills:
            p.by_c_kernel = False
    outs: list[torch.Tensor] = []
    if nd:
        tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
        assert tables is not None and lens is not None
        if meta.use_c_kernel:
            outs.append(cpu_kernels.paged_decode_attention(q[:nd].contiguous(), kv_cache, tables, lens, scale,
                                                           window=window))
        else:
            outs.append(_decode_sdpa(q, kv_cache, meta, scale, group, window))
    for i in range(len(meta.prefills)):
        outs.append(_prefill_sdpa(q, k, v, kv_cache, meta, i, scale, group, window))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _decode_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float, group: int,
                 window: int | None) -> torch.Tensor:
    """The decode rows' attention by SDPA over their gathered blocks (those the window touches) → (Bd, H, D)."""
    nd, (H, D), hkv, bs = meta.num_decode, q.shape[1:], kv_cache.shape[3], kv_cache.shape[2]
    tables, lens = meta.decode_block_tables, meta.decode_ctx_lens
    assert tables is not None and lens is not None
    key = ("decode", window)
    plan = meta.window_plans.get(key)
    if plan is None:
        lens64 = lens.long()
        # a window row's query is at position len - 1: keys len - 1 - window < j <= len - 1, from the earliest block
        # any row's window touches
        first = 0 if window is None else int(((lens64 - window).clamp(min=0) // bs).min())
        t = tables[:, first:]
        pos = first * bs + torch.arange(t.shape[1] * bs, device=q.device)
        m = pos.unsqueeze(0) < lens64.unsqueeze(1)
        if window is not None:
            m &= pos.unsqueeze(0) >= lens64.unsqueeze(1) - window
        plan = meta.window_plans[key] = (t, m.view(nd, 1, 1, -1))
    t, mask = plan
    L = t.shape[1] * bs
    ks = _gather(kv_cache[0], t.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)  # (Bd, Hkv, L, D)
    vs = _gather(kv_cache[1], t.reshape(-1)).view(nd, L, hkv, D).transpose(1, 2)
    # the G query heads sharing a KV head act as G query positions: no K/V expansion for GQA
    o = F.scaled_dot_product_attention(q[:nd].view(nd, hkv, group, D), ks, vs, attn_mask=mask, scale=scale)
    return o.reshape(nd, H, D)


def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata,
                  i: int, scale: float, group: int, window: int | None) -> torch.Tensor:
    """Prefill chunk i's attention by SDPA → (q_len, H, D). A window that reaches past the chunk's first key
    reads only the blocks from the first one it touches, with the mask p - window < j <= p."""
    p = meta.prefills[i]
    qs = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
    blocks, mask, n_keys = p.blocks, p.mask, p.ctx_len
    if window is not None and p.ctx_len > window:  # else the window covers the whole context: plain causal
        key = (i, window)
        plan = meta.window_plans.get(key)
        if plan is None:
            bs = kv_cache.shape[2]
            start = p.ctx_len - p.q_len
            first = max(0, start - window + 1) // bs
            qpos = torch.arange(start, p.ctx_len, device=q.device).unsqueeze(1)
            kpos = torch.arange(first * bs, p.ctx_len, device=q.device).unsqueeze(0)
            plan = meta.window_plans[key] = (p.blocks[first:], (kpos <= qpos) & (kpos > qpos - window))
        blocks, mask = plan
        n_keys = mask.shape[1]
    if mask is None:  # the chunk is the whole context: use the fresh K/V, plain causal
        ks = k[p.q_start : p.q_start + p.q_len]
        vs = v[p.q_start : p.q_start + p.q_len]
    else:
        ks = _gather(kv_cache[0], blocks)[:n_keys]  # (keys, Hkv, D)
        vs = _gather(kv_cache[1], blocks)[:n_keys]
    o = F.scaled_dot_product_attention(
        qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=group > 1,
    )
    return o.squeeze(0).transpose(0, 1)
