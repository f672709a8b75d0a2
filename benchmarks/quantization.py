"""Quantization quality and speed for SmolLM2-135M: perplexity on benchmarks/data/inference_essay.txt
(an original English text shipped with the repo; context 512, stride 256), weight memory, prefill and decode
tok/s, and aggregate decode at 16 / 64 streams, for fp32 / bf16 / int8 / int4 / the GGUF Q4_1 blocks as
shipped (packed), and for the packed layers with a bf16 copy for large batches (`--quant-dense-rows 16`).

    python benchmarks/quantization.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from inferd import LLM, SamplingParams
from inferd.hardware import machine_info
from inferd.quant.linear import module_bytes
from inferd.quant.perplexity import perplexity

TEXT = Path(__file__).with_name("data") / "inference_essay.txt"
REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "bench_prompt_ids.json"

CONFIGS = [  # (label, dtype, quantization, group, dense rows)
    ("fp32", "float32", "none", 32, 0),
    ("bf16", "bfloat16", "none", 32, 0),
    ("int8", "bfloat16", "int8", 32, 0),
    ("int4 g32", "bfloat16", "int4", 32, 0),
    ("int4 g64", "bfloat16", "int4", 64, 0),
    ("GGUF Q4_1 packed", "bfloat16", "gguf", 32, 0),
    ("int8 + bf16 copy", "bfloat16", "int8", 32, 16),
    ("GGUF Q4_1 + bf16 copy", "bfloat16", "gguf", 32, 16),
]


def main() -> None:
    print(f"# {time.strftime('%Y-%m-%d')}  {machine_info()}")
    ids512 = json.loads(REF.read_text())["ids512"] if REF.is_file() else None
    print("| format | perplexity | weight MB | prefill tok/s (512) | decode tok/s (1) | GB/s | agg tok/s 16 | "
          "agg tok/s 64 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, dtype, q, g, dense in CONFIGS:
        llm = LLM("smollm2-135m", dtype=dtype, quantization=q, group_size=g, quant_dense_rows=dense,
                  kv_cache_memory=1.0, max_model_len=2048, enable_prefix_caching=False, max_num_seqs=64)
        ids = llm.tokenizer.encode(TEXT.read_text())
        ppl, _ = perplexity(llm.engine, ids, 512, 256)
        mb = module_bytes(llm.engine.lm.model) / 1e6
        p512 = ids512 or ids[:512]
        llm.generate([p512[:64]], SamplingParams(max_tokens=4, temperature=0))
        t = time.perf_counter()
        llm.generate([p512], SamplingParams(max_tokens=1, temperature=0))
        prefill = 512 / (time.perf_counter() - t)
        o = llm.generate([p512[:128]], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))[0]
        decode = 127 / (o.metrics.e2e_s - o.metrics.ttft_s)
        agg = {}
        for n in (16, 64):
            ps = [p512[i: i + 128] for i in range(n)]
            t = time.perf_counter()
            outs = llm.generate(ps, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
            agg[n] = sum(len(x.outputs[0].token_ids) for x in outs) / (time.perf_counter() - t)
        print(f"| {label} | {ppl:.3f} | {mb:.1f} | {prefill:.0f} | {decode:.1f} | {mb * decode / 1e3:.1f} | "
              f"{agg[16]:.0f} | {agg[64]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
