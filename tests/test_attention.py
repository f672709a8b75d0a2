"""Paged attention: the C prefill kernel (several small chunks in one call) against SDPA per chunk, on mixed
steps (decode rows, fresh prompts, chunks after a cached prefix, a chunk too big for the kernel)."""

from __future__ import annotations

import pytest
import torch

from inferd.ops.attention import AttnMetadata, PrefillChunk, paged_attention, plan_prefill_kernel, write_kv
from inferd.ops.kernels import get_kernels

pytestmark = pytest.mark.skipif(not get_kernels().prefill_attention,
                                reason=f"kernel tier {get_kernels().tier} has no C prefill attention (AVX2 or AVX-512)")


def _step(H, Hkv, D, bs, chunks, nd, dtype, g):
    """A random cache and one step: nd decode rows, then prefill chunks given as (cached tokens, new tokens)."""
    nb = 64
    cache = torch.randn(2, nb, bs, Hkv, D, generator=g).to(dtype)
    T = nd + sum(n for _, n in chunks)
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    lens = torch.randint(1, 3 * bs, (nd,), generator=g, dtype=torch.int32)
    perm = torch.randperm(nb, generator=g)  # blocks scattered over the cache, as in a real run
    used = 0

    def take(n):
        nonlocal used
        used += n
        return perm[used - n : used]

    def meta():
        m = AttnMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
        slots, row = [], nd
        if nd:
            m.num_decode, m.use_c_kernel = nd, True
            m.decode_block_tables, m.decode_ctx_lens = dec_tables, lens
            slots += [dec_tables[i, (lens[i] - 1) // bs] * bs + (lens[i] - 1) % bs for i in range(nd)]
            slots = [torch.stack(slots)]
        for (cached, n), blocks in zip(chunks, chunk_blocks):
            end = cached + n
            mask = None if cached == 0 else torch.arange(end)[None] <= torch.arange(cached, end)[:, None]
            m.prefills.append(PrefillChunk(row, n, end, blocks, mask))
            pos = torch.arange(cached, end)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            row += n
        m.slot_mapping = torch.cat(slots)
        return m

    dec_tables = torch.stack([take(3) for _ in range(nd)]) if nd else None
    chunk_blocks = [take(-(-(c + n) // bs)) for c, n in chunks]
    return q, k, v, cache, meta


@pytest.mark.parametrize("H,Hkv,D,bs", [(9, 3, 64, 16), (4, 1, 256, 16), (8, 8, 32, 32), (4, 2, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_matches_sdpa(H, Hkv, D, bs, dtype):
    g = torch.Generator().manual_seed(H * D + bs)
    chunks = [(16, 47), (0, 1), (0, 33), (5, 20), (0, 300), (90, 7)]  # (0, 300): too big, stays with SDPA
    q, k, v, cache, meta = _step(H, Hkv, D, bs, chunks, 3, dtype, g)
    ref_meta = meta()
    write_kv(cache, k, v, ref_meta.slot_mapping)
    want = paged_attention(q, k, v, cache, ref_meta, D**-0.5)
    m = meta()
    plan_prefill_kernel(m)
    assert m.prefill_tables is not None
    assert [p.by_c_kernel for p in m.prefills] == [True, True, True, True, False, True]
    got = paged_attention(q, k, v, cache, m, D**-0.5)
    assert m.prefill_tables is not None  # the kernel ran (a refusal would have cleared it)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_prefill_kernel_refuses_unsupported_head_dim():
    g = torch.Generator().manual_seed(0)
    q, k, v, cache, meta = _step(2, 1, 20, 16, [(0, 5), (3, 4)], 0, torch.float32, g)  # D=20: no multiple of 8 or 16
    ref_meta = meta()
    write_kv(cache, k, v, ref_meta.slot_mapping)
    want = paged_attention(q, k, v, cache, ref_meta, 0.2)
    m = meta()
    plan_prefill_kernel(m)
    got = paged_attention(q, k, v, cache, m, 0.2)
    assert m.prefill_tables is None and not any(p.by_c_kernel for p in m.prefills)  # fell back to SDPA
    torch.testing.assert_close(got, want)


def test_lone_small_chunk_stays_with_sdpa():
    m = AttnMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
    m.prefills = [PrefillChunk(0, 16, 16, torch.tensor([0]), None), PrefillChunk(16, 400, 400, torch.arange(25), None)]
    plan_prefill_kernel(m)
    assert m.prefill_tables is None
