"""Engine throughput on SmolLM2-135M: prefill tok/s (512-token prompt), single-stream decode tok/s, and
aggregate decode at 1/4/16/64 concurrent sequences (128-token prompts, 128 output tokens each).

    python benchmarks/throughput.py [--dtype bfloat16 float32] [--concurrency 1 4 16 64] [--json out.json]
        [--model NAME_OR_PATH] [--device auto|cpu|cuda] [--quantization none int8 int4]
        [--memory-profile balanced small]   (one run per profile, e.g. an A/B of the bf16 copies)

Achieved bandwidth = weight bytes read per step × steps / s (each decode step streams every weight once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from inferd import LLM, SamplingParams
from inferd.hardware import machine_info
from inferd.quant.linear import module_bytes

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "bench_prompt_ids.json"


def prompts() -> tuple[list[int], list[int]]:
    if REF.is_file():
        d = json.loads(REF.read_text())
        return d["ids128"], d["ids512"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (512,), generator=g).tolist()
    return ids[:128], ids


def bench_dtype(dtype: str, concurrency: list[int], reps: int, model: str = "smollm2-135m", device: str = "auto",
                quantization: str = "none", enforce_eager: bool = False, memory_profile: str = "balanced") -> dict:
    llm = LLM(model, dtype=dtype, device=device, quantization=quantization, max_num_seqs=max(concurrency),
              enforce_eager=enforce_eager, memory_profile=memory_profile,
              max_num_batched_tokens=512, kv_cache_memory=1.0, max_model_len=2048, enable_prefix_caching=False)
    p128, p512 = prompts()
    wb = module_bytes(llm.engine.lm.model)
    llm.generate([p128], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    res: dict = {"dtype": dtype, "quantization": quantization, "memory_profile": memory_profile, "device": str(llm.engine.lm.device),
                 "cuda_graphs": llm.engine.runner.graphs is not None,
                 "weight_mb": wb / 1e6}
    # prefill: one 512-token prompt, one output token
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        llm.generate([p512], SamplingParams(max_tokens=1, temperature=0))
        times.append(time.perf_counter() - t)
    res["prefill_tok_s"] = 512 / statistics.median(times)
    res["batch"] = {}
    for c in concurrency:
        runs = []
        for _ in range(reps if c <= 16 else max(1, reps - 1)):
            # distinct prompts (rotate the ids) so nothing is shared between sequences
            ps = [p128[i % 128:] + p128[: i % 128] for i in range(c)]
            t = time.perf_counter()
            outs = llm.generate(ps, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))
            wall = time.perf_counter() - t
            ttft = statistics.median(o.metrics.ttft_s for o in outs)
            # decode phase: from the last first-token to the end
            last_first = max(o.metrics.ttft_s for o in outs)
            decode_s = wall - last_first
            runs.append({"agg_tok_s": c * 128 / wall, "decode_tok_s": c * 127 / decode_s,
                         "per_stream_tok_s": 127 / decode_s, "ttft_ms": ttft * 1000,
                         "bw_gb_s": 127 * wb / decode_s / 1e9})
        res["batch"][c] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantization", nargs="+", default=["none"])
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    ap.add_argument("--memory-profile", nargs="+", default=["balanced"], help="one run per profile, in order")
    args = ap.parse_args()
    print(f"# {datetime.date.today()}  {machine_info()}")
    if torch.cuda.is_available() and args.device != "cpu":
        print(f"# GPU: {torch.cuda.get_device_name()}")
    all_res = []
    for dt, qm, mp in [(dt, qm, mp) for dt in args.dtype for qm in args.quantization for mp in args.memory_profile]:
        r = bench_dtype(dt, args.concurrency, args.reps, args.model, args.device, qm, args.enforce_eager, mp)
        all_res.append(r)
        graphs = ", CUDA graphs" if r["cuda_graphs"] else ""
        print(f"\n## {dt}, quantization {qm}, profile {mp}, {r['device']}{graphs}: weights {r['weight_mb']:.0f} MB, "
              f"prefill (512-token prompt) {r['prefill_tok_s']:.0f} tok/s")
        print("| seqs | aggregate tok/s (wall) | decode tok/s | per-stream tok/s | TTFT p50 ms | weight GB/s |")
        print("|---|---|---|---|---|---|")
        for c, b in r["batch"].items():
            print(f"| {c} | {b['agg_tok_s']:.0f} | {b['decode_tok_s']:.0f} | {b['per_stream_tok_s']:.1f} | "
                  f"{b['ttft_ms']:.0f} | {b['bw_gb_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(all_res, indent=2))


if __name__ == "__main__":
    main()
