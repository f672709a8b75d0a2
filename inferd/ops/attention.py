"""Attention over a paged KV cache for one flat, mixed batch.

Token layout of a step (built by the runner): first the decode tokens (one per decoding sequence), then
the prefill chunks, each contiguous. The cache of one layer is a tensor (2, num_blocks, block_size, Hkv, D);
`slot = block_id * block_size + offset` addresses one token's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the flat batch
    q_len: int
    ctx_len: int  # tokens of context after this chunk is written (cached prefix + chunk)
    slots: torch.Tensor  # (ctx_len,) cache slots of the whole context, in order
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, None when the chunk is the whole context (plain causal)


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: where each new token's K/V goes
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # (Bd, L) int64 slots of each decoding sequence, padded
    decode_mask: torch.Tensor | None = None  # (Bd, 1, 1, L) bool, True where a key is valid
    prefills: list[PrefillChunk] = field(default_factory=list)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hkv, D) → their slots in the cache."""
    _, nb, bs, hkv, d = kv_cache.shape
    flat = kv_cache.view(2, nb * bs, hkv, d)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMetadata, scale: float
) -> torch.Tensor:
    """q: (T, H, D); k, v: (T, Hkv, D) of the new tokens (already written to the cache). Returns (T, H, D)."""
    T, H, D = q.shape
    _, nb, bs, hkv, _ = kv_cache.shape
    group = H // hkv
    flat = kv_cache.view(2, nb * bs, hkv, D)
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        assert meta.decode_slots is not None and meta.decode_mask is not None
        ks = flat[0][meta.decode_slots]  # (Bd, L, Hkv, D)
        vs = flat[1][meta.decode_slots]
        qd = q[:nd].view(nd, hkv, group, D)  # (Bd, Hkv, G, D)
        scores = torch.matmul(qd, ks.permute(0, 2, 3, 1)) * scale  # (Bd, Hkv, G, L)
        scores = scores.float().masked_fill_(~meta.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vs.dtype)
        out[:nd] = torch.matmul(probs, vs.transpose(1, 2)).view(nd, H, D)  # (Bd, Hkv, G, D)
    for p in meta.prefills:
        qs = q[p.q_start : p.q_start + p.q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
        if p.mask is None:  # whole context is this chunk: use the fresh K/V, plain causal
            ks = k[p.q_start : p.q_start + p.q_len]
            vs = v[p.q_start : p.q_start + p.q_len]
        else:
            ks, vs = flat[0][p.slots], flat[1][p.slots]  # (ctx, Hkv, D)
        ks = ks.transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, Hkv, ctx, D)
        vs = vs.transpose(0, 1).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=group > 1
        )
        out[p.q_start : p.q_start + p.q_len] = o.squeeze(0).transpose(0, 1)
    return out
