"""Gemma 3 270M Q4_K_M: inferd vs llama.cpp (llama-cpp-python's Python API) on the same file, in the same run:
prefill of a 512-token prompt and single-stream decode of 128 tokens (each figure a median of 3; harness of
llamacpp_peer.py). The engines alternate, round by round (llama.cpp, then inferd per quantization), so a change in
the host's load hits both; the table gives the median over rounds of each engine's figure and of the per-round ratio.

    python benchmarks/gemma3_peer.py --peer-python /path/to/env-with-llama-cpp-python/bin/python [--quantization auto]
        [--threads 1] [--rounds 3]

The prompts are the token ids of ../shared/reference/bench_prompt_ids.json (valid ids in Gemma's vocabulary too:
the same sequence goes to both engines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_peer import PEER, bench_inferd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--quantization", nargs="+", default=["auto"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (llama.cpp, then inferd)")
    ap.add_argument("--ids", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "reference" /
                                         "bench_prompt_ids.json"), help="the prompts' token ids (JSON)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from inferd.hardware import machine_info
    from inferd.loader.hub import resolve
    from inferd.ops.kernels import get_kernels

    ref = Path(args.ids)
    ids = json.loads(ref.read_text())
    path = str(resolve("gemma3-270m"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine_info()}, inferd kernel tier {get_kernels().tier}, "
          f"dtype {args.dtype}, threads {args.threads} (both engines), load average {os.getloadavg()[0]:.1f}")
    peer_runs: list[dict] = []
    ours: dict[str, list[tuple[float, float]]] = {q: [] for q in args.quantization}
    for r in range(args.rounds):
        out = subprocess.run([args.peer_python, "-c", PEER, path, str(ref), str(args.threads)], capture_output=True,
                             text=True, check=True)
        peer_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for q in args.quantization:
            ours[q].append(bench_inferd("gemma3-270m", q, ids, args.dtype))
        p = peer_runs[-1]
        print(f"# round {r + 1}: llama.cpp {p['prefill_tok_s']:.0f} / {p['decode_tok_s']:.1f}; " + "; ".join(
            f"inferd {q} {ours[q][-1][0]:.0f} / {ours[q][-1][1]:.1f}" for q in args.quantization)
            + f" tok/s (prefill / decode), load average {os.getloadavg()[0]:.1f}", flush=True)
    med = statistics.median
    pp_peer = med(p["prefill_tok_s"] for p in peer_runs)
    tg_peer = med(p["decode_tok_s"] for p in peer_runs)
    print("| engine / format | prefill tok/s (512) | ratio | decode tok/s (128) | ratio |")
    print("|---|---|---|---|---|")
    print(f"| llama.cpp Q4_K_M (llama-cpp-python) | {pp_peer:.0f} | 1.00x | {tg_peer:.1f} | 1.00x |")
    for q, runs in ours.items():
        pp_ratio = med(o[0] / p["prefill_tok_s"] for o, p in zip(runs, peer_runs))
        tg_ratio = med(o[1] / p["decode_tok_s"] for o, p in zip(runs, peer_runs))
        print(f"| inferd -q {q} | {med(o[0] for o in runs):.0f} | {pp_ratio:.2f}x | {med(o[1] for o in runs):.1f} | "
              f"{tg_ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
