"""The C prefill attention kernel against SDPA per chunk, on this process's kernel tier (force one with INFERD_ISA):
one step of 8 prefill chunks of 47 new tokens after a 16-token cached prefix, SmolLM2's attention shape (9 heads,
3 KV heads, head size 64, blocks of 16), fp32, 1 thread; best of 30 calls each.

    INFERD_ISA=avx2_fma python benchmarks/prefill_attention_tiers.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferd.ops.attention import paged_attention, plan_prefill_kernel, write_kv  # noqa: E402
from inferd.ops.kernels import get_kernels  # noqa: E402
from tests.test_attention import _step  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v, cache, meta = _step(9, 3, 64, 16, [(16, 47)] * 8, 0, torch.float32, g)
    write_kv(cache, k, v, meta().slot_mapping)

    def run(c_kernel: bool) -> float:
        m = meta()
        if c_kernel:
            plan_prefill_kernel(m)
        t = time.perf_counter()
        paged_attention(q, k, v, cache, m, 0.125)
        return time.perf_counter() - t

    for _ in range(3):
        run(True)
        run(False)
    c = min(run(True) for _ in range(30))
    sdpa = min(run(False) for _ in range(30))
    print(f"{get_kernels().tier}: C {c * 1e3:.3f} ms, SDPA {sdpa * 1e3:.3f} ms, {sdpa / c:.2f}x")


if __name__ == "__main__":
    main()
