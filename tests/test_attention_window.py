"""Sliding-window paged attention on a mixed step (decode rows of different lengths, fresh prompts, chunks after a
cached prefix) against a per-query reference that reads the window p - window < j <= p straight from the cache, on
every kernel tier this CPU runs: the C decode kernel (any vector tier), the C prefill kernel (AVX-512, shapes with
D and block size multiples of 16) and the torch path (SDPA with a window mask)."""

from __future__ import annotations

import pytest
import torch

from inferd.ops.attention import paged_attention, plan_prefill_kernel, write_kv
from inferd.ops.kernels import get_kernels, runnable_tiers, use_tier
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


# (H, Hkv, D, block size, chunks as (cached tokens, new tokens)): the small shape runs the torch prefill path (block
# size 4: no C prefill kernel); the others are C prefill shapes (a chunk of 100 new tokens stays with SDPA)
SHAPES = [(4, 2, 16, 4, [(0, 9), (6, 11), (30, 3), (0, 1)]),
          (4, 1, 256, 16, [(0, 9), (20, 37), (70, 5), (0, 100)]),
          (9, 3, 64, 16, [(40, 30), (3, 17), (0, 33)])]


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("window", [1, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_attention_matches_reference(shape, window, dtype):
    H, Hkv, D, bs, chunks = SHAPES[shape]
    g = torch.Generator().manual_seed(window + 7 * shape)
    q, k, v, cache, meta = _step(H, Hkv, D, bs, chunks, 3, dtype, g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    m = meta()
    write_kv(cache, k, v, m.slot_mapping)
    want = _reference(q, cache, m, D**-0.5, window, bs)
    for tier in runnable_tiers():
        with use_tier(tier) as kern:
            m = meta()
            m.use_c_kernel = kern.attention_fits(H, D, bs)
            plan_prefill_kernel(m)  # as the runner does: the small chunks go to the C kernel where the tier has one
            got = paged_attention(q, k, v, cache, m, D**-0.5, window)
            # the C prefill kernel ran (it clears the plan when it refuses a shape) where the tier and shape allow it
            assert (m.prefill_tables is not None) == (kern.prefill_attention and bs % 16 == 0), tier
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=tier)
    if window == 40 and shape == 0:  # a window covering every context is plain causal attention
        plain = meta()
        plain.use_c_kernel = False  # the torch path: present on every kernel tier
        full = paged_attention(q, k, v, cache, plain, D**-0.5)
        torch.testing.assert_close(got.float(), full.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(get_kernels().lib is None, reason="no C kernels on this tier")
def test_decode_window_reads_only_the_window_blocks():
    """The C decode kernel with a window never touches blocks before the window: poisoning them (NaN) changes
    nothing, while the same poison reaches a global layer's output."""
    H, Hkv, D, bs = 4, 1, 256, 16
    if not get_kernels().attention_fits(H, D, bs):
        pytest.skip("the C decode kernel does not fit this shape on this tier")
    from inferd.ops import cpu_kernels

    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 8, bs, Hkv, D, generator=g)
    tables = torch.tensor([[5, 2, 7, 1]])
    lens = torch.tensor([60], dtype=torch.int32)  # window 20: keys 40..59, blocks 2 and 3 of the table
    q = torch.randn(1, H, D, generator=g)
    want = cpu_kernels.paged_decode_attention(q, cache, tables, lens, 0.1, window=20)
    cache[:, 5] = float("nan")
    cache[:, 2] = float("nan")
    got = cpu_kernels.paged_decode_attention(q, cache, tables, lens, 0.1, window=20)
    torch.testing.assert_close(got, want)
    assert torch.isnan(cpu_kernels.paged_decode_attention(q, cache, tables, lens, 0.1)).all()
