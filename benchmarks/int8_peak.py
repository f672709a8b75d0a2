"""The CPU's int8 multiply-add peak: twelve independent chains of AVX512-VNNI `vpdpbusd` on 512-bit registers per
thread (no loads, no dependency stalls), at 1 thread and at every thread OpenMP is given. The ceiling for a
compute-bound quantized GEMM (decode at many streams) on this machine; skips where the CPU or the compiler lacks
AVX512-VNNI.

    python benchmarks/int8_peak.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdio.h>
#include <omp.h>
int main(void) {
    const long iters = 100000000L;
    double t0 = omp_get_wtime();
#pragma omp parallel
    for (long i = 0; i < iters; i++)
        __asm__ volatile(
            "vpdpbusd %%zmm14, %%zmm15, %%zmm0\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm1\n\t"
            "vpdpbusd %%zmm14, %%zmm15, %%zmm2\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm3\n\t"
            "vpdpbusd %%zmm14, %%zmm15, %%zmm4\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm5\n\t"
            "vpdpbusd %%zmm14, %%zmm15, %%zmm6\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm7\n\t"
            "vpdpbusd %%zmm14, %%zmm15, %%zmm8\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm9\n\t"
            "vpdpbusd %%zmm14, %%zmm15, %%zmm10\n\t" "vpdpbusd %%zmm14, %%zmm15, %%zmm11\n\t"
            ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
    double per_ns = (double)iters * 12 * omp_get_max_threads() / (omp_get_wtime() - t0) / 1e9;
    printf("%d thread(s): %.2f vpdpbusd (512-bit) per ns = %.0f G int8 op/s\n", omp_get_max_threads(), per_ns,
           per_ns * 128);  /* 64 multiply-adds = 128 operations each */
    return 0;
}
"""


def main() -> int:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cc = shutil.which("cc") or shutil.which("gcc")
    if "avx512_vnni" not in flags or cc is None:
        print("skipped: needs an x86 CPU with AVX512-VNNI and a C compiler")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vnni", "-fopenmp", str(src), "-o", str(exe)], check=True)
        for threads in dict.fromkeys([1, os.cpu_count() or 1]):
            subprocess.run([str(exe)], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
