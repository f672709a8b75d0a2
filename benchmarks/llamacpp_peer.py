"""llama.cpp (through llama-cpp-python's Python API) on the same GGUF file, on this machine, in the same run as
inferd's engine: prefill of the 512-token prompt and single-stream decode of 128 tokens.

    python benchmarks/llamacpp_peer.py --peer-python /path/to/env-with-llama-cpp-python/bin/python
        [--isa avx2_fma --dtype float32]   # inferd forced to a kernel tier (compare with a llama.cpp built for it)
        [--bf16-gguf smollm2-bf16.gguf]    # llama.cpp BF16 vs inferd bf16 (-q none) on the same weights

`--bf16-gguf` is written by the peer (llama.cpp's own quantize, `--allow-requantize`) when it does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

PEER = r"""
import json, sys, time
from llama_cpp import Llama
ids = json.load(open(sys.argv[2]))
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[3]), n_batch=512, verbose=False)
res = {}
pp = []
for _ in range(3):
    llm.reset(); t = time.perf_counter(); llm.eval(ids["ids512"]); pp.append(512 / (time.perf_counter() - t))
res["prefill_tok_s"] = sorted(pp)[1]
tg = []
for _ in range(3):
    llm.reset(); llm.eval(ids["ids128"]); tok = ids["ids128"][-1]
    t = time.perf_counter()
    for _ in range(128):
        llm.eval([tok]); tok = int(llm.scores[llm.n_tokens - 1].argmax())
    tg.append(128 / (time.perf_counter() - t))
res["decode_tok_s"] = sorted(tg)[1]
print(json.dumps(res))
"""


TO_BF16 = r"""
import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
p.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def bench_inferd(model: str, q: str, ids: dict, dtype: str = "auto") -> tuple[float, float]:
    from inferd import LLM, SamplingParams

    llm = LLM(model, quantization=q, dtype=dtype, kv_cache_memory=0.5, max_model_len=1024,
              enable_prefix_caching=False)
    llm.generate([ids["ids128"]], SamplingParams(max_tokens=4, temperature=0))
    pps = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate([ids["ids512"]], SamplingParams(max_tokens=1, temperature=0))
        pps.append(512 / (time.perf_counter() - t))
    tgs = []
    for _ in range(3):
        o = llm.generate([ids["ids128"]], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))[0]
        tgs.append(127 / (o.metrics.e2e_s - o.metrics.ttft_s))
    return sorted(pps)[1], sorted(tgs)[1]


def run_peer(python: str, gguf: str, ref: Path) -> dict:
    out = subprocess.run([python, "-c", PEER, gguf, str(ref), str(os.cpu_count())], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--quantization", nargs="+", default=["none", "gguf", "int4"])
    ap.add_argument("--q8-gguf", default=None,
                    help="a Q8_0 GGUF of the same weights (e.g. made with llama.cpp's quantize, --allow-requantize): "
                         "llama.cpp on it vs inferd -q gguf (Q8_0 → int8) and -q int8 on the shipped file")
    ap.add_argument("--bf16-gguf", default=None, help="a BF16 GGUF of the same weights (written if missing)")
    ap.add_argument("--isa", default=None, help="run inferd on this kernel tier (INFERD_ISA)")
    ap.add_argument("--dtype", default="auto", help="inferd compute dtype")
    args = ap.parse_args()
    if args.isa:
        os.environ["INFERD_ISA"] = args.isa
    from inferd.hardware import machine_info
    from inferd.loader.hub import resolve
    from inferd.ops.kernels import get_kernels

    ref = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "bench_prompt_ids.json"
    ids = json.loads(ref.read_text())
    print(f"# {time.strftime('%Y-%m-%d')}  {machine_info()}, inferd kernel tier {get_kernels().tier}, "
          f"dtype {args.dtype}")
    peer = run_peer(args.peer_python, str(resolve("smollm2-135m")), ref)
    print("| engine / format | prefill tok/s (512) | ratio | decode tok/s (128) | ratio |")
    print("|---|---|---|---|---|")
    print(f"| llama.cpp Q4_1 (llama-cpp-python) | {peer['prefill_tok_s']:.0f} | 1.00x | {peer['decode_tok_s']:.1f} | "
          "1.00x |")
    labels = {"none": "bf16 (dequantized at load)", "gguf": "Q4_1 blocks kept packed", "int4": "int4 g32",
              "int8": "int8", "auto": "auto (CLI default)"}
    for q in args.quantization:
        pp, tg = bench_inferd("smollm2-135m", q, ids, args.dtype)
        print(f"| inferd {labels[q]} | {pp:.0f} | {pp / peer['prefill_tok_s']:.2f}x | {tg:.1f} | "
              f"{tg / peer['decode_tok_s']:.2f}x |", flush=True)
    if args.q8_gguf:
        p8 = run_peer(args.peer_python, args.q8_gguf, ref)
        print(f"| llama.cpp Q8_0 (llama-cpp-python) | {p8['prefill_tok_s']:.0f} | 1.00x | {p8['decode_tok_s']:.1f} | "
              "1.00x |")
        for label, model, q in (("Q8_0 blocks kept packed (int8)", args.q8_gguf, "gguf"),
                                ("int8 (-q int8, shipped file)", "smollm2-135m", "int8")):
            pp, tg = bench_inferd(model, q, ids)
            print(f"| inferd {label} | {pp:.0f} | {pp / p8['prefill_tok_s']:.2f}x | {tg:.1f} | "
                  f"{tg / p8['decode_tok_s']:.2f}x |", flush=True)


    if args.bf16_gguf:
        if not Path(args.bf16_gguf).is_file():
            subprocess.run([args.peer_python, "-c", TO_BF16, str(resolve("smollm2-135m")), args.bf16_gguf], check=True)
        pb = run_peer(args.peer_python, args.bf16_gguf, ref)
        print(f"| llama.cpp BF16 (llama-cpp-python) | {pb['prefill_tok_s']:.0f} | 1.00x | {pb['decode_tok_s']:.1f} | "
              "1.00x |")
        pp, tg = bench_inferd("smollm2-135m", "none", ids, "bfloat16")
        print(f"| inferd bf16 (-q none, shipped file) | {pp:.0f} | {pp / pb['prefill_tok_s']:.2f}x | {tg:.1f} | "
              f"{tg / pb['decode_tok_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
