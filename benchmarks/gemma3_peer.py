"""Gemma 3 270M Q4_K_M: inferd vs llama.cpp (llama-cpp-python's Python API) on the same file, in the same run:
prefill of a 512-token prompt and single-stream decode of 128 tokens (medians of 3; harness of llamacpp_peer.py).

    python benchmarks/gemma3_peer.py --peer-python /path/to/env-with-llama-cpp-python/bin/python [--quantization auto]

The prompts are the token ids of ../shared/reference/bench_prompt_ids.json (valid ids in Gemma's vocabulary too:
the same sequence goes to both engines).
"""

from __future__ import annotations

import argparse
import json
import os
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
          f"dtype {args.dtype}, threads {args.threads} (both engines)")
    out = subprocess.run([args.peer_python, "-c", PEER, path, str(ref), str(args.threads)], capture_output=True,
                         text=True, check=True)
    peer = json.loads(out.stdout.strip().splitlines()[-1])
    print("| engine / format | prefill tok/s (512) | ratio | decode tok/s (128) | ratio |")
    print("|---|---|---|---|---|")
    print(f"| llama.cpp Q4_K_M (llama-cpp-python) | {peer['prefill_tok_s']:.0f} | 1.00x | "
          f"{peer['decode_tok_s']:.1f} | 1.00x |", flush=True)
    for q in args.quantization:
        pp, tg = bench_inferd("gemma3-270m", q, ids, args.dtype)
        print(f"| inferd -q {q} | {pp:.0f} | {pp / peer['prefill_tok_s']:.2f}x | {tg:.1f} | "
              f"{tg / peer['decode_tok_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
