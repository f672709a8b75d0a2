"""The C prefill attention kernel against SDPA per chunk, on this process's kernel tier (force one with INFERD_ISA):
one step of 8 prefill chunks of 47 new tokens after a 16-token cached prefix, SmolLM2's attention shape (9 heads,
3 KV heads, head size 64, blocks of 16), fp32, 1 thread; best of 30 calls each.

    INFERD_ISA=avx2_fma python benchmarks/prefill_attention_tiers.py
"""

import sys
import time

import torch

sys.path.insert(0, ".")
from inferd.ops.attention import paged_attention, plan_prefill_kernel, write_kv
from inferd.ops.kernels import get_kernels
from tests.test_attention import _step

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
chunks = [(16, 47)] * 8
q, k, v, cache, meta = _step(9, 3, 64, 16, chunks, 0, torch.float32, g)
m0 = meta(); write_kv(cache, k, v, m0.slot_mapping)
def run(c):
    m = meta()
    if c: plan_prefill_kernel(m)
    t = time.perf_counter(); paged_attention(q, k, v, cache, m, 0.125); return time.perf_counter() - t
for _ in range(3): run(True); run(False)
a = min(run(True) for _ in range(30)); b = min(run(False) for _ in range(30))
print(get_kernels().tier, f"C {a*1e3:.3f} ms  SDPA {b*1e3:.3f} ms  ratio {b/a:.2f}x")
