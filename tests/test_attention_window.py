"""Sliding-window paged attention on a mixed step (decode rows of different lengths, fresh prompts, chunks after a
cached prefix) against a per-query reference that reads the window p - window < j <= p straight from the cache."""

from __future__ import annotations

import pytest
import torch

from inferd.ops.attention import paged_attention, plan_prefill_kernel, write_kv
from tests.test_attention import _step


def _reference(q, cache, meta, scale, window, bs):
    H, D = q.shape[1], q.shape[2]
    hkv = cache.shape[3]
    rows = []  # (query row, block table, position)
    for i in range(meta.num_decode):
        rows.append((i, meta.decode_block_tables[i], int(meta.decode_ctx_lens[i]) - 1))
    for p in meta.prefills:
        for j in range(p.q_len):
            rows.append((p.q_start + j, p.blocks, p.ctx_len - p.q_len + j))
    out = torch.empty(q.shape, dtype=torch.float32)
    for r, table, pos in rows:
        keys = torch.arange(max(0, pos - window + 1), pos + 1)
        slots = table[keys // bs] * bs + keys % bs
        k = cache[0].reshape(-1, hkv, D)[slots].float().repeat_interleave(H // hkv, dim=1)  # (n, H, D)
        v = cache[1].reshape(-1, hkv, D)[slots].float().repeat_interleave(H // hkv, dim=1)
        att = torch.softmax(torch.einsum("hd,nhd->hn", q[r].float(), k) * scale, dim=-1)
        out[r] = torch.einsum("hn,nhd->hd", att, v)
    return out


@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_attention_matches_reference(window, dtype):
    bs, H, Hkv, D = 4, 4, 2, 16
    g = torch.Generator().manual_seed(window)
    chunks = [(0, 9), (6, 11), (30, 3), (0, 1)]
    q, k, v, cache, meta = _step(H, Hkv, D, bs, chunks, 3, dtype, g)
    m = meta()
    write_kv(cache, k, v, m.slot_mapping)
    plan_prefill_kernel(m)  # planned for the global layers of the step: the windowed path must not use or clear it
    planned = m.prefill_tables
    got = paged_attention(q, k, v, cache, m, D**-0.5, window)
    assert m.prefill_tables is planned
    want = _reference(q, cache, m, D**-0.5, window, bs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # a window covering every context is plain causal attention
    if window == 40:
        plain = meta()
        plain.use_c_kernel = False  # the torch path: present on every kernel tier
        full = paged_attention(q, k, v, cache, plain, D**-0.5)
        torch.testing.assert_close(got.float(), full.float(), atol=tol, rtol=tol)
