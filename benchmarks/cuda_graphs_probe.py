"""How much of a CUDA decode step is launch overhead: one decode forward (model + lm_head) of B sequences with
128 tokens of context, run eagerly vs replayed as a captured CUDA graph, and the GPU kernels per step.

    python benchmarks/cuda_graphs_probe.py --model DIR [--quantization none int4] [--batch 1 16 64]

This measures the model step alone (no scheduler, sampler or detokenizer): the gap between eager and graph
time is what capturing decode steps in the runner would save.
"""

from __future__ import annotations

import argparse
import time

import torch

from inferd import LLM
from inferd.ops.attention import AttnMetadata


def probe(llm: LLM, batch: int, ctx: int = 128, iters: int = 50) -> dict:
    lm, runner = llm.engine.lm, llm.engine.runner
    dev, bs = lm.device, runner.block_size
    nblk = ctx // bs + 1
    tables = torch.arange(batch * nblk, device=dev).view(batch, nblk)
    meta = AttnMetadata(
        slot_mapping=tables[:, ctx // bs] * bs + ctx % bs, num_decode=batch, decode_block_tables=tables,
        decode_ctx_lens=torch.full((batch,), ctx + 1, dtype=torch.int32, device=dev),
    )
    ids = torch.randint(0, lm.config.vocab_size, (batch,), device=dev)
    pos = torch.full((batch,), ctx, dtype=torch.long, device=dev)

    def step() -> torch.Tensor:
        return lm.model.compute_logits(lm.model(ids, pos, runner.kv_caches, meta))

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters * 1000

    with torch.inference_mode():
        eager_ms = timed(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        graph_ms = timed(g.replay)
    return {"batch": batch, "eager_ms": eager_ms, "graph_ms": graph_ms, "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", nargs="+", default=["none"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    args = ap.parse_args()
    print(f"# GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| quantization | batch | eager ms/step | CUDA graph ms/step | speed-up | GPU kernels/step |")
    print("|---|---|---|---|---|---|")
    for q in args.quantization:
        llm = LLM(args.model, device="cuda", dtype="bfloat16", quantization=q, kv_cache_memory=1.0,
                  max_model_len=2048, max_num_seqs=max(args.batch))
        for b in args.batch:
            r = probe(llm, b)
            print(f"| {q} | {b} | {r['eager_ms']:.2f} | {r['graph_ms']:.2f} | {r['eager_ms'] / r['graph_ms']:.1f}x | "
                  f"{r['kernels']} |", flush=True)
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
