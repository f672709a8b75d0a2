"""The kernel tier matrix: SmolLM2-135M (the Q4_1 GGUF) on every kernel tier this CPU can execute, each forced
with INFERD_ISA in its own process (benchmarks/throughput.py), so one machine reports what an AVX2-only laptop
or an AVX-512 CPU without VNNI/BF16 would run.

    python benchmarks/tiers.py [--tiers avx512_bf16_vnni avx2_fma ...] [--reps 1] [--json out.json]

Per tier: `-q auto` (the Q4_1 blocks kept packed where the tier has the int4 GEMM, else dequantized) in the tier's
natural dtype (bf16 where the tier has AVX512-BF16, fp32 elsewhere, as `--dtype auto` picks on such a CPU), and
the dequantized model in that dtype (`-q none`): prefill of a 512-token prompt, decode at 1 and 16 streams.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from inferd.hardware import machine_info
from inferd.ops.kernels import runnable_tiers

HERE = Path(__file__).resolve().parent
BF16_TIERS = {"avx512_amx", "avx512_bf16_vnni"}


def run_tier(tier: str, reps: int) -> list[dict]:
    dtype = "bfloat16" if tier in BF16_TIERS else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / "throughput.py"), "--dtype", dtype, "--quantization", "auto", "none",
               "--concurrency", "1", "16", "--reps", str(reps), "--json", str(out)]
        subprocess.run(cmd, env={**os.environ, "INFERD_ISA": tier}, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiers", nargs="+", default=runnable_tiers())
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"# {datetime.date.today()}  {machine_info()}")
    print("| tier | dtype | -q | weights MB | prefill tok/s (512) | decode tok/s, 1 stream | decode tok/s, 16 streams |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for tier in args.tiers:
        results[tier] = run_tier(tier, args.reps)
        for r in results[tier]:
            b = r["batch"]
            print(f"| {tier} | {r['dtype']} | {r['quantization']} | {r['weight_mb']:.0f} | {r['prefill_tok_s']:.0f} | "
                  f"{b['1']['decode_tok_s']:.1f} | {b['16']['decode_tok_s']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
