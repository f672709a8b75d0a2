"""The packed quantized GEMMs (ops/csrc/quant_gemm.c) at 1-64 activation rows on a Llama-3.2-1B's shapes: G op/s
(2·M·N·K per second) of this checkout's kernels against an older commit's (`--old`), built for the same tier and
timed in the same run, alternating, so a loaded host moves both alike. Weights and scales are random bytes in the
kernels' layouts (the speed does not depend on their values); the G op/s are comparable with
benchmarks/int8_peak.py's vpdpbusd ceiling.

    python benchmarks/quant_gemm_rows.py --old d24d462 --rows 1 4 8 16 64

Each timing cycles through copies of the weights, together at least --dram-mb (default 256 MB, far above the L3),
so every call reads its weights from DRAM as a decode step does (one layer after the other); with --copies 1 a
matrix that fits in the L3 is read from there after the first call, which hides the kernels' waits on DRAM.

Types: Q4_0 (q4s_gemm, or q4_gemm in a library without it), Q8_0 (q8_gemm), Q4_K (qk_gemm_ks, 4 bits, scales per 32), Q6_K (qk_gemm_kss, 6 bits, per 16,
or qk_gemm_ks in a library without it).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from inferd.ops import kernels as kmod

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "head": (49152, 2048),  # the tied head of the 1B files (Q6_K in all three)
          "l2": (256, 2048)}  # l2: weights that stay in L2 (the kernel's compute rate without DRAM)
TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K")
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
LAYERS = 16


def build_old(ref: str, tier: str, tmp: Path) -> ctypes.CDLL:
    """The kernel library of commit `ref`'s csrc, compiled with this checkout's flags for `tier`."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    names = subprocess.check_output(["git", "ls-tree", "--name-only", f"{ref}:inferd/ops/csrc"], cwd=root,
                                    text=True).split()
    src = tmp / "csrc"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(subprocess.check_output(["git", "show", f"{ref}:inferd/ops/csrc/{n}"], cwd=root))
    cmd = kmod.compile_command(tier, "gcc", tmp / "old.so")
    # this checkout's sources mapped to the commit's; a file the commit does not have is left out (its entry points
    # are not timed here)
    cmd = [str(src / Path(a).name) if a.startswith(str(kmod.CSRC)) else a for a in cmd
           if not a.startswith(str(kmod.CSRC)) or Path(a).name in names]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(tmp / "old.so"))


def operands(typ: str, n: int, k: int, g: torch.Generator) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Random weights and scales in the layout of `typ`'s kernel, and its trailing int arguments."""
    gk = k // 32

    def u8(size: int) -> torch.Tensor:
        return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)

    def f16(size: int) -> torch.Tensor:
        return (torch.rand(size, generator=g) * 0.01 + 0.001).half()

    if typ == "Q4_0":
        return [u8(n * k // 2), f16(n * gk * 2)], ()
    if typ == "Q8_0":
        return [u8(n * k), f16(n * gk)], ()
    bits, sub = (4, 32) if typ == "Q4_K" else (6, 16)
    scm = torch.randint(0, 64, (n * gk * 2 * (32 // sub),), dtype=torch.int8, generator=g)
    return [u8(n // 16 * gk * (256 + 64 * (bits - 4))), scm, f16(n * (k // 256) * 2)], (bits, sub)  # (rb, g, bytes)


def call(lib: ctypes.CDLL, typ: str, x: torch.Tensor, ops: list[torch.Tensor], extra: tuple[int, ...],
         y: torch.Tensor) -> None:
    m, k = x.shape
    n = y.shape[1]
    p = [t.data_ptr() for t in ops]
    ci = ctypes.c_int
    if typ == "Q4_0":  # GGUF Q4_0 loads as symmetric (q4s_gemm, d alone) where the library has it
        fn = lib.q4s_gemm if hasattr(lib, "q4s_gemm") else lib.q4_gemm
        rc = fn(ctypes.c_void_p(x.data_ptr()), ci(m), ctypes.c_void_p(p[0]), ctypes.c_void_p(p[1]),
                         ctypes.c_void_p(y.data_ptr()), ci(n), ci(k), ci(int(x.dtype == torch.bfloat16)))
    elif typ == "Q8_0":
        rc = lib.q8_gemm(ctypes.c_void_p(x.data_ptr()), ci(m), ctypes.c_void_p(p[0]), ctypes.c_void_p(p[1]),
                         ctypes.c_void_p(y.data_ptr()), ci(n), ci(k), ci(int(x.dtype == torch.bfloat16)))
    else:  # GGUF Q6_K loads as symmetric (qk_gemm_kss: the first halves of scm and sb) where the library has it
        fn = lib.qk_gemm_kss if typ == "Q6_K" and hasattr(lib, "qk_gemm_kss") else lib.qk_gemm_ks
        rc = fn(ctypes.c_void_p(x.data_ptr()), ci(m), ctypes.c_void_p(p[0]), ctypes.c_void_p(p[1]),
                            ctypes.c_void_p(p[2]), ctypes.c_void_p(y.data_ptr()), ci(n), ci(k),
                            ci(int(x.dtype == torch.bfloat16)), ci(extra[0]), ci(extra[1]))
    if rc != 0:
        raise RuntimeError(f"{typ}: the kernel refused the shape {m}x{k} -> {n}")


def time_one(lib: ctypes.CDLL, typ: str, x, copies, extra, y, min_s: float, clock) -> float:
    """Seconds per call, the calls cycling through the weight copies."""
    for ops in copies:
        call(lib, typ, x, ops, extra, y)
    reps, t0 = 0, clock()
    while True:
        call(lib, typ, x, copies[reps % len(copies)], extra, y)
        reps += 1
        el = clock() - t0
        if el >= min_s:
            return el / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="d24d462", help="the commit to compare with ('' for none)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--shapes", nargs="+", default=list(LAYER_SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds (the median is shown)")
    ap.add_argument("--min-s", type=float, default=0.05, help="seconds of calls per timing")
    ap.add_argument("--copies", type=int, default=0,
                    help="copies of each weight matrix the calls cycle through (0: enough for --dram-mb)")
    ap.add_argument("--dram-mb", type=float, default=256.0,
                    help="with --copies 0: the copies' total size, so the weights come from DRAM")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (with OMP_NUM_THREADS=1 the kernel runs on it), steadier on a "
                         "shared host than wall time")
    args = ap.parse_args()
    if args.clock == "cpu" and os.environ.get("OMP_NUM_THREADS") != "1":
        ap.error("--clock cpu needs OMP_NUM_THREADS=1 (other threads' time is not counted)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    kern = kmod.get_kernels()
    if not kern.quant_gemm:
        print(f"skipped: tier {kern.tier} has no quantized GEMMs")
        return
    load = os.getloadavg()[0]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, tier {kern.tier}, "
          f"OMP threads {os.environ.get('OMP_NUM_THREADS', os.cpu_count())}, {args.clock} clock, weights "
          f"{'x' + str(args.copies) if args.copies else f'copied to {args.dram_mb:.0f} MB'}, load {load:.2f} (at start)")
    g = torch.Generator().manual_seed(0)
    secs: dict[tuple[str, str, str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"new": kern.lib}
        if args.old:
            libs["old"] = build_old(args.old, kern.tier, Path(tmp))
        print("| type | shape (N×K) | rows | " + " | ".join(f"{k} G op/s" for k in libs)
              + (" | new/old |" if "old" in libs else " |"))
        print("|---" * (3 + len(libs) + ("old" in libs)) + "|")
        for typ in args.types:
            for shape in args.shapes:
                n, k = SHAPES[shape]
                ops, extra = operands(typ, n, k, g)
                size = sum(t.numel() * t.element_size() for t in ops)
                count = args.copies or max(1, math.ceil(args.dram_mb * 1e6 / size))
                copies = [ops] + [[t.clone() for t in ops] for _ in range(count - 1)]
                for m in args.rows:
                    x = torch.randn(m, k, generator=g)
                    y = torch.empty(m, n)
                    times: dict[str, list[float]] = {name: [] for name in libs}
                    for _ in range(args.rounds):
                        for name, lib in libs.items():
                            times[name].append(time_one(lib, typ, x, copies, extra, y, args.min_s, clock))
                    gops = {name: 2 * m * n * k / statistics.median(t) / 1e9 for name, t in times.items()}
                    for name, t in times.items():
                        secs[(name, typ, shape, m)] = statistics.median(t)
                    row = f"| {typ} | {shape} {n}×{k} | {m} | " + " | ".join(f"{v:.0f}" for v in gops.values())
                    if "old" in gops:
                        row += f" | {gops['new'] / gops['old']:.2f}x"
                    print(row + " |", flush=True)
    # the GEMM time of one decode step of the 1B (16 layers of one type, the Q6_K head) where it was all measured
    for typ in args.types:
        for m in args.rows:
            for name in libs:
                parts = [secs.get((name, typ, sh, m)) for sh in LAYER_SHAPES]
                head = secs.get((name, "Q6_K", "head", m))
                if None not in parts and head is not None:
                    print(f"# {name}: {typ} layers + Q6_K head, {m} rows: {(LAYERS * sum(parts) + head) * 1e3:.1f} ms "
                          f"of GEMMs per step ({args.clock} time)")
    print(f"# load {os.getloadavg()[0]:.2f} (at end)")


if __name__ == "__main__":
    main()
