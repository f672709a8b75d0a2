"""What 2 MiB pages give the packed decode kernels: the same Q4_0 GEMM (q4s_gemm, the 1B-class model's gate_up
shape widened to 128 Mi weights so it streams from DRAM, not from the last-level cache) on two copies of the same
packed bytes, one in memory advised MADV_NOHUGEPAGE (4 KiB pages), one MADV_HUGEPAGE (2 MiB pages where the kernel
has transparent huge pages), alternating in one process. The repack cache's mapping asks for huge pages for this
reason (inferd/loader/repack_cache.py map_entry).

    python benchmarks/huge_pages.py [--rows 1 16] [--rounds 20]

Linux only (madvise); reports the share of each copy the kernel really backed with huge pages (AnonHugePages of
/proc/self/smaps), so a machine without them shows 0 MiB and a ratio near 1.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import time

import torch

from inferd.hardware import machine_info
from inferd.ops import kernels as kmod

N, K = 65536, 2048  # 128 Mi weights: 64 MiB of Q4_0 nibbles + 8 MiB of scales, past a 32 MiB L3


def buffer(nbytes: int, huge: bool) -> tuple[mmap.mmap, torch.Tensor]:
    """An anonymous mapping advised for huge pages or against them, as a uint8 tensor."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def huge_mib(t: torch.Tensor) -> float:
    """MiB of the mapping holding `t` backed by huge pages (AnonHugePages in /proc/self/smaps)."""
    addr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                a, b = (int(v, 16) for v in head.split("-"))
                inside = a <= addr < b
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=20, help="alternations of the two copies (medians shown)")
    args = ap.parse_args()
    kern = kmod.get_kernels()
    if not kern.quant_gemm or not hasattr(mmap, "MADV_HUGEPAGE"):
        print(f"skipped: needs the quantized GEMMs (tier {kern.tier}) and madvise (Linux)")
        return
    lib = kern.lib
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N * K // 32, generator=g) * 0.01 + 0.001).half()
    copies = {}
    for name, huge in (("4 KiB", False), ("2 MiB", True)):
        mm, w = buffer(packed.numel(), huge)
        w.copy_(packed)
        copies[name] = (mm, w, huge_mib(w))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {machine_info()}, "
          f"tier {kern.tier}, OMP threads {os.environ.get('OMP_NUM_THREADS', os.cpu_count())}, load "
          f"{os.getloadavg()[0]:.2f}; {N}x{K} Q4_0 ({packed.numel() / 2**20:.0f} MiB of nibbles); huge-page backed: "
          + ", ".join(f"{k} copy {v[2]:.0f} MiB" for k, v in copies.items()))
    print("| rows | 4 KiB pages G op/s | 2 MiB pages G op/s | 2 MiB / 4 KiB (median of rounds) | weights GB/s (4 KiB, 2 MiB) |")
    print("|---|---|---|---|---|")
    for m in args.rows:
        x = torch.randn(m, K, generator=g)
        y = torch.empty(m, N)
        secs: dict[str, list[float]] = {k: [] for k in copies}
        ratios = []
        for _ in range(args.rounds):
            for name, (_, w, _) in copies.items():
                t0 = time.perf_counter()
                rc = lib.q4s_gemm(ctypes.c_void_p(x.data_ptr()), ctypes.c_int(m), ctypes.c_void_p(w.data_ptr()),
                                  ctypes.c_void_p(scales.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_int(N),
                                  ctypes.c_int(K), ctypes.c_int(0))
                secs[name].append(time.perf_counter() - t0)
                if rc != 0:
                    raise RuntimeError("q4s_gemm refused the shape")
            ratios.append(secs["4 KiB"][-1] / secs["2 MiB"][-1])
        med = {k: statistics.median(v) for k, v in secs.items()}
        nbytes = packed.numel() + scales.numel() * 2
        print(f"| {m} | {2 * m * N * K / med['4 KiB'] / 1e9:.0f} | {2 * m * N * K / med['2 MiB'] / 1e9:.0f} | "
              f"{statistics.median(ratios):.2f}x | {nbytes / med['4 KiB'] / 1e9:.1f}, {nbytes / med['2 MiB'] / 1e9:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
