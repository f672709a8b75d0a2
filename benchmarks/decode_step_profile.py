"""Where a batched decode step of a packed GGUF model goes, measured inside the engine: the fused decoder's own
per-phase clock (csrc/fused_decode.c: each GEMM, attention, KV write, rotary, norms, activation; summed over the
layers) and the step's other parts (embedding lookup, the lm_head, the sampler, the runner's batch building, the
rest of the step's Python), per decode step of N streams. Optionally (--micro) each linear of layer 0 and the head
timed alone at 1 and N rows, scaled to all layers: that estimate runs layer 0's weights from the cache, so it
understates the in-engine GEMM time (by ~1.7x for the small qkv and o projections on the 1B).

    python benchmarks/decode_step_profile.py --model /tmp/q/1b/llama1b-random-Q4_0.gguf --streams 16
    python benchmarks/decode_step_profile.py --model ... --threads 1 --cpu-time   # on a loaded host

--cpu-time times with the calling thread's CPU clock: at one thread that is what each part costs whatever else
the host runs (the figures of a shared host), at more threads it would miss the other threads' work, so it needs
--threads 1. (the 1B-class files come from `benchmarks/kquant_1b.py --dir /tmp/q/1b`).
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from typing import Any

import torch

from inferd import LLM, SamplingParams
from inferd.engine.sampler import Sampler
from inferd.hardware import machine_info
from inferd.ops import fused_decode


def time_call(fn, x: torch.Tensor, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t0) / reps


def micro(llm: LLM, streams: int) -> None:
    model, dtype = llm.engine.lm.model, llm.engine.lm.dtype
    layers = model.config.num_layers
    linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.0.") and hasattr(m, "in_features")}
    linears["lm_head"] = model.lm_head
    for rows in (1, streams):
        total = 0.0
        for name, m in linears.items():
            t = time_call(m.logits if name == "lm_head" and hasattr(m, "logits") else m,
                          torch.randn(rows, m.in_features, dtype=dtype))
            times = 1 if name == "lm_head" else layers
            total += t * times
            print(f"{rows:3d} rows  {name:40s} {type(m).__name__:12s} {t * 1e3:7.3f} ms x{times}")
        print(f"{rows:3d} rows  GEMMs per decode step (layer 0 from cache): {total * 1e3:.1f} ms")


class StepClock:
    """Wraps the engine's step parts with a clock; keeps the sums of decode steps (those the fused decoder ran)."""

    def __init__(self, llm: LLM, clock: Any):
        self.clock, self.sums, self.steps = clock, collections.defaultdict(float), 0
        self.pending: list[tuple[str, float]] = []
        self.fused = False
        eng = llm.engine
        model = eng.lm.model
        self._wrap(eng.runner, "prepare", "batch building (runner.prepare)")
        self._wrap(model.model.embed_tokens, "forward", "embedding lookup")
        self._wrap(model, "compute_logits", "lm_head (fp32 logits)")
        self._wrap(fused_decode.FusedDecoder, "run", "decoder (fused C call)")
        self._wrap(Sampler, "__call__", "sampler")
        self._wrap(eng, "step", "step")

    def _wrap(self, obj: Any, name: str, key: str) -> None:
        f = getattr(obj, name)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = self.clock()
            r = f(*a, **k)
            dt = self.clock() - t0
            if key == "decoder (fused C call)":
                self.fused = self.fused or r is not None
            if key != "step":
                self.pending.append((key, dt))
                return r
            if self.fused:  # a decode step: count it and its parts
                self.steps += 1
                self.sums["step"] += dt
                for k2, d2 in self.pending:
                    self.sums[k2] += d2
            self.pending.clear()
            self.fused = False
            return r

        setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--runs", type=int, default=2, help="timed generate() calls after a warm-up one (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch / kernel threads (0: the default)")
    ap.add_argument("--cpu-time", action="store_true", help="the calling thread's CPU time (needs --threads 1)")
    ap.add_argument("--micro", action="store_true", help="also time each linear alone (layer 0, from cache)")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1 (other threads' work is not on the calling thread's clock)")
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, quantization="gguf", quant_dense_rows=0, max_model_len=args.prompt_len + args.steps + 16,
              kv_cache_memory=0.5, enable_prefix_caching=False, max_num_seqs=args.streams)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {machine_info()}, load {os.getloadavg()[0]:.1f}; {args.model}, {args.streams} streams, clock: "
          f"{'thread CPU time' if args.cpu_time else 'wall'}")
    if args.micro:
        micro(llm, args.streams)
    model = llm.engine.lm.model
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist() for _ in range(args.streams)]
    sp = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
    llm.generate(prompts, sp)  # warm-up
    clock = StepClock(llm, time.thread_time if args.cpu_time else time.perf_counter)
    best: tuple[float, dict[str, float], dict[str, float], int] | None = None
    for _ in range(args.runs):
        clock.sums.clear()
        clock.steps = 0
        fused_decode.profile(True, cpu_time=args.cpu_time)
        llm.generate(prompts, sp)
        phases = fused_decode.profile(False)
        n = clock.steps
        if n and (best is None or clock.sums["step"] / n < best[0]):
            best = (clock.sums["step"] / n, dict(clock.sums), phases, n)
    if best is None:
        raise SystemExit("no decode step ran the fused decoder (this model or kernel tier has no fused path)")
    per_step, sums, phases, n = best
    ms = 1e3 / n
    print(f"decode step of {args.streams} rows: {per_step * 1e3:.1f} ms ({args.streams / per_step:.0f} tok/s), "
          f"best of {args.runs} runs, {n} decode steps each")
    print("| part | ms per step | share |\n|---|---|---|")
    rows = [(f"decoder: {p}", v) for p, v in phases.items()]
    rows.append(("decoder: outside the phases (call, descriptors)", sums["decoder (fused C call)"] - sum(phases.values())))
    rows += [(k, sums[k]) for k in ("lm_head (fp32 logits)", "embedding lookup", "sampler",
                                     "batch building (runner.prepare)")]
    rows.append(("rest of the step (final norm, scheduler, outputs)", sums["step"] - sum(
        sums[k] for k in ("decoder (fused C call)", "lm_head (fp32 logits)", "embedding lookup", "sampler",
                          "batch building (runner.prepare)"))))
    for name, v in rows:
        print(f"| {name} | {v * ms:.2f} | {v / sums['step'] * 100:.1f}% |")
    gemm = sum(phases[p] for p in ("qkv", "o", "gate_up", "down"))
    print(f"GEMMs (decoder + head): {(gemm + sums['lm_head (fp32 logits)']) * ms:.1f} ms of {per_step * 1e3:.1f}; "
          f"everything else {(sums['step'] - gemm - sums['lm_head (fp32 logits)']) * ms:.1f} ms")


if __name__ == "__main__":
    main()
