"""Where a batched decode step of a packed GGUF model goes: each linear of layer 0 and the head timed alone at 1
and at N activation rows (random activations, the model's dtype), scaled to all layers, against the whole engine
decoding N streams of the same model. The difference is what is not GEMM (attention, norms, rotary, sampling,
the step's Python).

    python benchmarks/decode_step_profile.py --model /tmp/kq1b/llama1b-random-Q4_0.gguf --streams 16

(the 1B-class files come from `benchmarks/kquant_1b.py --dir /tmp/kq1b`).
"""

from __future__ import annotations

import argparse
import time

import torch

from inferd import LLM, SamplingParams


def time_call(fn, x: torch.Tensor, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    llm = LLM(args.model, quantization="gguf", quant_dense_rows=0, max_model_len=args.prompt_len + args.steps + 16,
              kv_cache_memory=0.5, enable_prefix_caching=False, max_num_seqs=args.streams)
    model, dtype = llm.engine.lm.model, llm.engine.lm.dtype
    layers = model.config.num_layers
    linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.0.") and hasattr(m, "in_features")}
    linears["lm_head"] = model.lm_head
    for rows in (1, args.streams):
        total = 0.0
        for name, m in linears.items():
            t = time_call(m, torch.randn(rows, m.in_features, dtype=dtype))
            times = 1 if name == "lm_head" else layers
            total += t * times
            print(f"{rows:3d} rows  {name:40s} {type(m).__name__:12s} {t * 1e3:7.3f} ms x{times}")
        print(f"{rows:3d} rows  GEMMs per decode step: {total * 1e3:.1f} ms")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist() for _ in range(args.streams)]
    for _ in range(2):
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True))
        span = max(o.metrics.e2e_s for o in outs) - max(o.metrics.ttft_s for o in outs)
        print(f"engine, {args.streams} streams: {args.streams * args.steps / span:.1f} tok/s, "
              f"{span / args.steps * 1e3:.1f} ms per step")


if __name__ == "__main__":
    main()
