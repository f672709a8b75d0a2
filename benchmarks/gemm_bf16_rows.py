"""The dense bf16 GEMM (csrc/gemm_bf16.c) at the few rows of a decode or verification step, against torch's GEMM.

A verification step of k proposals runs k + 1 rows through every decoder linear; with weights streamed once for
all of them (tiles of 4 weight rows × up to 5 activation rows) 5 rows should cost far less than 5 × one row.
Weights sit in cache here (one layer, called repeatedly): the compute side. In a real decode the weights stream
from DRAM and the rows matter even less. Min over repeats (a shared host's stalls do not count).

    python benchmarks/gemm_bf16_rows.py [--n 3072] [--k 576] [--tiers avx512_bf16_vnni avx2_fma]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from inferd.hardware import machine_info
from inferd.ops.kernels import runnable_tiers, use_tier


def best_of(fn, reps: int = 30, inner: int = 10) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 16])
    ap.add_argument("--tiers", nargs="+", default=[t for t in runnable_tiers() if t not in ("scalar", "torch")])
    args = ap.parse_args()
    print(f"# {machine_info()}, W {args.n}×{args.k} bf16 (in cache), µs per call (min of 30 × 10)")
    print("| tier | rows | gemm_bf16 µs | torch F.linear µs | gemm_bf16 / its 1 row |")
    print("|---|---|---|---|---|")
    w = torch.randn(args.n, args.k).bfloat16()
    for tier in args.tiers:
        with use_tier(tier) as k:
            one = None
            for m in args.rows:
                x = torch.randn(m, args.k).bfloat16()
                y = torch.empty(m, args.n, dtype=torch.bfloat16)
                args_c = (x.data_ptr(), m, w.data_ptr(), y.data_ptr(), args.n, args.k, 0)
                ours = best_of(lambda a=args_c: k.lib.gemm_bf16(*a))
                ref = best_of(lambda x=x: F.linear(x, w))
                one = one or ours
                print(f"| {tier} | {m} | {ours * 1e6:.1f} | {ref * 1e6:.1f} | {ours / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
